"""One live stream: the public Python API of wanstream.

A :class:`StreamSession` takes frames in any count and returns the restyled frames that became ready. It is a
thin client of an :class:`~wanstream.engine.loop.Engine`: the engine cuts the frames into chunks (5 frames for the
first, then 4), encodes each chunk with the streaming VAE, picks its noise level with the motion-aware
controller, denoises it in the stream batch and decodes finished chunks. Output frames carry the index and
timestamp of the input frame they restyle; at the end of the input, :meth:`flush` returns the rest, so every
input frame gets exactly one output frame. Frames come out of :meth:`push` and :meth:`flush` only: prompt, steps,
noise scale, controller and seed change live with :meth:`update` (from the next chunk), and frames a change
finishes (a step change drains the chunks in flight) come out of the next push or flush. Each stream owns all of its state (cache rows, VAE caches, controller, noise), so
sessions sharing one model — or one engine, whose ticks batch them into shared DiT calls — never share anything
but the weights.

    model = load_model("models/tiny")
    session = StreamSession(model, prompt="a watercolor painting", width=512, height=512, steps=2, seed=1)
    for out in session.push(frames):          # frames: uint8 [N, H, W, 3]
        show(out.image, out.timestamp)
    rest = session.flush()

Several sessions on one engine (``StreamSession(model, ..., engine=engine)``) are batched together whenever they
have a chunk ready in the same tick (see ``wanstream v2v a.mp4 b.mp4 ...``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch

from wanstream.core.config import CacheConfig, StreamSettings
from wanstream.core.geometry import check_resolution
from wanstream.engine.loop import Engine, EngineStream, OutputFrame
from wanstream.models.loader import ModelBundle

__all__ = ["OutputFrame", "StreamSession"]


class StreamSession:
    """Video-to-video stream over a shared :class:`ModelBundle` (on its own engine unless one is given)."""

    def __init__(self, model: ModelBundle, *, prompt: str | None = None, prompt_embeds: torch.Tensor | None = None,
                 width: int = 512, height: int = 512, steps: int = 2, noise_scale: float = 0.8,
                 noise_controller: bool = True, batch: bool = True, seed: int = 0, cache: CacheConfig | None = None,
                 decoder: str = "vae", encoder: str = "vae", engine: Engine | None = None, fit: str = "crop",
                 lora: Mapping[str, float] | None = None, reference=None, reference_strength: float = 1.0):
        check_resolution(width, height)
        for name, value in (("decoder", decoder), ("encoder", encoder)):
            if value not in ("vae", "taehv"):
                raise ValueError(f"{name} must be 'vae' or 'taehv', got {value!r}")
        StreamSettings(steps=steps, noise_scale=noise_scale)          # validates
        self.model = model
        self.engine = engine or Engine(model)
        self.width, self.height = width, height
        self.decoder, self.encoder = decoder, encoder
        self.closed = False
        self.stream: EngineStream = self.engine.open(
            prompt_embeds=self._resolve_prompt(prompt, prompt_embeds), width=width, height=height, steps=steps,
            noise_scale=noise_scale, noise_controller=noise_controller, batch=batch, seed=seed, cache=cache,
            decoder=decoder, encoder=encoder, fit=fit, lora=lora)
        if reference is not None:
            self.set_reference(reference, reference_strength)

    # ----------------------------------------------------------------- state
    @property
    def settings(self) -> StreamSettings:
        return self.stream.settings

    @property
    def frames_in(self) -> int:
        return self.stream.frames_in

    @property
    def frames_out(self) -> int:
        return self.stream.stats.frames_out

    # ----------------------------------------------------------------- lifecycle
    def reset(self) -> None:
        """Start over on the next frame (fresh caches, re-prepare); queued frames and chunks in flight are dropped
        (their frames never come out)."""
        self._check_open()
        self.engine.reset(self.stream)
        self._tick()

    def close(self) -> None:
        """Release this stream's caches; the session cannot be used afterwards."""
        if not self.closed:
            self.engine.close(self.stream)
            self.engine.release_closed()
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _check_open(self) -> None:
        if self.closed or self.stream.closed:
            reason = f": {self.stream.error}" if self.stream.error else ""
            raise RuntimeError(f"this stream session is closed{reason}")

    # -------------------------------------------------------------------- inputs
    def _resolve_prompt(self, prompt: str | None, embeds: torch.Tensor | None) -> torch.Tensor:
        if embeds is not None:
            return torch.as_tensor(embeds)
        if prompt is None:
            raise ValueError("give a prompt (text) or a prompt embedding")
        return self.model.prompt_embedding(prompt)

    def push(self, frames, timestamps: Sequence[float] | None = None) -> list[OutputFrame]:
        """Add frames (uint8 ``[N, H, W, 3]``, any N, any size: framed to the session resolution by ``fit``).

        Returns the output frames that became ready.
        """
        self._check_open()
        self.engine.feed(self.stream, frames, timestamps)
        return self._run()

    def flush(self) -> list[OutputFrame]:
        """End of input: pad the last partial chunk (repeating its last frame), finish every in-flight chunk.

        Every input frame pushed so far has exactly one output frame once this returns.
        """
        self._check_open()
        self.engine.finish(self.stream)
        return self._run()

    def _run(self) -> list[OutputFrame]:
        """Ticks of the engine until this stream has nothing left to do now; its new output frames."""
        self._tick()
        return self.stream.take_outputs()

    def _tick(self) -> None:
        """Ticks until this stream has nothing left to do now (a live change applies at once); output frames stay
        in the stream's outbox for the next :meth:`push` or :meth:`flush`."""
        while self.stream.has_work():
            self.engine.step()
        if self.stream.error:
            self._check_open()

    # -------------------------------------------------------------- live changes
    def update(self, *, prompt: str | None = None, prompt_embeds: torch.Tensor | None = None,
               transition_chunks: int = 0, steps: int | None = None, noise_scale: float | None = None,
               noise_controller: bool | None = None, seed: int | None = None,
               lora: Mapping[str, float] | None = None, recache: bool = False) -> None:
        """Change knobs live; they apply from the next chunk. Frames a change finishes (a step change drains the
        chunks in flight) come out of the next :meth:`push` or :meth:`flush`, never lost. ``recache``: a new prompt
        re-encodes the recent frames into the KV cache (LongLive's prompt switch, docs/backbones.md)."""
        self._check_open()
        if prompt is not None or prompt_embeds is not None:
            self.engine.set_prompt_embedding(self.stream, self._resolve_prompt(prompt, prompt_embeds),
                                             transition_chunks, recache=recache)
        self.engine.update(self.stream, steps=steps, noise_scale=noise_scale, noise_controller=noise_controller,
                           seed=seed, lora=lora)
        self._tick()

    def set_reference(self, image=..., strength: float | None = None, control: str | None = None,
                      control_video=None) -> None:
        """VACE conditioning (the model needs its VACE modules, docs/conditioning.md): ``image`` a reference image
        (uint8 ``[H, W, 3]``, framed like the frames; a path is read and validated), None to clear it, ``...`` to keep
        it; ``strength`` the hints' scale; ``control`` none | edges | depth | flow | video (``control_video``: its
        uint8 frames). Applies from the next chunk."""
        self._check_open()
        if isinstance(image, (str, Path)):
            from wanstream.api.conditioning import read_reference
            image = read_reference(image)
        self.engine.set_conditioning(self.stream, reference=image, strength=strength, control=control,
                                     control_video=control_video)
        self._tick()

    def set_prompt_embedding(self, embedding: torch.Tensor, transition_chunks: int = 0) -> None:
        """Swap the cross-attention K/V (no re-prepare); with ``transition_chunks`` = K > 0 the embedding is
        interpolated linearly from the current one over the next K chunks."""
        self._check_open()
        self.engine.set_prompt_embedding(self.stream, embedding, transition_chunks)
        self._tick()
