"""Playback-slack scheduling: who waits and who is degraded, decided from each viewer's playout buffer (no torch).

:class:`SlackPolicy` is a tick policy beside :class:`~wanstream.core.scheduler.Scheduler` (the planner takes
either). It keeps today's late-frame drops, and adds two decisions made from each stream's **slack** — the
seconds of video buffered ahead of its viewer (:class:`~wanstream.core.playout.PlayoutBuffer`):

* **Degrade instead of stalling.** When the predicted tick (the latency model's ``L(rows)`` for every ready
  stream's rows) is longer than a stream's chunk period (4 frames at its input rate), the batch cannot keep every
  viewer playing. Then the streams about to stall (slack below the predicted tick plus ``stall_margin_s``), least
  slack first, move one rung down their :func:`ladder` — fewer denoising steps (fewer rows: a shorter tick), then
  the TAEHV decoder where one is loaded — until the predicted tick fits. A stream keeps a rung at least
  ``hold_chunks`` chunks; it climbs back one rung at a time (one stream per tick, most slack first) once the tick
  predicted with the rung restored leaves ``restore_headroom`` of the chunk period free. Every move is recorded
  with its reason.
* **The streams with most slack wait.** When the tick still does not fit and a stream is about to stall (or has
  no output yet: its time to first chunk), streams that can afford a tick without output (slack above two
  predicted ticks plus the margin) are held back, most slack first, never more than ``max_defer`` ticks in a row,
  so the streams in need get a shorter tick.

The ladder has no resolution rung: a stream's KV cache and VAE caches are laid out for its resolution, so a Wan
stream cannot change resolution without starting over (a re-prepare, which loses its cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from wanstream.core.chunking import CHUNK_FRAMES
from wanstream.core.scheduler import Decision, LatencyModel, Scheduler, SLOConfig, StreamView


@dataclass(frozen=True)
class Rung:
    """One rung of a stream's degradation ladder."""

    steps: int              # denoising steps
    decoder: str = "own"    # "own": the stream's decoder; "taehv": the tiny decoder

    def describe(self) -> str:
        return f"{self.steps} step{'s' if self.steps > 1 else ''}" + (", TAEHV decode" if self.decoder == "taehv"
                                                                       else "")


def ladder(steps: int, cheap_decoder: bool = False) -> list[Rung]:
    """The rungs of a stream asked for ``steps`` steps, best first: one step fewer per rung down to one, then
    (``cheap_decoder``: a TAEHV decoder is loaded and the stream decodes with the VAE) TAEHV decoding."""
    rungs = [Rung(k) for k in range(int(steps), 0, -1)]
    if cheap_decoder:
        rungs.append(Rung(1, "taehv"))
    return rungs


@dataclass
class SlackConfig:
    stall_margin_s: float = 0.05      # a stream whose slack is below the predicted tick + this is about to stall
    hold_chunks: int = 4              # chunks a rung is kept at least (degraded "for a few chunks")
    restore_headroom: float = 0.15    # restore only when the tick with the rung restored leaves this share free
    max_defer: int = 1                # consecutive ticks a stream may be held back


