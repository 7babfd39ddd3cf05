"""One stream inside an engine: its tensor-side state and the live changes waiting for the next tick.

:class:`EngineStream` holds what the engine computes with for one stream — prompt (and a running transition),
motion-aware noise controller and the previous frame it compares against, streaming VAE encoder / decoder caches,
the output frames waiting to be collected, and the live changes queued from other threads. Its host-side schedule
(stream-batch registers, chunk numbering, queue, counters) is the planner's record (``record``,
:class:`~wanstream.core.planner.PlannedStream`); its noise sources and cache rows are the runner's. Each thing has
one holder.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from wanstream.core.chunking import ChunkBuffer, ChunkInfo
from wanstream.core.config import StreamSettings
from wanstream.core.planner import PlannedStream, StreamStats
from wanstream.core.schedule import StreamSchedule
from wanstream.engine.noise_controller import NoiseController


@dataclass
class OutputFrame:
    image: np.ndarray    # [H, W, 3] uint8
    index: int           # the frame id of the input frame it restyles (its input index unless the caller gave one)
    timestamp: float     # that input frame's timestamp


class StreamFailed(RuntimeError):
    """A stream ended with an error (its own work failed); other streams are unaffected."""


class EngineStream:
    """One stream of an :class:`~wanstream.engine.loop.Engine` (see the module docstring)."""

    def __init__(self, sid: int, group, record: PlannedStream, *, width: int, height: int, decoder: str,
                 embedding: torch.Tensor, fit: str = "crop", encoder: str = "vae"):
        self.id = sid
        self.group = group
        self.record = record
        self.width, self.height = width, height
        self.fit = fit                 # framing of input frames of another aspect (io.video.fit_frames)
        self.decoder = decoder         # the decoder in use: its own, or "taehv" on a degradation rung (core.slack)
        self.own_decoder = decoder
        self.encoder = encoder         # "vae" | "taehv" (streams of any encoder / decoder mix share DiT calls)
        self.alt_dec_state = None      # its own decoder's state while TAEHV decodes a degraded stretch
        self.outbox: deque[OutputFrame] = deque()
        self.closed = False
        self.error: str | None = None
        self.embedding = embedding     # the prompt embedding it converges to (the end of a transition)
        self.transition: tuple[torch.Tensor, torch.Tensor, int, int] | None = None   # (from, to, chunk k, of K)
        self._updates: deque[tuple[str, object]] = deque()
        self._lock = threading.Lock()
        self.controller = NoiseController(self.settings.noise_scale, enabled=self.settings.noise_controller)
        self.prev_frame: torch.Tensor | None = None
        self.enc_state = self.dec_state = None
        self.chunks: dict[int, ChunkInfo] = {}      # chunks in the model: what their output frames report
        self.drift = None                           # its drift watchdog (engine/drift.py), when the engine has one

    # ------------------------------------------------------------------------------------------ host state
    @property
    def settings(self) -> StreamSettings:
        return self.record.settings

    @property
    def buffer(self) -> ChunkBuffer:
        return self.record.buffer

    @property
    def schedule(self) -> StreamSchedule:
        return self.record.schedule

    @property
    def stats(self) -> StreamStats:
        return self.record.stats

    @property
    def target_latency_s(self) -> float | None:
        return self.record.target_latency_s

    @property
    def prepared(self) -> bool:
        return self.schedule.prepared

    @property
    def finishing(self) -> bool:
        return self.record.finishing

    @property
    def frames_in(self) -> int:
        return self.buffer.frames_in

    @property
    def in_flight_frames(self) -> int:
        """Input frames taken by the model whose output has not come out yet."""
        return sum(info.real for info in self.chunks.values())

    # ------------------------------------------------------------------------------------------ tensor state
    def fresh(self, vae, taehv=None) -> None:
        """A new stream (also a reset): controller, encoder and decoder caches (its own decoder), no chunk in the
        model."""
        self.controller.reset()
        self.prev_frame = None
        self.decoder, self.alt_dec_state = self.own_decoder, None
        if self.encoder == "vae":
            self.enc_state = vae.new_state()
        else:
            from wanstream.core.config import LATENT_MEAN, LATENT_STD
            from wanstream.models.taehv import TAEHVStreamEncoder
            # TAEHV latents mapped to the Wan encoder's un-normalised mean: the DiT's input convention here
            self.enc_state = TAEHVStreamEncoder(taehv, LATENT_MEAN, LATENT_STD)
        if self.decoder == "vae":
            self.dec_state = vae.new_state()
        else:
            from wanstream.models.taehv import TAEHVStreamDecoder
            self.dec_state = TAEHVStreamDecoder(taehv)
        self.chunks.clear()

    # ------------------------------------------------------------------------------------------ outputs
    def take_outputs(self) -> list[OutputFrame]:
        out = []
        while self.outbox:
            out.append(self.outbox.popleft())
        return out

    # ------------------------------------------------------------------------------------------ live changes
    def queue_update(self, kind: str, value) -> None:
        with self._lock:
            self._updates.append((kind, value))

    def pop_updates(self) -> list[tuple[str, object]]:
        with self._lock:
            out = list(self._updates)
            self._updates.clear()
        return out

    def switch_decoder(self, decoder: str, taehv) -> None:
        """A degradation rung's decoder (``"taehv"``: the tiny decoder continues the stream from its next chunk,
        the own decoder's state is kept aside) or the stream's own again (``"own"``: it goes on from where it was
        left; the chunks decoded meanwhile are not in its causal history)."""
        if decoder == "own" or decoder == self.own_decoder:
            if self.alt_dec_state is not None:
                self.dec_state, self.alt_dec_state = self.alt_dec_state, None
            self.decoder = self.own_decoder
            return
        if self.decoder == decoder:
            return
        from wanstream.models.taehv import TAEHVStreamDecoder
        dec = TAEHVStreamDecoder(taehv)
        if not getattr(self.dec_state, "first_decode", True):       # mid-stream: no start-of-stream frames to drop
            dec.frames_to_drop = 0
        self.alt_dec_state, self.dec_state = self.dec_state, dec
        self.decoder = decoder

    def pending_updates(self) -> bool:
        """Live changes wait for the next tick."""
        with self._lock:
            return bool(self._updates)

    def has_work(self) -> bool:
        with self._lock:
            pending = bool(self._updates)
        return not self.closed and (pending or self.finishing or self.buffer.ready())
