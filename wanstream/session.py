"""One live stream: the public Python API of wanstream.

A :class:`StreamSession` takes frames in any count, buffers them into chunks (5 frames for the first, then
4), encodes each chunk with the streaming VAE, picks its noise level with the motion-aware controller,
denoises it in the stream batch and decodes finished chunks. Output frames carry the index and timestamp
of the input frame they restyle; at the end of the input, :meth:`flush` returns the rest, so every input
frame gets exactly one output frame. Prompt, steps, noise scale, controller and seed can change live; they
apply from the next chunk. Each session owns all of its state (caches, VAE caches, controller, noise), so
sessions served by one model never share anything but the weights.

    model = load_model("models/tiny")
    session = StreamSession(model, prompt="a watercolor painting", width=512, height=512, steps=2, seed=1)
    for out in session.push(frames):          # frames: uint8 [N, H, W, 3]
        show(out.image, out.timestamp)
    rest = session.flush()
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .config import CacheConfig, StreamSettings
from .io.video import frames_to_tensor, resize_frames, tensor_to_frames
from .models.loader import ModelBundle
from .noise import NoiseSource, SeededNoise
from .noise_controller import NoiseController
from .stream_batch import LatentStream


@dataclass
class OutputFrame:
    image: np.ndarray    # [H, W, 3] uint8
    index: int           # index of the input frame it restyles
    timestamp: float     # that input frame's timestamp


@dataclass
class _ChunkInfo:
    indices: list[int]
    timestamps: list[float]
    real: int            # frames of the chunk that were real input (the rest is end-of-stream padding)


class LocalDenoiser:
    """Single-device denoiser of a session: a :class:`LatentStream` plus the streaming decoder (Wan VAE or
    TAEHV). Finished chunks come back as ``(chunk, uint8 frames [T, H, W, 3])``. The multi-GPU pipeline
    provides the same interface (``wanstream.pipeline.session``)."""

    def __init__(self, model: ModelBundle, settings: StreamSettings, decoder: str):
        if decoder == "taehv" and model.taehv is None:
            raise ValueError("decoder='taehv' needs a model loaded with taehv=True")
        self.model = model
        self.settings = settings
        self.decoder = decoder
        self.stream: LatentStream | None = None

    def start(self, embedding: torch.Tensor, noise: NoiseSource, tokens_per_frame: int) -> None:
        """A new stream (also a reset): fresh cache, registers and decoder state."""
        self.kv = self.model.dit.embed_prompt(embedding)
        self.noise = noise
        self.tokens_per_frame = tokens_per_frame
        self.stream = None
        if self.decoder == "vae":
            self.dec_state = self.model.vae.new_state()
        else:
            from .models.taehv import TAEHVStreamDecoder
            self.dec_state = TAEHVStreamDecoder(self.model.taehv)

    def prepare(self, z: torch.Tensor, s: float, chunk: int):
        m, st = self.model, self.settings
        self.stream = LatentStream(m.dit, m.sampler, self.kv, self.noise, tokens_per_frame=self.tokens_per_frame,
                                   steps=st.steps, batch=st.batch, cache=st.cache)
        return self._frames([(chunk, self.stream.prepare(z, s))])

    def push(self, z: torch.Tensor, s, t: torch.Tensor, chunk: int):
        return self._frames(self.stream.push(z, s, t, chunk))

    def drain(self):
        return self._frames(self.stream.drain()) if self.stream is not None else []

    def reconfigure(self, steps: int):
        return self._frames(self.stream.reconfigure(steps)) if self.stream is not None else []

    def set_prompt(self, embedding: torch.Tensor) -> None:
        self.kv = self.model.dit.embed_prompt(embedding)
        if self.stream is not None:
            self.stream.prompt = self.kv

    def reseed(self, noise: NoiseSource, seed: int) -> None:
        self.noise = noise
        if self.stream is not None:
            self.stream.noise = noise

    def close(self) -> None:
        self.stream = None

    def _frames(self, finished):
        out = []
        for chunk, latent in finished:
            if self.decoder == "vae":
                pixels = self.model.vae.decode(self.dec_state, latent)
            else:
                pixels = self.dec_state.decode(latent)
            out.append((chunk, tensor_to_frames(pixels[0])))
        return out


class StreamSession:
    """Video-to-video stream over a shared :class:`ModelBundle`."""

    def __init__(self, model: ModelBundle, *, prompt: str | None = None, prompt_embeds: torch.Tensor | None = None,
                 width: int = 512, height: int = 512, steps: int = 2, noise_scale: float = 0.8,
                 noise_controller: bool = True, batch: bool = True, seed: int = 0, cache: CacheConfig | None = None,
                 decoder: str = "vae", noise: NoiseSource | None = None):
        if width % 16 or height % 16 or width <= 0 or height <= 0:
            raise ValueError(f"resolution must be positive multiples of 16, got {width}x{height}")
        if decoder not in ("vae", "taehv"):
            raise ValueError(f"decoder must be 'vae' or 'taehv', got {decoder!r}")
        self.model = model
        self.width, self.height = width, height
        self.settings = StreamSettings(steps=steps, noise_scale=noise_scale, noise_controller=noise_controller,
                                       batch=batch, seed=seed, cache=cache or CacheConfig())
        self.decoder = decoder
        self._injected_noise = noise
        self._embedding = self._resolve_prompt(prompt, prompt_embeds)
        self._transition: tuple[torch.Tensor, torch.Tensor, int, int] | None = None
        self.closed = False
        self.denoiser = self._make_denoiser()
        self._start()

    # ----------------------------------------------------------------- lifecycle
    def _make_denoiser(self) -> LocalDenoiser:
        return LocalDenoiser(self.model, self.settings, self.decoder)

    def _start(self) -> None:
        m = self.model
        self.noise = self._injected_noise or SeededNoise(self.settings.seed, m.device)
        self.controller = NoiseController(self.settings.noise_scale, enabled=self.settings.noise_controller)
        self.vae_state = m.vae.new_state()
        self.denoiser.start(self._embedding, self.noise, m.tokens_per_frame(self.height, self.width))
        self._prepared = False
        self._pending: list[tuple[torch.Tensor, int, float]] = []
        self._chunks: dict[int, _ChunkInfo] = {}
        self._next_chunk = 0
        self._prev_frame: torch.Tensor | None = None
        self.frames_in = 0
        self.frames_out = 0

    def reset(self) -> None:
        """Start over on the next frame (fresh caches, re-prepare); queued frames are discarded."""
        self._check_open()
        self._start()

    def close(self) -> None:
        """Release this stream's caches; the session cannot be used afterwards."""
        self.denoiser.close()
        self._pending.clear()
        self._chunks.clear()
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this stream session is closed")

    # -------------------------------------------------------------------- inputs
    def _resolve_prompt(self, prompt: str | None, embeds: torch.Tensor | None) -> torch.Tensor:
        if embeds is not None:
            embeds = torch.as_tensor(embeds)
            if embeds.ndim == 2:
                embeds = embeds[None]
            if embeds.ndim != 3 or embeds.shape[0] != 1 or embeds.shape[2] != self.model.dit.transformer.config.text_dim:
                raise ValueError(f"prompt embedding must be [L, {self.model.dit.transformer.config.text_dim}], "
                                 f"got {tuple(embeds.shape)}")
            if embeds.shape[1] > self.model.dit.text_len:
                raise ValueError(f"prompt embedding has {embeds.shape[1]} rows, at most "
                                 f"{self.model.dit.text_len} allowed")
        elif prompt is None:
            raise ValueError("give a prompt (text) or a prompt embedding")
        else:
            embeds = self.model.prompt_embedding(prompt)
        # zero rows up to the text length, as the encoder's output has, so embeddings can be blended
        embeds = torch.nn.functional.pad(embeds, (0, 0, 0, self.model.dit.text_len - embeds.shape[1]))
        return embeds.to(self.model.device, self.model.dtype)

    def _to_tensor(self, frames) -> torch.Tensor:
        arr = np.asarray(frames)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [N, H, W, 3] or [H, W, 3], got shape {arr.shape}")
        if arr.dtype != np.uint8:
            raise ValueError(f"frames must be uint8, got {arr.dtype}")
        if arr.shape[1:3] != (self.height, self.width):
            arr = resize_frames(arr, self.width, self.height)
        return frames_to_tensor(arr).to(self.model.device, self.model.dtype)

    def push(self, frames, timestamps: Sequence[float] | None = None) -> list[OutputFrame]:
        """Add frames (uint8 ``[N, H, W, 3]``, any N, any size: resized to the session resolution).

        Returns the output frames that became ready.
        """
        self._check_open()
        x = self._to_tensor(frames)
        now = time.perf_counter()
        if timestamps is None:
            timestamps = [now] * x.shape[0]
        if len(timestamps) != x.shape[0]:
            raise ValueError(f"got {x.shape[0]} frames but {len(timestamps)} timestamps")
        for frame, ts in zip(x, timestamps):
            self._pending.append((frame, self.frames_in, float(ts)))
            self.frames_in += 1
        out: list[OutputFrame] = []
        while len(self._pending) >= self._chunk_len():
            out += self._process(self._chunk_len(), real=self._chunk_len())
        return out

    def flush(self) -> list[OutputFrame]:
        """End of input: pad the last partial chunk (repeating its last frame), finish every in-flight chunk.

        Every input frame pushed so far has exactly one output frame once this returns.
        """
        self._check_open()
        out: list[OutputFrame] = []
        if self._pending:
            real = len(self._pending)
            last = self._pending[-1]
            self._pending += [(last[0], -1, last[2])] * (self._chunk_len() - real)
            out += self._process(self._chunk_len(), real=real)
        if self._prepared:
            out += self._emit(self.denoiser.drain())
        return out

    def _chunk_len(self) -> int:
        return 4 if self._prepared else 5

    # -------------------------------------------------------------- live changes
    def update(self, *, prompt: str | None = None, prompt_embeds: torch.Tensor | None = None,
               transition_chunks: int = 0, steps: int | None = None, noise_scale: float | None = None,
               noise_controller: bool | None = None, seed: int | None = None) -> list[OutputFrame]:
        """Change knobs live; they apply from the next chunk. Returns frames finished by a step change."""
        self._check_open()
        out: list[OutputFrame] = []
        if prompt is not None or prompt_embeds is not None:
            self.set_prompt_embedding(self._resolve_prompt(prompt, prompt_embeds), transition_chunks)
        if noise_scale is not None:
            StreamSettings(noise_scale=noise_scale)  # validates
            self.settings.noise_scale = float(noise_scale)
            self.controller.s_init = float(noise_scale)
        if noise_controller is not None:
            self.settings.noise_controller = bool(noise_controller)
            self.controller.enabled = bool(noise_controller)
        if seed is not None:
            self.settings.seed = int(seed)
            if self._injected_noise is None:
                self.noise = SeededNoise(self.settings.seed, self.model.device)
                self.denoiser.reseed(self.noise, self.settings.seed)
        if steps is not None:
            StreamSettings(steps=steps)  # validates
            self.settings.steps = int(steps)
            out += self._emit(self.denoiser.reconfigure(int(steps)))
        return out

    def set_prompt_embedding(self, embedding: torch.Tensor, transition_chunks: int = 0) -> None:
        """Swap the cross-attention K/V (no re-prepare); with ``transition_chunks`` = K > 0 the embedding is
        interpolated linearly from the current one over the next K chunks."""
        embedding = embedding.to(self.model.device, self.model.dtype)
        if transition_chunks > 0:
            self._transition = (self._embedding, embedding, 0, int(transition_chunks))
        else:
            self._transition = None
            self.denoiser.set_prompt(embedding)
        self._embedding = embedding

    def _advance_transition(self) -> None:
        if self._transition is None:
            return
        start, end, k, total = self._transition
        k += 1
        w = k / total
        self.denoiser.set_prompt(torch.lerp(start.float(), end.float(), w).to(end.dtype))
        self._transition = None if k >= total else (start, end, k, total)

    # ---------------------------------------------------------------- processing
    def _process(self, n: int, real: int) -> list[OutputFrame]:
        taken, self._pending = self._pending[:n], self._pending[n:]
        frames = torch.stack([f for f, _, _ in taken])                        # [T, 3, H, W]
        info = _ChunkInfo([i for _, i, _ in taken], [ts for _, _, ts in taken], real)
        cid = self._next_chunk
        self._next_chunk += 1
        self._chunks[cid] = info
        self._advance_transition()
        z = self._encode(frames)
        if not self._prepared:
            finished = self.denoiser.prepare(z, self.settings.noise_scale, cid)
            self.controller.reset()
            self._prepared = True
        else:
            s, t = self.controller(self._prev_frame[None], frames[None])
            finished = self.denoiser.push(z, s, t, cid)
        self._prev_frame = frames[-1]
        return self._emit(finished)

    def _encode(self, frames: torch.Tensor) -> torch.Tensor:
        return self.model.vae.encode(self.vae_state, frames[None])

    def _emit(self, finished) -> list[OutputFrame]:
        out: list[OutputFrame] = []
        for cid, images in finished:
            info = self._chunks.pop(cid)
            for img, idx, ts in zip(images[: info.real], info.indices, info.timestamps):
                out.append(OutputFrame(img, idx, ts))
        self.frames_out += len(out)
        return out
