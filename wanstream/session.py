"""One live stream: the public Python API of wanstream.

A :class:`StreamSession` takes frames in any count and returns the restyled frames that became ready. It is a
thin client of an :class:`~wanstream.engine.Engine`: the engine cuts the frames into chunks (5 frames for the
first, then 4), encodes each chunk with the streaming VAE, picks its noise level with the motion-aware
controller, denoises it in the stream batch and decodes finished chunks. Output frames carry the index and
timestamp of the input frame they restyle; at the end of the input, :meth:`flush` returns the rest, so every
input frame gets exactly one output frame. Prompt, steps, noise scale, controller and seed can change live; they
apply from the next chunk. Each stream owns all of its state (cache rows, VAE caches, controller, noise), so
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

from typing import Mapping, Sequence

import torch

from .config import CacheConfig, StreamSettings
from .engine import Engine, EngineStream, OutputFrame
from .models.loader import ModelBundle
from .noise import NoiseSource

__all__ = ["OutputFrame", "StreamSession"]


class StreamSession:
    """Video-to-video stream over a shared :class:`ModelBundle` (on its own engine unless one is given)."""

    def __init__(self, model: ModelBundle, *, prompt: str | None = None, prompt_embeds: torch.Tensor | None = None,
                 width: int = 512, height: int = 512, steps: int = 2, noise_scale: float = 0.8,
                 noise_controller: bool = True, batch: bool = True, seed: int = 0, cache: CacheConfig | None = None,
                 decoder: str = "vae", encoder: str = "vae", noise: NoiseSource | None = None,
                 engine: Engine | None = None,
                 fit: str = "crop", lora: Mapping[str, float] | None = None):
        if width % 16 or height % 16 or width <= 0 or height <= 0:
            raise ValueError(f"resolution must be positive multiples of 16, got {width}x{height}")
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
            decoder=decoder, encoder=encoder, noise=noise, fit=fit, lora=lora)

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
        """Start over on the next frame (fresh caches, re-prepare); queued frames are discarded."""
        self._check_open()
        self.engine.reset(self.stream)
        self._run()

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
        while self.stream.has_work():
            self.engine.step()
        if self.stream.error:
            self._check_open()
        return self.stream.take_outputs()

    # -------------------------------------------------------------- live changes
    def update(self, *, prompt: str | None = None, prompt_embeds: torch.Tensor | None = None,
               transition_chunks: int = 0, steps: int | None = None, noise_scale: float | None = None,
               noise_controller: bool | None = None, seed: int | None = None,
               lora: Mapping[str, float] | None = None) -> list[OutputFrame]:
        """Change knobs live; they apply from the next chunk. Returns frames finished by a step change."""
        self._check_open()
        if prompt is not None or prompt_embeds is not None:
            self.set_prompt_embedding(self._resolve_prompt(prompt, prompt_embeds), transition_chunks, run=False)
        self.engine.update(self.stream, steps=steps, noise_scale=noise_scale, noise_controller=noise_controller,
                           seed=seed, lora=lora)
        return self._run()

    def set_prompt_embedding(self, embedding: torch.Tensor, transition_chunks: int = 0, run: bool = True) -> None:
        """Swap the cross-attention K/V (no re-prepare); with ``transition_chunks`` = K > 0 the embedding is
        interpolated linearly from the current one over the next K chunks."""
        self._check_open()
        self.engine.set_prompt_embedding(self.stream, embedding, transition_chunks)
        if run:
            self.stream.outbox.extend(self._run())
