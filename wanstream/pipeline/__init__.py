"""Multi-GPU pipeline orchestration: DiT block ranges in a ring over ``torch.distributed``, Stream Batch across
stages, asynchronous point-to-point messages, a continuous block scheduler .

Layout (W ranks, one device each; this package):

* rank 0: frames in, VAE encode, motion-aware noise controller, noise mixing, blocks ``[0, b0)`` (patch embedding
  included); it is also the process that calls the API (the engine runs on :class:`~wanstream.pipeline.runner.PipelineRunner`; :class:`~wanstream.api.pipeline_session.PipelineSession` has the
  :class:`~wanstream.api.session.StreamSession` interface);
* middle ranks: their block ranges;
* last rank: its blocks, the head, x0, re-noising (its own seeded noise source), VAE / TAEHV decode; it sends the
  re-noised slots and the decoded frames back to rank 0 (the ring).

W stream batches circulate at once (``LatentStream(lag=W)`` is the single-process reference of the same
schedule, and the pipeline reproduces its latents to fp32 rounding). Every rank holds only its blocks' weights, KV
caches and prompt K/V (+ the small shared embedders and head). Messages are typed (header, int table, payloads;
:mod:`wanstream.pipeline.protocol`); prompt changes, step changes, resets, re-seeding, block moves and shutdown
travel in the same ordered streams. Sends and receives run in per-link threads (CUDA: side streams with events).
The block scheduler (:mod:`wanstream.core.block_scheduler`) moves one boundary block at a time, point to point, when the
slowest stage exceeds the mean. A rank that dies, hangs or raises makes every other rank stop with an error that
names it.

Launch: ``wanstream v2v in.mp4 -o out.mp4 --model M --prompt P --gpus 0,1,2,3`` (spawns ranks 1..3 itself on a
free loopback port), ``--pipeline 2 --device cpu`` (2 gloo ranks on the CPU), or
``torchrun --nproc-per-node 4 -m wanstream.cli v2v ... --pipeline 4`` (every rank runs the same command). The command-line hooks are in
:mod:`wanstream.cli.pipeline`.
"""

from wanstream.pipeline.driver import Finished, MoveRecord, PipelineDriver
from wanstream.pipeline.launch import LaunchSpec, run_worker, torchrun_env
from wanstream.pipeline.protocol import Kind, Message, ProtocolError
from wanstream.pipeline.runner import default_devices, renoise_seed
from wanstream.pipeline.stage import PipeConfig, Stage
from wanstream.pipeline.transport import PipelineError

__all__ = ["Finished", "Kind", "LaunchSpec", "Message", "MoveRecord", "PipeConfig", "PipelineDriver",
           "PipelineError", "ProtocolError", "Stage", "default_devices", "renoise_seed", "run_worker",
           "torchrun_env"]
