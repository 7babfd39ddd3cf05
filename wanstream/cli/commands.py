"""The commands of ``wanstream`` that live in no other module: v2v, t2v, init-random, clip, download. Each imports
what it needs when it runs (parsing stays fast)."""

from __future__ import annotations

import time

from wanstream.cli.presets import lora_specs, prompt_embedding


def cmd_v2v(args) -> int:
    from wanstream.cli.pipeline import check_pipeline_args, pipeline_requested, run_v2v_pipeline
    if pipeline_requested(args):
        check_pipeline_args(args)
        if args.prompt is None:
            raise ValueError("the multi-GPU pipeline needs --prompt (or a preset with one prompt, not a blend)")
        if len(args.input) > 1:
            raise ValueError("the multi-GPU pipeline restyles one file at a time")
        return run_v2v_pipeline(args)
    from wanstream.api.restyle import FileJob, output_paths, report, restyle
    from wanstream.engine.loop import Engine
    from wanstream.io.video import fit_resolution, probe_video
    from wanstream.models.loader import load_model

    outputs = output_paths(args.input, args.output)
    infos = [probe_video(p) for p in args.input]
    model = load_model(args.model, device=args.device, taehv=args.taehv, quantize=args.quantize,
                       lora=lora_specs(args), backbone=args.backbone)
    embeds = prompt_embedding(model, args)
    engine = Engine(model)
    jobs = []
    for path, out, info in zip(args.input, outputs, infos):
        width, height = args.resolution or fit_resolution(info.width, info.height)
        stream = engine.open(prompt_embeds=embeds, width=width, height=height, steps=args.steps,
                             noise_scale=args.noise_scale, noise_controller=not args.no_noise_controller,
                             batch=not args.no_batch, seed=args.seed, decoder="taehv" if args.taehv else "vae",
                             fit=args.fit)
        jobs.append(FileJob(path, out, stream, info.fps, info.frames, crf=args.crf))
    elapsed = restyle(engine, jobs, desc="v2v" if len(jobs) == 1 else f"v2v x{len(jobs)}")
    report(jobs, elapsed)
    return 0


def cmd_t2v(args) -> int:
    from tqdm import tqdm

    from wanstream.api.t2v import Clip, parse_switch, text_to_videos
    from wanstream.io.video import VideoWriter
    from wanstream.models.loader import load_model

    width, height = args.resolution
    switches = [parse_switch(s) for s in args.switch or ()]
    model = load_model(args.model, device=args.device, lora=lora_specs(args), backbone=args.backbone)
    embeds = prompt_embedding(model, args)
    clip = Clip(embeds, args.frames, args.seed,
                switches=[(frame, model.prompt_embedding(text)) for frame, text in switches])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    first = None
    with VideoWriter(args.output, args.fps, width, height) as writer, \
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
                full_text_encoder=False if args.small_text_encoder else None, backbone=args.backbone)
    return 0


def cmd_clip(args) -> int:
    from wanstream.io.video import write_motion_clip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    width, height = args.resolution
    write_motion_clip(args.output, args.frames, width, height, args.fps)
    print(f"clip: {args.frames} frames {width}x{height} @ {args.fps:g} fps → {args.output}")
    return 0


def cmd_download(args) -> int:
    from wanstream.cli.download import download
    for name in args.name:
        download(name, args.dir)
    return 0
