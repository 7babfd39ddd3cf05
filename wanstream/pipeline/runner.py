"""The engine's runner over the multi-rank pipeline (:class:`PipelineRunner`, the interface of
:class:`~wanstream.engine.runner.Runner`): rank 0 (this process) runs each call's first block range and sends it
around the ring; the last rank settles the rows and decodes; the RETURN brings re-noised rows and finished frames
back. ``Engine(model, runner_factory=runner_factory(driver))`` puts an engine's streams on the ring — the only way
the product drives it (``serve --pipeline``, ``v2v --gpus``); the public client is
:class:`wanstream.api.pipeline_session.PipelineSession`. Imports ``core``, ``engine`` and :mod:`.driver`; never
``api`` or above.
"""

from __future__ import annotations

import logging

import torch

from wanstream.core.config import CacheConfig
from wanstream.engine.loop import Engine
from wanstream.engine.noise import renoise_seed
from wanstream.engine.runner import ChunkInput, Done, RunnerStream
from wanstream.pipeline.driver import PipelineDriver

log = logging.getLogger("wanstream.pipeline")


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
    """The engine's runner over a launched pipeline (the interface of :class:`~wanstream.engine.runner.Runner`): rank 0
    (this process) executes each call's first block range and sends it around the ring; the last rank settles the
    rows and decodes; the RETURN brings re-noised rows and finished frames back. Every stream of the engine's
    group runs on the pipeline, batched in the engine's calls; a stream is opened on the ranks before its first
    call (its seed is the engine stream's then).
    """

    def __init__(self, driver: PipelineDriver, engine: Engine, decoder: str, tokens_per_frame: int,
                 cache: CacheConfig):
        if not engine.backbone.stream_batch:
            raise ValueError(f"the multi-GPU ring runs the stream batch (StreamDiffusionV2); {engine.backbone.title} "
                             f"runs its blocks in turn with a context pass — serve it on one GPU")
        self.driver = driver
        self.engine = engine                          # a failed ring ends every stream of this engine
        self.decoder = decoder
        self.tokens_per_frame = tokens_per_frame
        self.cache = cache
        self.streams: dict = {}                       # every stream of the group (rank 0 holds the opened ones)
        self._waiting: dict = {}                      # stream id → [rows, prompt]: not opened on the ranks yet

    @property
    def calls(self) -> int:
        return self.driver.calls

    @property
    def lag(self) -> int:
        return self.driver.lag

    def encoding(self):
        """Encode time counts in rank 0's stage time (the block scheduler balances it)."""
        return self.driver.stage.timer.section("busy")

    def _seed(self, stream_id) -> int:
        """The re-noising seed of a stream: its source lives on the last rank."""
        return renoise_seed(self.streams[stream_id].seed)

    def add(self, stream: RunnerStream, rows: int) -> None:
        if stream.id in self.streams:
            raise ValueError(f"stream {stream.id!r} is already in this runner")
        if stream.lora is not None:
            raise ValueError("the pipeline does not run LoRAs")
        if stream.seed is None:
            raise ValueError("a pipeline stream needs seeded noise (its re-noising runs on the last rank)")
        self.streams[stream.id] = stream
        self._waiting[stream.id] = [rows, None]

    def _open(self, stream_id) -> None:
        rows, prompt = self._waiting.pop(stream_id)
        self.driver.open_stream(self.streams[stream_id], rows, prompt, renoise_seed=self._seed(stream_id),
                                tokens_per_frame=self.tokens_per_frame, cache=self.cache, decode=self.decoder)

    def remove(self, stream_id) -> None:
        self.streams.pop(stream_id, None)
        if self._waiting.pop(stream_id, None) is None and not self.driver.closed:
            try:
                self.driver.close_stream(stream_id)
            except Exception:  # noqa: BLE001 - the pipeline failed meanwhile: it stopped, its error is recorded
                log.warning("closing stream %s: the pipeline failed: %s", stream_id, self.driver.error)

    def set_prompt(self, stream_id, embedding: torch.Tensor) -> None:
        if stream_id in self._waiting:
            self._waiting[stream_id][1] = embedding
        else:
            self.driver.set_prompt(stream_id, embedding)

    def set_lora(self, stream_id, strengths) -> None:
        if strengths is not None:
            raise ValueError("the pipeline does not run LoRAs")

    def reset(self, stream_id, rows: int) -> None:
        st = self.streams[stream_id]
        st.reseed(st.seed, self.driver.device)
        if stream_id in self._waiting:
            st.inputs.clear()
            st.latents.clear()
            self._waiting[stream_id][0] = rows
        else:
            self.driver.reset_stream(stream_id, rows, self._seed(stream_id))

    def reseed(self, stream_id, seed: int) -> None:
        st = self.streams[stream_id]
        st.reseed(seed, self.driver.device)
        if stream_id not in self._waiting:          # (a waiting stream opens with its seed then)
            self.driver.reseed(stream_id, renoise_seed(seed))

    def enter(self, stream_id, chunk, inp: ChunkInput) -> None:
        self.streams[stream_id].inputs[chunk] = inp

    def run(self, call) -> list[Done]:
        for sid in [r.stream for r in call.rows] + [sid for sid, _ in call.resize]:
            if sid in self._waiting:
                self._open(sid)
        return self.driver.execute(call)

    def pending(self) -> list[Done]:
        if not self.driver.started:
            return []
        try:
            finished = self.driver.collect()
        except Exception as exc:  # noqa: BLE001 - the pipeline failed: every stream on it ends with the reason
            for sid in list(self.streams):
                stream = self.engine.streams.get(sid)
                if stream is not None:
                    self.engine.fail(stream, f"the model failed on this stream (model): {type(exc).__name__}: {exc}")
            return []
        return finished


def runner_factory(driver: PipelineDriver, decoder: str = "vae"):
    """``Engine(model, runner_factory=...)`` over a launched pipeline: the engine's streams run on its ranks (one
    size and cache setting: a second group is refused)."""
    def factory(engine: Engine, width: int, height: int, cache: CacheConfig) -> PipelineRunner:
        if engine.groups:
            raise ValueError(f"the pipeline serves one size and cache setting; {width}x{height} with {cache} "
                             f"would need a second one")
        return PipelineRunner(driver, engine, decoder, driver.model.tokens_per_frame(height, width), cache)
    return factory
