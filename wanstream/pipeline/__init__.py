"""Multi-GPU pipeline orchestration: DiT block ranges in a ring over ``torch.distributed``, Stream Batch across
stages, asynchronous point-to-point messages, a continuous block scheduler.

Layout (W ranks, one device each; this package):

* rank 0: frames in, VAE encode, motion-aware noise controller, noise mixing, blocks ``[0, b0)`` (patch embedding
  included); it is also the process that calls the API: the engine's runner is
  :class:`~wanstream.pipeline.runner.PipelineRunner` over the :class:`~wanstream.pipeline.driver.PipelineDriver`
  (:class:`~wanstream.api.pipeline_session.PipelineSession` has the :class:`~wanstream.api.session.StreamSession`
  interface);
* middle ranks: their block ranges (:class:`~wanstream.pipeline.worker.Worker`);
* last rank: its blocks, the head, x0, re-noising (each stream's own seeded noise source), VAE / TAEHV decode; it
  sends the re-noised rows and the finished chunks (decoded) back to rank 0 (the ring).

W calls circulate at once (``LatentStream(lag=W)`` is the single-process reference of the same schedule, and the
pipeline reproduces its latents to fp32 rounding). Every rank holds only its part of the model (the loader's part
filter: its blocks, the patch embedding on rank 0, the head on the last rank, the small embedders everywhere), its
blocks' KV caches and its blocks' prompt K/V of every stream. Messages are typed (header, int table, payloads;
:mod:`wanstream.pipeline.protocol`); stream opens / closes / resets, prompt changes, row changes, re-seeding, block
moves and shutdown travel in the same ordered streams as the calls. Sends and receives run in per-link threads
(CUDA: side streams with events; :mod:`wanstream.pipeline.transport`). The block scheduler
(:mod:`wanstream.core.block_scheduler`) moves one boundary block at a time, point to point, when the slowest stage
exceeds the mean. A rank that dies, hangs or raises makes every other rank stop with an error that names it.

Modules: ``launch`` (starting the ranks, loading each rank's part), ``protocol`` (the wire format and message
metadata), ``transport`` (the links), ``health`` (heartbeats, failure detection), ``stage`` (a rank's state and
compute), ``worker`` (the message loop of ranks 1..W-1), ``driver`` (rank 0), ``runner`` (the engine's runner on
the ring).
The package imports ``core``, ``models`` and ``engine``; never ``api`` or above.

Launch: ``wanstream v2v in.mp4 -o out.mp4 --model M --prompt P --gpus 0,1,2,3`` (spawns ranks 1..3 itself on a
free loopback port), ``--pipeline 2 --device cpu`` (2 gloo ranks on the CPU), or
``torchrun --nproc-per-node 4 -m wanstream.cli v2v ... --pipeline 4`` (every rank runs the same command). The
command-line hooks are in :mod:`wanstream.cli.pipeline`.
"""

from wanstream.pipeline.driver import MoveRecord, PipelineDriver
from wanstream.pipeline.health import PipelineError
from wanstream.pipeline.launch import LaunchSpec, load_rank, run_worker, torchrun_env
from wanstream.pipeline.protocol import Kind, Message, PipeConfig, ProtocolError
from wanstream.pipeline.runner import PipelineRunner, default_devices, renoise_seed, runner_factory
from wanstream.pipeline.stage import Stage
from wanstream.pipeline.worker import Worker

__all__ = ["Kind", "LaunchSpec", "Message", "MoveRecord", "PipeConfig", "PipelineDriver", "PipelineError",
           "PipelineRunner", "ProtocolError", "Stage", "Worker", "default_devices", "load_rank", "renoise_seed",
           "run_worker", "runner_factory", "torchrun_env"]
