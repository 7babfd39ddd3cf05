"""Restyle video files through an engine: one file, or several files as concurrent streams batched together.

Every file is a stream of one :class:`~wanstream.engine.loop.Engine`; their frames are fed in lockstep (one frame of
each file at a time), so whenever the streams have a chunk ready together they share one DiT call — the
throughput mode for batch jobs. Each output keeps its input's frame count and frame rate, and equals the file
restyled alone (up to float rounding of batched calls).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from wanstream.engine.loop import Engine, EngineStream


@dataclass
class FileJob:
    input: Path
    output: Path
    stream: EngineStream
    fps: float
    frames: int                  # input frames (as probed; the count written is what the file really holds)
    crf: int = 18                # x264 quality of the output (0 = lossless)
    written: int = 0
    first_s: float | None = None


def output_paths(inputs: list[Path], output: Path) -> list[Path]:
    """One input: ``output`` is the file. Several: ``output`` is a folder, each result named after its input."""
    if len(inputs) == 1:
        return [output]
    if output.suffix:
        raise ValueError(f"{output}: with {len(inputs)} inputs, -o/--output must be a folder (got a file name)")
    names: dict[str, int] = {}
    out = []
    for p in inputs:
        stem = p.stem
        k = names.get(stem, 0)
        names[stem] = k + 1
        out.append(output / (f"{stem}.mp4" if k == 0 else f"{stem}-{k + 1}.mp4"))
    return out


def restyle(engine: Engine, jobs: list[FileJob], desc: str = "v2v") -> float:
    """Stream every job's input through its stream into its output, with a progress bar. Returns seconds."""
    from contextlib import ExitStack

    from tqdm import tqdm

    from wanstream.io.video import VideoWriter, iter_frames
    t0 = time.perf_counter()
    with ExitStack() as stack:
        writers = []
        for job in jobs:
            job.output.parent.mkdir(parents=True, exist_ok=True)
            s = job.stream
            writers.append(stack.enter_context(VideoWriter(job.output, job.fps, s.width, s.height, crf=job.crf)))
        bar = stack.enter_context(tqdm(total=sum(j.frames for j in jobs), unit="frame", desc=desc, disable=None))
        sources = [iter_frames(job.input) for job in jobs]
        active = list(range(len(jobs)))

        def write_ready() -> None:
            for job, writer in zip(jobs, writers):
                out = job.stream.take_outputs()
                if out and job.first_s is None:
                    job.first_s = time.perf_counter() - t0
                for o in out:
                    writer.write(o.image)
                job.written += len(out)
                bar.update(len(out))

        while active:
            for i in list(active):
                frame = next(sources[i], None)
                if frame is None:
                    engine.finish(jobs[i].stream)
                    active.remove(i)
                else:
                    engine.feed(jobs[i].stream, frame)
            while any(j.stream.buffer.ready() for j in jobs):
                engine.step()
                write_ready()
        engine.run_until_idle()
        write_ready()
        for job in jobs:
            if job.stream.error:
                raise RuntimeError(f"{job.input}: {job.stream.error}")
            if job.written == 0:
                raise ValueError(f"{job.input}: no frames decoded")
    return time.perf_counter() - t0


def report(jobs: list[FileJob], elapsed: float) -> None:
    """One line per restyled file (and a total line for several)."""
    for job in jobs:
        print(f"frames {job.written} | {job.written / elapsed:.2f} FPS | time to first frame {job.first_s:.2f} s | "
              f"{elapsed:.1f} s total | output {job.output}")
    if len(jobs) > 1:
        total = sum(j.written for j in jobs)
        print(f"{len(jobs)} files | frames {total} | {total / elapsed:.2f} FPS together | {elapsed:.1f} s total")
