"""Restyle video files through an engine: one file, or several files as concurrent streams batched together.

Every file is a stream of one :class:`~wanstream.engine.loop.Engine`; their frames are fed in lockstep (one frame of
each file at a time), so whenever the streams have a chunk ready together they share one DiT call — the
throughput mode for batch jobs. Each output keeps its input's frame count and timestamps (so its frame rate, also a
variable one) and its audio track, and equals the file restyled alone (up to float rounding of batched calls).

Inputs are anything :func:`~wanstream.io.reading.open_video` reads (videos, image sequences, still images).
Outputs never harm an input: one that is an input is refused before anything is opened, and each is written to a
temporary file renamed into place only when complete (:mod:`wanstream.io.files`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from wanstream.engine.loop import Engine, EngineStream
from wanstream.io.files import OUTPUT_EXTENSIONS, VideoError, check_output_name, check_outputs
from wanstream.io.reading import IMAGE_EXTENSIONS, VideoSource, source_name


@dataclass
class FileJob:
    source: VideoSource          # the opened input (:func:`wanstream.io.reading.open_video`)
    output: Path
    stream: EngineStream
    crf: int = 18                # x264 quality of the output (0 = lossless)
    audio: bool = True           # carry the input's audio track (copied, or AAC where the container needs it)
    written: int = 0
    first_s: float | None = None
    audio_copied: bool | None = None                       # after the run: copied / re-encoded / no audio

    @property
    def input(self) -> Path:
        return self.source.path


def output_paths(inputs: list[Path], output: Path) -> list[Path]:
    """One input: ``output`` is the file. Several: ``output`` is a folder, each result named after its input
    (``NAME.mp4``, see :func:`~wanstream.io.reading.source_name`; a name met twice gets ``NAME-2.mp4``)."""
    if len(inputs) == 1:
        return [check_output_name(output)]
    if output.suffix.lower() in OUTPUT_EXTENSIONS or output.is_file():
        hint = ""
        if all(Path(p).suffix.lower() in IMAGE_EXTENSIONS for p in inputs):
            hint = ("; to restyle an image sequence give its folder or a quoted pattern ('frames/*.png'), which "
                    "the shell does not expand")
        raise VideoError(f"{output}: with {len(inputs)} inputs, -o/--output must be a folder (got a file name){hint}")
    names: dict[str, int] = {}
    out = []
    for path in inputs:
        stem = source_name(path)
        k = names.get(stem, 0)
        names[stem] = k + 1
        out.append(output / (f"{stem}.mp4" if k == 0 else f"{stem}-{k + 1}.mp4"))
    return out


def plan_outputs(inputs: list[Path], output: Path) -> list[Path]:
    """:func:`output_paths`, refusing (before anything is opened) an output that is one of the inputs."""
    outputs = output_paths(inputs, output)
    check_outputs(inputs, outputs)
    return outputs


def restyle(engine: Engine, jobs: list[FileJob], desc: str = "v2v") -> float:
    """Stream every job's input through its stream into its output, with a progress bar. Returns seconds.

    On any failure (or Ctrl-C) no output is left behind, complete or not."""
    from contextlib import ExitStack

    from tqdm import tqdm

    from wanstream.io.writing import VideoWriter
    check_outputs([f for j in jobs for f in j.source.files], [j.output for j in jobs])     # also sequences' images
    t0 = time.perf_counter()
    with ExitStack() as stack:
        writers = []
        for job in jobs:
            s, src = job.stream, job.source
            audio = src.audio if job.audio else None
            writer = VideoWriter(job.output, src.info.fps, s.width, s.height, crf=job.crf, time_base=src.time_base,
                                 start=src.timeline_start(audio is not None), audio=audio)
            writers.append(stack.enter_context(writer))
            job.audio_copied = writer.audio_copied
        known = [j.source.info.frames for j in jobs]
        total = None if None in known else sum(known)
        bar = stack.enter_context(tqdm(total=total, unit="frame", desc=desc, disable=None))
        sources = [job.source.frames() for job in jobs]
        counts = [0] * len(jobs)
        stamps: list[dict[int, int]] = [{} for _ in jobs]     # per job: frame id → the input frame's timestamp
        active = list(range(len(jobs)))

        def write_ready() -> None:
            for job, writer, pts in zip(jobs, writers, stamps):
                out = job.stream.take_outputs()
                if out and job.first_s is None:
                    job.first_s = time.perf_counter() - t0
                for o in out:
                    writer.write(o.image, pts.pop(o.index))
                job.written += len(out)
                bar.update(len(out))

        while active:
            for i in list(active):
                frame = next(sources[i], None)
                if frame is None:
                    engine.finish(jobs[i].stream)
                    active.remove(i)
                else:
                    stamps[i][counts[i]] = frame.pts
                    engine.feed(jobs[i].stream, frame.image, frame_ids=[counts[i]])
                    counts[i] += 1
            while any(j.stream.buffer.ready() for j in jobs):
                engine.step()
                write_ready()
        engine.run_until_idle()
        write_ready()
        for job, count in zip(jobs, counts):
            if job.stream.error:
                raise RuntimeError(f"{job.input}: {job.stream.error}")
            if job.written != count:
                raise RuntimeError(f"{job.input}: {count} frames in but {job.written} restyled")
    return time.perf_counter() - t0


def report(jobs: list[FileJob], elapsed: float) -> None:
    """One line per restyled file (and a total line for several)."""
    for job in jobs:
        sound = {None: "", True: " | audio copied", False: " | audio re-encoded (AAC)"}[job.audio_copied]
        print(f"frames {job.written} | {job.written / elapsed:.2f} FPS | time to first frame {job.first_s:.2f} s | "
              f"{elapsed:.1f} s total{sound} | output {job.output}")
    if len(jobs) > 1:
        total = sum(j.written for j in jobs)
        print(f"{len(jobs)} files | frames {total} | {total / elapsed:.2f} FPS together | {elapsed:.1f} s total")
