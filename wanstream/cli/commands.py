"""The commands of ``wanstream`` that live in no other module: v2v, t2v, init-random, clip, download. Each imports
what it needs when it runs (parsing stays fast)."""

from __future__ import annotations

import time
from contextlib import contextmanager

from wanstream.cli.argtypes import autoencoders
from wanstream.cli.presets import lora_specs, prompt_embedding


def check_device(device: str | None) -> None:
    """``--device cuda[:N]`` on a machine where torch sees no such GPU: one line suggesting ``--device cpu``, before
    anything loads."""
    if device is None or not str(device).startswith("cuda"):
        return
    import torch
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (torch.cuda.is_available() is False); "
                         f"use --device cpu")
    index = str(device).partition(":")[2]
    if index.isdigit() and int(index) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                         f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")


@contextmanager
def _terminate_as_interrupt():
    """SIGTERM ends a file-writing command like Ctrl-C does (its outputs are removed, not left half-written)."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _reference(args):
    """The ``--reference`` images, read and validated before any model loads (None without)."""
    if not getattr(args, "reference", None):
        return getattr(args, "preset_reference", None)              # a --preset's image (read when it loaded)
    from wanstream.api.conditioning import read_reference
    return [read_reference(path) for path in args.reference]


def cmd_v2v(args) -> int:
    from wanstream.api.restyle import plan_outputs
    from wanstream.cli.pipeline import check_pipeline_args, pipeline_requested, run_v2v_pipeline
    piped = pipeline_requested(args)
    if piped:
        check_pipeline_args(args)
        if args.prompt is None:
            raise ValueError("the multi-GPU pipeline needs --prompt (or a preset with one prompt, not a blend)")
        if len(args.input) > 1:
            raise ValueError("the multi-GPU pipeline restyles one file at a time")
    check_device(args.device)
    outputs = plan_outputs(args.input, args.output)          # refused here when an output is an input
    if piped:
        with _terminate_as_interrupt():
            return run_v2v_pipeline(args)
    from wanstream.api.restyle import FileJob, report, restyle
    from wanstream.engine.loop import Engine
    from wanstream.io.video import fit_resolution, open_video
    from wanstream.models.loader import load_model

    reference = _reference(args)
    if args.control and args.control_video:
        raise ValueError("give --control or --control-video, not both")
    control = args.control or ("video" if args.control_video else None)
    sources = [open_video(p, fps=args.fps, still_frames=args.still_frames) for p in args.input]
    encoder, decoder = autoencoders(args.taehv)
    model = load_model(args.model, device=args.device, taehv=bool(args.taehv), quantize=args.quantize,
                       lora=lora_specs(args), backbone=args.backbone,
                       vace=reference is not None or control is not None)
    embeds = prompt_embedding(model, args)
    engine = Engine(model)
    jobs = []
    for source, out in zip(sources, outputs):
        width, height = args.resolution or fit_resolution(source.info.width, source.info.height)
        stream = engine.open(prompt_embeds=embeds, width=width, height=height, steps=args.steps,
                             noise_scale=args.noise_scale, noise_controller=not args.no_noise_controller,
                             batch=not args.no_batch, seed=args.seed, encoder=encoder, decoder=decoder,
                             fit=args.fit)
        if reference is not None or control is not None:
            video = None
            if args.control_video is not None:
                video = (f.image for f in open_video(args.control_video).frames())
            engine.set_conditioning(stream, reference=reference if reference is not None else ...,
                                    strength=args.reference_strength, control=control, control_video=video)
        jobs.append(FileJob(source, out, stream, crf=args.crf, audio=not args.no_audio))
    with _terminate_as_interrupt():
        elapsed = restyle(engine, jobs, desc="v2v" if len(jobs) == 1 else f"v2v x{len(jobs)}")
    report(jobs, elapsed)
    return 0


def cmd_t2v(args) -> int:
    from tqdm import tqdm

    from wanstream.api.t2v import Clip, parse_switch, text_to_videos
    from wanstream.io.video import VideoWriter, check_output_name
    from wanstream.models.loader import load_model

    check_output_name(args.output)
    check_device(args.device)
    width, height = args.resolution
    switches = [parse_switch(s) for s in args.switch or ()]
    reference = _reference(args)
    model = load_model(args.model, device=args.device, lora=lora_specs(args), backbone=args.backbone,
                       vace=reference is not None)
    embeds = prompt_embedding(model, args)
    clip = Clip(embeds, args.frames, args.seed,
                switches=[(frame, model.prompt_embedding(text)) for frame, text in switches],
                reference=reference, reference_strength=args.reference_strength)
    t0 = time.perf_counter()
    first = None
    with _terminate_as_interrupt(), VideoWriter(args.output, args.fps, width, height) as writer, \
            tqdm(total=args.frames, unit="frame", desc=f"t2v {model.backbone.name}", disable=None) as bar:
        for _, frame in text_to_videos(model, [clip], width=width, height=height, steps=args.steps,
                                       batch=not args.no_batch):
            first = first if first is not None else time.perf_counter() - t0
            writer.write(frame)
            bar.update(1)
    elapsed = time.perf_counter() - t0
    print(f"frames {args.frames} | {args.frames / elapsed:.2f} FPS | time to first frame {first:.2f} s | "
          f"output {args.output}")
    return 0


def cmd_init_random(args) -> int:
    from wanstream.models.random_init import init_random
    init_random(args.dir, args.preset, seed=args.seed,
                full_text_encoder=False if args.small_text_encoder else None, backbone=args.backbone,
                vace=args.vace)
    return 0


def cmd_clip(args) -> int:
    from wanstream.io.video import check_output_name, write_motion_clip
    check_output_name(args.output, flag="OUTPUT")
    width, height = args.resolution
    with _terminate_as_interrupt():
        write_motion_clip(args.output, args.frames, width, height, args.fps, seed=args.seed)
    print(f"clip: {args.frames} frames {width}x{height} @ {args.fps:g} fps → {args.output}")
    return 0


def cmd_download(args) -> int:
    from wanstream.cli.download import download
    for name in args.name:
        download(name, args.dir)
    return 0
