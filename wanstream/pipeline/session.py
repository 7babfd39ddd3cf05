"""A live stream over the multi-rank pipeline, with the public API of :class:`wanstream.session.StreamSession`.

The session is an engine client like :class:`~wanstream.session.StreamSession`; its engine's runner is the
pipeline. Rank 0 (this process) buffers frames into chunks (5, then 4), VAE-encodes them, runs the motion-aware
noise controller and the first block range; the last rank decodes, and the decoded frames come back to rank 0
with the re-noised slots, so frames go in and come out here. Every input frame gets exactly one output frame
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
from ..engine import Engine
from ..runner import Done, RunnerStream
from ..session import StreamSession
from .driver import PipelineDriver
from .stage import STREAM

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


class PipelineRunner:
    """The engine's runner over a launched pipeline (the interface of :class:`~wanstream.runner.Runner`): rank 0
    (this process) executes each call's first block range and sends it around the ring; the last rank settles the
    rows and decodes; the RETURN brings re-noised rows and finished frames back. The pipeline serves one stream.
    """

    def __init__(self, driver: PipelineDriver, settings: StreamSettings, decoder: str, tokens_per_frame: int):
        self.driver = driver
        self.settings = settings
        self.decoder = decoder
        self.tokens_per_frame = tokens_per_frame
        self._stream: RunnerStream | None = None
        self._embedding: torch.Tensor | None = None
        self._started = False

    @property
    def streams(self) -> dict:
        return self.driver.streams

    @property
    def calls(self) -> int:
        return self.driver.calls

    @property
    def lag(self) -> int:
        return self.driver.lag

    def encoding(self):
        """Encode time counts in rank 0's stage time (the block scheduler balances it)."""
        return self.driver.stage.timer.section("busy")

    def add(self, stream: RunnerStream, rows: int) -> None:
        if self._stream is not None:
            raise ValueError("a pipeline serves one stream")
        self._stream = stream            # the stream starts on every rank with its first prompt

    def remove(self, stream_id) -> None:
        self._stream = None
        self._started = False

    def set_prompt(self, stream_id, embedding: torch.Tensor) -> None:
        self._embedding = embedding
        if self._started:
            self.driver.set_prompt(embedding)
        else:
            self._start()

    def _start(self) -> None:
        st = self.settings
        self.driver.start(self._embedding, tokens_per_frame=self.tokens_per_frame, noise=self._stream.noise,
                          renoise_seed=renoise_seed(st.seed), steps=st.steps, batch=st.batch, cache=st.cache,
                          decode=self.decoder)
        self.driver.streams[STREAM] = self._stream
        self._started = True

    def reset(self, stream_id, rows: int) -> None:
        self._stream.inputs.clear()
        self._stream.latents.clear()
        self._start()

    def reseed(self, stream_id, seed: int) -> None:
        self.driver.reseed(self._stream.noise, renoise_seed(seed))

    def run(self, call) -> list[Done]:
        return [Done(f.row, f.latent, f.frames) for f in self.driver.execute(call)]

    def pending(self) -> list[Done]:
        return [Done(f.row, f.latent, f.frames) for f in self.driver.collect()]


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
        settings = StreamSettings(steps=steps, noise_scale=noise_scale, noise_controller=noise_controller,
                                  batch=batch, seed=seed, cache=cache or CacheConfig())
        model = driver.model

        def runner(engine, w, h, cache_config):
            return PipelineRunner(driver, settings, decoder, model.tokens_per_frame(h, w))
        try:
            super().__init__(model, prompt=prompt, prompt_embeds=prompt_embeds, width=width, height=height,
                             steps=steps, noise_scale=noise_scale, noise_controller=noise_controller, batch=batch,
                             seed=seed, cache=cache, decoder=decoder, engine=Engine(model, runner_factory=runner))
            self.stream.settings = settings             # the runner reads the stream's live settings
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
