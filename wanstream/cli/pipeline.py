"""The multi-GPU pipeline on the command line: ``--pipeline N`` / ``--gpus 0,1,2,3`` / ``--split`` /
``--no-rebalance`` / ``--pipeline-timeout`` for ``v2v`` and ``serve``, the one rule of what a pipeline refuses, and
the launch (see :mod:`wanstream.pipeline` for the ring itself). Parsing imports no torch; running does."""

from __future__ import annotations

import argparse
import os

from wanstream.cli.argtypes import int_in
from wanstream.core.block_scheduler import SchedulerConfig, format_split, parse_split

__all__ = ["add_pipeline_args", "check_pipeline_args", "launch_pipeline", "pipeline_requested", "pipeline_devices",
           "run_v2v_pipeline"]


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
    from wanstream.cli.presets import lora_specs
    asked = [flag for name, flag in PIPELINE_UNSUPPORTED.items()
             if (lora_specs(args) if name == "lora" else getattr(args, name, None))]
    if asked:
        raise ValueError(f"{', '.join(asked)} cannot be combined with --pipeline / --gpus (the pipeline does not "
                         f"run {'them' if len(asked) > 1 else 'it'}); drop {'them' if len(asked) > 1 else 'it'} or "
                         f"run on one device")


def pipeline_requested(args) -> bool:
    """True for --gpus / --pipeline N, and under torchrun with 2 or more ranks."""
    from wanstream.pipeline.launch import torchrun_env
    return bool(getattr(args, "gpus", None) or getattr(args, "pipeline", None) or torchrun_env() is not None)


def pipeline_devices(args, env: dict | None = None) -> list[str]:
    """One device per rank from --gpus / --pipeline / --device (or the torchrun world)."""
    from wanstream.pipeline.runner import default_devices
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
    from wanstream.models.loader import num_layers_of
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


def launch_pipeline(args, decoder: str = "vae"):
    """Spawn the ranks of ``--pipeline`` / ``--gpus`` for a command whose process is rank 0 (``serve``, which
    logs itself): rank 0 loads the VAE (encode) and the text encoder, the last rank ``decoder`` (vae | taehv).
    Returns the :class:`~wanstream.pipeline.driver.PipelineDriver`."""
    from wanstream.pipeline.driver import PipelineDriver
    from wanstream.pipeline.launch import torchrun_env
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
    from wanstream.api.pipeline_session import PipelineSession
    from wanstream.api.restyle import FileJob, plan_outputs, report, restyle
    from wanstream.core.block_scheduler import even_split
    from wanstream.io.video import fit_resolution, open_video
    from wanstream.models.loader import num_layers_of
    from wanstream.pipeline.driver import PipelineDriver
    from wanstream.pipeline.launch import LaunchSpec, run_worker, torchrun_env

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

    output, = plan_outputs(args.input[:1], args.output)      # an output that is the input: refused, nothing opened
    source = open_video(args.input[0], fps=getattr(args, "fps", None), still_frames=getattr(args, "still_frames", 16))
    width, height = args.resolution or fit_resolution(source.info.width, source.info.height)
    session = PipelineSession(args.model, devices=devices, prompt=args.prompt, width=width, height=height,
                              steps=args.steps, noise_scale=args.noise_scale,
                              noise_controller=not args.no_noise_controller, batch=not args.no_batch,
                              seed=args.seed, decoder=decoder, split=split, rebalance=schedule or False,
                              timeout=args.pipeline_timeout, threads=threads, driver=driver)
    with session:
        job = FileJob(source, output, session.stream, crf=getattr(args, "crf", 18),
                      audio=not getattr(args, "no_audio", False))
        elapsed = restyle(session.engine, [job], desc=f"v2v x{world}")
        split_now, moves = session.split, len(session.moves)
    report([job], elapsed)
    print(f"pipeline: {world} ranks on {', '.join(devices)} | split {format_split(split_now)} | "
          f"{moves} block move(s)")
    return 0
