"""A live stream over the multi-rank pipeline, with the public API of :class:`wanstream.session.StreamSession`.

Rank 0 (this process) buffers frames into chunks (5, then 4), VAE-encodes them, runs the motion-aware noise
controller and the first block range; the last rank decodes, and the decoded frames come back to rank 0 with
the re-noised slots, so frames go in and come out here. Every input frame gets exactly one output frame
(:meth:`PipelineSession.flush` pads the last partial chunk and drains the ring).

    session = PipelineSession("models/sdv2-1.3b", devices=["cuda:0", "cuda:1"], prompt="a watercolor painting")
    for out in session.push(frames):
        show(out.image)
    rest = session.flush()
    session.close()

Randomness: the mixing noise comes from ``SeededNoise(seed)`` on rank 0, the re-noising noise from
``SeededNoise(renoise_seed(seed))`` on the last rank.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..block_scheduler import SchedulerConfig
from ..config import CacheConfig, StreamSettings
from ..io.video import frames_to_tensor, resize_frames
from ..noise import SeededNoise
from ..noise_controller import NoiseController
from ..session import OutputFrame
from .driver import PipelineDriver

RENOISE_SEED_OFFSET = 1_000_003


def renoise_seed(seed: int) -> int:
    """Seed of the last rank's re-noising source for a stream seeded with ``seed``."""
    return int(seed) + RENOISE_SEED_OFFSET