class SlackPolicy(Scheduler):
    """The playback-slack tick policy (see the module docstring). ``slo`` keeps today's late-frame drops and the
    admission rule; without an SLO (files, the Python API) every ready stream joins, nothing is degraded."""

    def __init__(self, slo: SLOConfig | None = None, latency: LatencyModel | None = None,
                 config: SlackConfig | None = None):
        super().__init__(slo, latency)
        self.config = config or SlackConfig()

    def plan(self, streams: Sequence[StreamView], now: float, running_rows: int = 0) -> Decision:
        d = Decision()
        ready = [s for s in streams if len(s.arrivals) >= s.chunk_len]
        if self.slo is None:
            d.join = [s.id for s in ready]
            return d
        for s in ready:
            self._drop_late(s, now, d)
        rows = {s.id: s.rows for s in ready}
        tick = self.latency.predict(running_rows + sum(rows.values()))
        d.predicted_tick_s = tick
        if tick is None or not ready:
            d.join = [s.id for s in ready]
            return d
        self._ladder(ready, rows, running_rows, d)
        join = self._wait_by_slack(ready, rows, running_rows, d)
        d.join = [s.id for s in join]
        d.defer = [s.id for s in ready if s not in join]
        for sid in d.defer:
            d.note(sid, "deferred: most slack")
        d.predicted_tick_s = self.latency.predict(running_rows + sum(rows[s.id] for s in join))
        return d

    # ------------------------------------------------------------------------------------------ helpers
    @staticmethod
    def period(s: StreamView) -> float:
        """Seconds of video one chunk gives the viewer."""
        return CHUNK_FRAMES * s.interval_s

    @staticmethod
    def _rows_at(s: StreamView, rung: int) -> int:
        """The stream's rows in a call at ``rung`` (the stream batch: one per step; sequential: one)."""
        if s.sequential or not s.can_batch:
            return s.rows
        return s.ladder[rung].steps

    def _ladder(self, ready: list[StreamView], rows: dict, running_rows: int, d: Decision) -> None:
        """Degrade the streams about to stall while the tick does not fit; restore one rung when it would."""
        cfg = self.config
        live = [s for s in ready if s.slack_s is not None and s.ladder]
        if not live:
            return
        period = min(self.period(s) for s in ready)
        total = running_rows + sum(rows.values())
        tick = self.latency.predict(total)
        if tick > period:
            at_risk = sorted((s for s in live if s.slack_s < tick + cfg.stall_margin_s), key=lambda s: s.slack_s)
            for s in at_risk:
                if s.rung + 1 >= len(s.ladder) or s.since_rung < 1:
                    continue
                new = s.rung + 1
                saved = rows[s.id] - self._rows_at(s, new)
                d.rungs[s.id] = new
                d.note(s.id, f"degraded to {s.ladder[new].describe()}: slack {s.slack_s:.2f} s, predicted tick "
                             f"{tick:.2f} s > chunk period {period:.2f} s")
                rows[s.id] -= saved
                total -= saved
                tick = self.latency.predict(total)
                if tick <= period:
                    break
            return
        # the tick fits: give back one rung, most slack first, where the tick with it still leaves headroom
        for s in sorted((s for s in live if s.rung > 0 and s.since_rung >= cfg.hold_chunks),
                        key=lambda s: -s.slack_s):
            new = s.rung - 1
            extra = self._rows_at(s, new) - rows[s.id]
            # scaled from the tick measured now (a figure measured for more rows during the overload is stale)
            t_new = tick * (total + extra) / max(1, total)
            if t_new <= (1 - cfg.restore_headroom) * period:
                d.rungs[s.id] = new
                d.note(s.id, f"restored to {s.ladder[new].describe()}: slack {s.slack_s:.2f} s, predicted tick "
                             f"{t_new:.2f} s")
                rows[s.id] += extra
                return

    def _wait_by_slack(self, ready: list[StreamView], rows: dict, running_rows: int,
                       d: Decision) -> list[StreamView]:
        """While the tick does not fit, hold back the streams with most slack that can afford one tick more."""
        cfg = self.config
        period = min(self.period(s) for s in ready)
        total = running_rows + sum(rows.values())
        tick = self.latency.predict(total)
        at_risk = [s for s in ready if s.slack_s is None or s.slack_s < tick + cfg.stall_margin_s]
        if tick <= period or not at_risk:
            return list(ready)
        held: list[StreamView] = []
        for s in sorted((s for s in ready if s.slack_s is not None and s.deferred < cfg.max_defer
                         and s.id not in d.rungs), key=lambda s: -s.slack_s):
            t_small = self.latency.predict(total - rows[s.id])
            if s.slack_s < 2 * t_small + cfg.stall_margin_s or len(held) + 1 >= len(ready):
                break
            held.append(s)
            total -= rows[s.id]
            if t_small <= period:
                break
        return [s for s in ready if s not in held]
