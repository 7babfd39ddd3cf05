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

from pathlib import Path
from typing import Sequence

import torch

from ..block_scheduler import SchedulerConfig
from ..config import CacheConfig, StreamSettings
from ..noise import NoiseSource
from ..session import StreamSession
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


class PipelineDenoiser:
    """The denoiser interface of :class:`~wanstream.session.LocalDenoiser` over a launched pipeline: the last
    rank decodes, finished chunks come back to rank 0 as uint8 frames."""

    def __init__(self, driver: PipelineDriver, settings: StreamSettings, decoder: str):
        self.driver = driver
        self.settings = settings
        self.decoder = decoder

    def start(self, embedding: torch.Tensor, noise: NoiseSource, tokens_per_frame: int) -> None:
        st = self.settings
        self.driver.start(embedding, tokens_per_frame=tokens_per_frame, noise=noise,
                          renoise_seed=renoise_seed(st.seed), steps=st.steps, batch=st.batch, cache=st.cache,
                          decode=self.decoder)

    def prepare(self, z: torch.Tensor, s: float, chunk: int):
        return self._frames([self.driver.prepare(z, s, chunk=chunk)])

    def push(self, z: torch.Tensor, s, t: torch.Tensor, chunk: int):
        return self._frames(self.driver.push(z, s, t, chunk))

    def drain(self):
        return self._frames(self.driver.drain())

    def reconfigure(self, steps: int):
        return self._frames(self.driver.reconfigure(steps))

    def set_prompt(self, embedding: torch.Tensor) -> None:
        self.driver.set_prompt(embedding)

    def reseed(self, noise: NoiseSource, seed: int) -> None:
        self.driver.reseed(noise, renoise_seed(seed))

    def close(self) -> None:
        if not self.driver.closed:
            self.driver.close()

    @staticmethod
    def _frames(finished):
        return [(f.chunk, f.frames.cpu().numpy()) for f in finished]


class PipelineSession(StreamSession):
    """Video-to-video stream on a W-rank pipeline (see the module docstring); the API of ``StreamSession``."""

    def __init__(self, model_dir: str | Path | None = None, *, devices: Sequence[str] | None = None,
                 world: int | None = None, prompt: str | None = None, prompt_embeds: torch.Tensor | None = None,
                 width: int = 512, height: int = 512, steps: int = 2, noise_scale: float = 0.8,
                 noise_controller: bool = True, batch: bool = True, seed: int = 0, cache: CacheConfig | None = None,
                 decoder: str = "vae", split=None, rebalance: bool | SchedulerConfig = True,
                 dtype: torch.dtype | None = None, timeout: float = 120.0, dead_after: float = 10.0,
                 threads: int | None = None, driver: PipelineDriver | None = None):
        if prompt is None and prompt_embeds is None:
            raise ValueError("give a prompt (text) or a prompt embedding")
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
        if driver.model.vae is None:
            raise ValueError("rank 0 needs the VAE to encode frames (launch with vae=True)")
        try:
            super().__init__(driver.model, prompt=prompt, prompt_embeds=prompt_embeds, width=width, height=height,
                             steps=steps, noise_scale=noise_scale, noise_controller=noise_controller, batch=batch,
                             seed=seed, cache=cache, decoder=decoder)
        except BaseException:
            if not driver.closed:
                driver.close()
            raise

    def _make_denoiser(self) -> PipelineDenoiser:
        return PipelineDenoiser(self.driver, self.settings, self.decoder)

    def _encode(self, frames: torch.Tensor) -> torch.Tensor:
        with self.driver.stage.timer.section("busy"):     # encode time counts in rank 0's stage time
            return super()._encode(frames)

    def _check_open(self) -> None:
        if self.closed or self.driver.closed:
            raise RuntimeError("this pipeline session is closed")

    def __exit__(self, *exc):
        if exc[0] is None:
            return super().__exit__(*exc)
        self.closed = True
        self.driver._abort(exc[1])    # an error on rank 0 stops every rank at once
        return False

    @property
    def split(self) -> list[tuple[int, int]]:
        return self.driver.split

    @property
    def moves(self):
        return self.driver.moves