def default_devices(world: int, device: str | None = None) -> list[str]:
    """``world`` devices: cuda:k .. cuda:k+W-1 for a CUDA device (default when available), else cpu × W."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        first = dev.index or 0
        return [f"cuda:{first + i}" for i in range(world)]
    return [str(dev)] * world


class PipelineSession:
    """Video-to-video stream on a W-rank pipeline (see the module docstring)."""

    def __init__(self, model_dir: str | Path | None = None, *, devices: Sequence[str] | None = None,
                 world: int | None = None, prompt: str | None = None, prompt_embeds: torch.Tensor | None = None,
                 width: int = 512, height: int = 512, steps: int = 2, noise_scale: float = 0.8,
                 noise_controller: bool = True, batch: bool = True, seed: int = 0, cache: CacheConfig | None = None,
                 decoder: str = "vae", split=None, rebalance: bool | SchedulerConfig = True,
                 dtype: torch.dtype | None = None, timeout: float = 120.0, dead_after: float = 10.0,
                 threads: int | None = None, driver: PipelineDriver | None = None):
        if width % 16 or height % 16 or width <= 0 or height <= 0:
            raise ValueError(f"resolution must be positive multiples of 16, got {width}x{height}")
        if decoder not in ("vae", "taehv"):
            raise ValueError(f"decoder must be 'vae' or 'taehv', got {decoder!r}")
        if prompt is None and prompt_embeds is None:
            raise ValueError("give a prompt (text) or a prompt embedding")
        self.width, self.height = width, height
        self.settings = StreamSettings(steps=steps, noise_scale=noise_scale, noise_controller=noise_controller,
                                       batch=batch, seed=seed, cache=cache or CacheConfig())
        self.decoder = decoder
        if driver is None:
            if model_dir is None:
                raise ValueError("give a model folder (or a launched driver)")
            if devices is None:
                if not world:
                    raise ValueError("give the devices (one per rank) or the number of ranks")
                devices = default_devices(world)
            schedule = rebalance if isinstance(rebalance, SchedulerConfig) else (SchedulerConfig() if rebalance
                                                                                 else None)
            driver = PipelineDriver.launch(model_dir, list(devices), split=split, dtype=dtype, decode=decoder,
                                           vae=True, text_encoder=prompt_embeds is None, schedule=schedule,
                                           timeout=timeout, dead_after=dead_after, threads=threads)
        self.driver = driver
        self.model = driver.model
        if self.model.vae is None:
            raise ValueError("rank 0 needs the VAE to encode frames (launch with vae=True)")
        self.closed = False
        try:
            self._embedding = self._resolve_prompt(prompt, prompt_embeds)
            self._transition = None
            self._start()
        except BaseException:
            self.driver.close() if not self.driver.closed else None
            raise

    # ----------------------------------------------------------------- lifecycle
    def _start(self) -> None:
        m = self.model
        self.noise = SeededNoise(self.settings.seed, m.device)
        self.controller = NoiseController(self.settings.noise_scale, enabled=self.settings.noise_controller)
        self.vae_state = m.vae.new_state()
        self._pending: list[tuple[torch.Tensor, int, float]] = []
        self._chunks: dict[int, tuple[list[int], list[float], int]] = {}
        self._next_chunk = 0
        self._prev_frame: torch.Tensor | None = None
        self._prepared = False
        self.frames_in = 0
        self.frames_out = 0
        self.driver.start(self._embedding, tokens_per_frame=m.tokens_per_frame(self.height, self.width),
                          noise=self.noise, renoise_seed=renoise_seed(self.settings.seed), steps=self.settings.steps,
                          batch=self.settings.batch, cache=self.settings.cache, decode=self.decoder)

    def reset(self) -> None:
        """Start over on the next frame (fresh caches on every rank, re-prepare); queued frames are dropped."""
        self._check_open()
        self._start()

    def close(self) -> None:
        """Stop every rank of the pipeline."""
        if not self.closed:
            self.closed = True
            self.driver.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self.closed = True
            self.driver._abort(exc[1])
        return False

    def _check_open(self) -> None:
        if self.closed or self.driver.closed:
            raise RuntimeError("this pipeline session is closed")

    @property
    def split(self) -> list[tuple[int, int]]:
        return self.driver.split

    @property
    def moves(self):
        return self.driver.moves

    # -------------------------------------------------------------------- inputs
    def _resolve_prompt(self, prompt: str | None, embeds: torch.Tensor | None) -> torch.Tensor:
        text_dim = self.model.dit.transformer.config.text_dim
        if embeds is not None:
            embeds = torch.as_tensor(embeds)
            if embeds.ndim == 2:
                embeds = embeds[None]
            if embeds.ndim != 3 or embeds.shape[0] != 1 or embeds.shape[2] != text_dim:
                raise ValueError(f"prompt embedding must be [L, {text_dim}], got {tuple(embeds.shape)}")
            return embeds.to(self.model.device, self.model.dtype)
        if prompt is None:
            raise ValueError("give a prompt (text) or a prompt embedding")
        return self.model.prompt_embedding(prompt).to(self.model.device, self.model.dtype)

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
        """Add frames (uint8 ``[N, H, W, 3]``); returns the output frames that came back meanwhile."""
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
        """End of input: pad the last partial chunk, finish every in-flight chunk on every rank."""
        self._check_open()
        out: list[OutputFrame] = []
        if self._pending:
            real = len(self._pending)
            last = self._pending[-1]
            self._pending += [(last[0], -1, last[2])] * (self._chunk_len() - real)
            out += self._process(self._chunk_len(), real=real)
        if self._prepared:
            out += self._emit(self.driver.drain())
        return out

    def _chunk_len(self) -> int:
        return 4 if self._prepared else 5

    # -------------------------------------------------------------- live changes
    def update(self, *, prompt: str | None = None, prompt_embeds: torch.Tensor | None = None,
               transition_chunks: int = 0, steps: int | None = None, noise_scale: float | None = None,
               noise_controller: bool | None = None, seed: int | None = None) -> list[OutputFrame]:
        """Change knobs live; they apply from the next chunk on every rank. Returns frames finished by a step
        change (the ring is drained first)."""
        self._check_open()
        out: list[OutputFrame] = []
        if prompt is not None or prompt_embeds is not None:
            self.set_prompt_embedding(self._resolve_prompt(prompt, prompt_embeds), transition_chunks)
        if noise_scale is not None:
            StreamSettings(noise_scale=noise_scale)
            self.settings.noise_scale = float(noise_scale)
            self.controller.s_init = float(noise_scale)
        if noise_controller is not None:
            self.settings.noise_controller = bool(noise_controller)
            self.controller.enabled = bool(noise_controller)
        if seed is not None:
            self.settings.seed = int(seed)
            self.noise = SeededNoise(self.settings.seed, self.model.device)
            self.driver.reseed(self.noise, renoise_seed(self.settings.seed))
        if steps is not None:
            StreamSettings(steps=steps)
            self.settings.steps = int(steps)
            out += self._emit(self.driver.reconfigure(int(steps)))
        return out

    def set_prompt_embedding(self, embedding: torch.Tensor, transition_chunks: int = 0) -> None:
        embedding = embedding.to(self.model.device, self.model.dtype)
        if transition_chunks > 0:
            self._transition = (self._embedding, embedding, 0, int(transition_chunks))
        else:
            self._transition = None
            self.driver.set_prompt(embedding)
        self._embedding = embedding

    def _advance_transition(self) -> None:
        if self._transition is None:
            return
        start, end, k, total = self._transition
        k += 1
        self.driver.set_prompt(torch.lerp(start.float(), end.float(), k / total).to(end.dtype))
        self._transition = None if k >= total else (start, end, k, total)

    # ---------------------------------------------------------------- processing
    def _process(self, n: int, real: int) -> list[OutputFrame]:
        taken, self._pending = self._pending[:n], self._pending[n:]
        frames = torch.stack([f for f, _, _ in taken])
        cid = self._next_chunk
        self._next_chunk += 1
        self._chunks[cid] = ([i for _, i, _ in taken], [ts for _, _, ts in taken], real)
        self._advance_transition()
        with self.driver.stage.timer.section("busy"):     # encode time counts in rank 0's stage time
            z = self.model.vae.encode(self.vae_state, frames[None])
        if not self._prepared:
            finished = [self.driver.prepare(z, self.settings.noise_scale, chunk=cid)]
            self.controller.reset()
            self._prepared = True
        else:
            s, t = self.controller(self._prev_frame[None], frames[None])
            finished = self.driver.push(z, s, t, cid)
        self._prev_frame = frames[-1]
        return self._emit(finished)

    def _emit(self, finished) -> list[OutputFrame]:
        out: list[OutputFrame] = []
        for f in finished:
            indices, stamps, real = self._chunks.pop(f.chunk)
            images = f.frames.cpu().numpy()
            for img, idx, ts in zip(images[:real], indices, stamps):
                out.append(OutputFrame(img, idx, ts))
        self.frames_out += len(out)
        return out
