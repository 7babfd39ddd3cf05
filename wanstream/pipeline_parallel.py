"""Multi-GPU pipeline orchestration: DiT block ranges in a ring over ``torch.distributed``, Stream Batch across
stages, asynchronous point-to-point messages, a continuous block scheduler — and the CLI hooks.

Layout (W ranks, one device each; code in :mod:`wanstream.pipeline`):

* rank 0: frames in, VAE encode, motion-aware noise controller, noise mixing, blocks ``[0, b0)`` (patch embedding
  included); it is also the process that calls the API (:class:`~wanstream.pipeline.PipelineSession` has the
  :class:`~wanstream.session.StreamSession` interface);
* middle ranks: their block ranges;
* last rank: its blocks, the head, x0, re-noising (its own seeded noise source), VAE / TAEHV decode; it sends the
  re-noised slots and the decoded frames back to rank 0 (the ring).

W stream batches circulate at once (``LatentStream(lag=W)`` is the single-process reference of the same
schedule, and the pipeline reproduces its latents to fp32 rounding). Every rank holds only its blocks' weights, KV
caches and prompt K/V (+ the small shared embedders and head). Messages are typed (header, int table, payloads;
:mod:`wanstream.pipeline.protocol`); prompt changes, step changes, resets, re-seeding, block moves and shutdown
travel in the same ordered streams. Sends and receives run in per-link threads (CUDA: side streams with events).
The block scheduler (:mod:`wanstream.block_scheduler`) moves one boundary block at a time, point to point, when the
slowest stage exceeds the mean. A rank that dies, hangs or raises makes every other rank stop with an error that
names it.

CLI (the lead wires these into ``wanstream/cli.py``)::

    p = sub.add_parser("v2v", ...)        # existing
    add_pipeline_args(p)                  # --pipeline N, --gpus 0,1,2,3, --split, --no-rebalance, --pipeline-timeout

    def cmd_v2v(args):
        if pipeline_requested(args):
            return run_v2v_pipeline(args)
        ...                               # single-device path unchanged

Launch: ``wanstream v2v in.mp4 -o out.mp4 --model M --prompt P --gpus 0,1,2,3`` (spawns ranks 1..3 itself on a
free loopback port), ``--pipeline 2 --device cpu`` (2 gloo ranks on the CPU), or
``torchrun --nproc-per-node 4 -m wanstream.cli v2v ... --pipeline 4`` (every rank runs the same command).
"""

from __future__ import annotations

import argparse
import os

from .argtypes import int_in
from .block_scheduler import SchedulerConfig, format_split, parse_split
from .pipeline import (Finished, PipelineDriver, PipelineError, PipelineSession, default_devices,  # noqa: F401
                       num_layers_of, renoise_seed, run_worker, torchrun_env)
from .pipeline.launch import LaunchSpec

__all__ = ["Finished", "PipelineDriver", "PipelineError", "PipelineSession", "add_pipeline_args",
           "check_pipeline_args", "launch_pipeline", "pipeline_requested", "pipeline_devices", "renoise_seed", "run_v2v_pipeline"]


