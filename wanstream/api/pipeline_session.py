"""A live stream over the multi-rank pipeline, with the public API of :class:`wanstream.api.session.StreamSession`.

The session is an engine client like :class:`~wanstream.api.session.StreamSession`; its engine's runner is the
pipeline (:mod:`wanstream.pipeline.runner`). Rank 0 (this process) buffers frames into chunks (5, then 4),
VAE-encodes them, runs the motion-aware noise controller and the first block range; the last rank decodes, and the
decoded frames come back to rank 0 with the re-noised slots, so frames go in and come out here. Every input frame
gets exactly one output frame (:meth:`PipelineSession.flush` pads the last partial chunk and drains the ring).

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

from wanstream.api.session import StreamSession
from wanstream.core.block_scheduler import SchedulerConfig
from wanstream.core.config import CacheConfig
from wanstream.engine.loop import Engine
from wanstream.pipeline.driver import PipelineDriver
from wanstream.pipeline.runner import default_devices, runner_factory


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
        model = driver.model
        try:
            super().__init__(model, prompt=prompt, prompt_embeds=prompt_embeds, width=width, height=height,
                             steps=steps, noise_scale=noise_scale, noise_controller=noise_controller, batch=batch,
                             seed=seed, cache=cache, decoder=decoder,
                             engine=Engine(model, runner_factory=runner_factory(driver, decoder)))
        except BaseException:
            if not driver.closed:
                driver.close()
            raise

    def _check_open(self) -> None:
        if self.closed or self.driver.closed:
            raise RuntimeError("this pipeline session is closed")
        super()._check_open()

    def close(self) -> None:
        """End the stream and stop every rank."""
        super().close()
        if not self.driver.closed:
            self.driver.close()

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
