"""Text-to-video: clips generated block by block (3 latent frames) by streams of an engine, so several clips share
the DiT calls of each tick.

What a block does is the model's backbone's (``core/backbones.py``): StreamDiffusionV2 runs its t2v config (steps
``[1000, 750, 500, 250][:n] + [0]`` through the stream batch, a 21-frame cache without sinks); Self-Forcing and
LongLive run as released — the warped float steps of a block in turn, then the clean context pass, their own cache
policies. Frames come out as their blocks finish (first block: 9 frames, then 12 per block).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from wanstream.core.chunking import BlockRequests, ChunkRule
from wanstream.core.geometry import check_resolution
from wanstream.engine.loop import Engine, EngineStream
from wanstream.models.loader import ModelBundle

FRAMES_PER_BLOCK = 3


def latent_frames_for(num_frames: int, block: int = FRAMES_PER_BLOCK) -> int:
    """Latent frames needed for ``num_frames`` pixel frames (1 + 4k law), rounded up to whole blocks."""
    return BlockRequests(ChunkRule.blocks(block)).blocks_for(num_frames) * block


@dataclass
class Clip:
    """One text-to-video clip: a prompt embedding, its length and seed; ``stream`` once it runs. ``switches``:
    ``(output frame, embedding)`` prompt switches with a KV re-cache (LongLive's interactive mode), each at the
    start of the block the frame falls in (a frame of the first block: from the second block)."""

    prompt_embeds: torch.Tensor
    frames: int
    seed: int = 0
    switches: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    reference: np.ndarray | None = None          # a VACE reference image (uint8 [H, W, 3]), docs/conditioning.md
    reference_strength: float = 1.0
    stream: EngineStream | None = field(default=None, repr=False)


def parse_switch(text: str) -> tuple[int, str]:
    """``FRAME:PROMPT`` → ``(frame, prompt)`` (``wanstream t2v --switch``)."""
    frame, sep, prompt = str(text).partition(":")
    if not sep or not frame.strip().isdigit() or not prompt.strip():
        raise ValueError(f"a switch is FRAME:PROMPT (e.g. 120:a snowy street), got {text!r}")
    return int(frame), prompt.strip()


def text_to_videos(model: ModelBundle, clips: Sequence[Clip], *, width: int = 832, height: int = 480,
                   steps: int = 4, batch: bool = True, engine: Engine | None = None
                   ) -> Iterator[tuple[int, np.ndarray]]:
    """Generate every clip as a stream of one engine (their blocks share each tick's DiT calls); yields
    ``(clip index, uint8 frame [H, W, 3])`` in each clip's order as blocks finish."""
    check_resolution(width, height)
    engine = engine or Engine(model)
    for clip in clips:
        if clip.frames < 1:
            raise ValueError(f"frames must be >= 1, got {clip.frames}")
        clip.stream = engine.open(prompt_embeds=clip.prompt_embeds, width=width, height=height, steps=steps,
                                  seed=clip.seed, batch=batch, mode="t2v", frames=clip.frames)
        if clip.reference is not None:
            engine.set_conditioning(clip.stream, reference=clip.reference, strength=clip.reference_strength)
    pending = {i: sorted(((max(1, c.stream.buffer.blocks_for(f + 1) - 1), e) for f, e in c.switches),
                         key=lambda s: s[0]) for i, c in enumerate(clips)}
    try:
        while engine.has_work():
            for i, clip in enumerate(clips):
                while pending[i] and clip.stream.record.next_chunk >= pending[i][0][0]:
                    engine.set_prompt_embedding(clip.stream, pending[i].pop(0)[1], recache=True)
            engine.step()
            for i, clip in enumerate(clips):
                if clip.stream.error:
                    raise RuntimeError(f"clip {i}: {clip.stream.error}")
                for out in clip.stream.take_outputs():
                    yield i, out.image
    finally:
        for clip in clips:
            engine.close(clip.stream)
        engine.release_closed()


def text_to_video(model: ModelBundle, prompt_embeds: torch.Tensor, num_frames: int, *, width: int = 832,
                  height: int = 480, steps: int = 4, seed: int = 0, batch: bool = True) -> Iterator[np.ndarray]:
    """Yield ``num_frames`` uint8 frames ``[H, W, 3]`` of one clip as blocks finish."""
    for _, frame in text_to_videos(model, [Clip(prompt_embeds, num_frames, seed)], width=width, height=height,
                                   steps=steps, batch=batch):
        yield frame