# ------------------------------------------------------------------------------------------------ CLI
def _gpu_list(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ids = []
    if not ids or any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise argparse.ArgumentTypeError(f"--gpus takes distinct GPU ids like 0,1,2,3, got {text!r}")
    return ids


def add_pipeline_args(parser: argparse.ArgumentParser) -> None:
    """Add the multi-GPU pipeline options to a command (v2v, serve)."""
    g = parser.add_argument_group("multi-GPU pipeline")
    g.add_argument("--pipeline", type=int_in(2, None, "--pipeline ranks"), default=None, metavar="N",
                   help="run the DiT as a pipeline of N ranks (with --device cpu: N gloo ranks on the CPU)")
    g.add_argument("--gpus", type=_gpu_list, default=None, metavar="IDS",
                   help="one pipeline rank per GPU, e.g. 0,1,2,3 (implies --pipeline 4)")
    g.add_argument("--split", default=None, metavar="COUNTS",
                   help="initial DiT blocks per rank, e.g. 8,8,7,7 (default: even, remainder to the first ranks)")
    g.add_argument("--no-rebalance", action="store_true",
                   help="keep the initial split (no dynamic block scheduler)")
    g.add_argument("--pipeline-timeout", type=float, default=120.0, metavar="S",
                   help="seconds without progress before a stuck rank stops the pipeline (default 120)")


PIPELINE_UNSUPPORTED = {"lora": "--lora", "taehv": "--taehv", "quantize": "--quantize", "compile": "--compile"}


def check_pipeline_args(args) -> None:
    """Refuse, before anything loads, what the pipeline does not run (its stages load no LoRA, no quantised or
    compiled DiT, and rank 0 has no TAEHV for the engine's streams): ``v2v`` and ``serve`` alike."""
    from .presets import lora_specs
    asked = [flag for name, flag in PIPELINE_UNSUPPORTED.items()
             if (lora_specs(args) if name == "lora" else getattr(args, name, None))]
    if asked:
        raise ValueError(f"{', '.join(asked)} cannot be combined with --pipeline / --gpus (the pipeline does not "
                         f"run {'them' if len(asked) > 1 else 'it'}); drop {'them' if len(asked) > 1 else 'it'} or "
                         f"run on one device")


def pipeline_requested(args) -> bool:
    """True for --gpus / --pipeline N, and under torchrun with 2 or more ranks."""
    return bool(getattr(args, "gpus", None) or getattr(args, "pipeline", None) or torchrun_env() is not None)


def pipeline_devices(args, env: dict | None = None) -> list[str]:
    """One device per rank from --gpus / --pipeline / --device (or the torchrun world)."""
    if env is not None:
        world = env["world"]
        if args.gpus and len(args.gpus) != world:
            raise ValueError(f"--gpus lists {len(args.gpus)} GPUs but torchrun started {world} ranks")
        devices = default_devices(world, args.device)
        if devices[0].startswith("cuda"):
            local = args.gpus[env["local_rank"]] if args.gpus else env["local_rank"]
            devices[env["rank"]] = f"cuda:{local}"
        return devices
    if args.gpus:
        if args.pipeline and args.pipeline != len(args.gpus):
            raise ValueError(f"--pipeline {args.pipeline} but --gpus lists {len(args.gpus)} GPUs")
        if args.device and not str(args.device).startswith("cuda"):
            raise ValueError("--gpus runs on CUDA devices; drop --device or use --pipeline N --device cpu")
        return [f"cuda:{i}" for i in args.gpus]
    return default_devices(args.pipeline, args.device)


def _split(args, model, world: int):
    if not args.split:
        return None
    split = parse_split(args.split, num_layers_of(model))
    if len(split) != world:
        raise ValueError(f"--split gives {len(split)} ranks, the pipeline has {world}")
    return split


def _log_to_stderr() -> None:
    """The split and every block move are logged (``wanstream.pipeline`` logger) on stderr."""
    import logging
    logger = logging.getLogger("wanstream.pipeline")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[pipeline] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _cpu_threads(devices: list[str]) -> int | None:
    """CPU ranks share the cores: torch threads per rank (set here for rank 0); None on GPUs."""
    if devices[0] != "cpu":
        return None
    import torch
    threads = max(1, (os.cpu_count() or len(devices)) // len(devices))
    torch.set_num_threads(threads)
    return threads


def launch_pipeline(args, decoder: str = "vae") -> PipelineDriver:
    """Spawn the ranks of ``--pipeline`` / ``--gpus`` for a command whose process is rank 0 (``serve``, which
    logs itself): rank 0 loads the VAE (encode) and the text encoder, the last rank ``decoder`` (vae | taehv)."""
    if torchrun_env() is not None:
        raise ValueError("serve starts its pipeline ranks itself: run it without torchrun (use --gpus or "
                         "--pipeline N)")
    devices = pipeline_devices(args)
    return PipelineDriver.launch(args.model, devices, split=_split(args, args.model, len(devices)), decode=decoder,
                                 vae=True, text_encoder=True,
                                 schedule=None if args.no_rebalance else SchedulerConfig(),
                                 timeout=args.pipeline_timeout, threads=_cpu_threads(devices))


def run_v2v_pipeline(args) -> int:
    """``wanstream v2v`` on a pipeline: same flags as single-device plus the pipeline options."""
    from .block_scheduler import even_split
    from .io.video import fit_resolution, probe_video

    env = torchrun_env()
    devices = pipeline_devices(args, env)
    _log_to_stderr()
    world = len(devices)
    decoder = "vae"                 # check_pipeline_args refused --taehv
    schedule = None if args.no_rebalance else SchedulerConfig()
    split = _split(args, args.model, world)
    threads = _cpu_threads(devices)
    driver = None
    if env is not None:
        spec = LaunchSpec(str(args.model), devices, split or even_split(num_layers_of(args.model), world),
                          decode=decoder, timeout=args.pipeline_timeout, threads=threads,
                          prefix=f"wanstream/{env['run_id']}/", hostname=None)
        if env["rank"] != 0:
            return run_worker(env["rank"], env["host"], env["port"], spec, master=False)
        driver = PipelineDriver.join_torchrun(args.model, spec, vae=True, text_encoder=True, schedule=schedule)

    path = args.input[0]
    info = probe_video(path)
    width, height = args.resolution or fit_resolution(info.width, info.height)
    session = PipelineSession(args.model, devices=devices, prompt=args.prompt, width=width, height=height,
                              steps=args.steps, noise_scale=args.noise_scale,
                              noise_controller=not args.no_noise_controller, batch=not args.no_batch,
                              seed=args.seed, decoder=decoder, split=split, rebalance=schedule or False,
                              timeout=args.pipeline_timeout, threads=threads, driver=driver)
    from .restyle import FileJob, report, restyle
    with session:
        job = FileJob(path, args.output, session.stream, info.fps, info.frames)
        elapsed = restyle(session.engine, [job], desc=f"v2v x{world}")
        split_now, moves = session.split, len(session.moves)
    report([job], elapsed)
    print(f"pipeline: {world} ranks on {', '.join(devices)} | split {format_split(split_now)} | "
          f"{moves} block move(s)")
    return 0
