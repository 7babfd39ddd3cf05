"""Drift watchdog: eval's drift measure (``wanstream/eval``: how far a stream's frames move from its first ones),
made cheap and online, and the cache refresh it can trigger. Off unless the engine is given a :class:`DriftConfig`.

Per stream (:class:`DriftWatch`), every chunk that leaves the model clean gives its latent's per-channel mean and
standard deviation — 2·C numbers, reduced on the device where the latent is. The chunks ``skip_chunks ..
skip_chunks + reference_chunks - 1`` are the reference (their average); later chunks update an exponential average
(``smoothing``). The **score** is the relative distance of that average from the reference, ``|avg - ref| /
|ref|``: about 0 while the output keeps its statistics, growing as it washes out or blurs (the standard deviations
shrink) or shifts in colour (the means move) — the ghosting and blur users see after some seconds. The score of a
chunk is read on the host when the next chunk comes (the device finished it long before: nothing in the chunk's
path waits for it).

When the score stays above ``threshold`` for ``patience`` chunks the stream is **flagged** (counted). With
``refresh`` on, its KV cache is then refreshed at the end of the next tick in which all its rows ran: in each of its
cache rows the sink slots (the first frames the attention anchors on) are re-primed with the K/V (and token means)
of its most recent frames, copied from the ring; the reference starts again from the next chunks.
:func:`refresh_sinks` is that copy. The threshold is a guess until measured on real weights (``eval --sweep``
compares the watchdog on and off).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DriftConfig:
    threshold: float = 0.25       # relative distance of the output statistics from the reference
    patience: int = 3             # chunks in a row above the threshold before the stream is flagged
    reference_chunks: int = 4     # chunks averaged into the reference ...
    skip_chunks: int = 1          # ... after the first ones (the prepared chunk)
    smoothing: float = 0.2        # weight of a new chunk in the running average
    refresh: bool = True          # a flagged stream's sinks are re-primed from its recent frames

    def __post_init__(self) -> None:
        if not self.threshold > 0 or self.patience < 1 or self.reference_chunks < 1 or self.skip_chunks < 0 or \
                not 0 < self.smoothing <= 1:
            raise ValueError("drift watchdog: threshold > 0, patience and reference_chunks >= 1, skip_chunks >= 0 "
                             "and smoothing in (0, 1] are needed")


class DriftWatch:
    """The watchdog of one stream (see the module docstring)."""

    def __init__(self, config: DriftConfig):
        self.config = config
        self.chunks = 0               # chunks seen
        self.score: float | None = None
        self.max_score = 0.0
        self.over = 0                 # chunks in a row above the threshold
        self.flags = 0
        self.refreshes = 0
        self.refresh_due = False
        self._ref: torch.Tensor | None = None       # sum of the reference chunks' statistics
        self._ref_n = 0
        self._avg: torch.Tensor | None = None
        self._pending: torch.Tensor | None = None   # the last chunk's score, still on the device

    def observe(self, latent: torch.Tensor) -> None:
        """A chunk left the model clean (``latent [1, T, C, h, w]``)."""
        if self._pending is not None:
            self._take(float(self._pending))
            self._pending = None
        self.chunks += 1
        cfg = self.config
        if self.chunks <= cfg.skip_chunks:
            return
        x = latent.detach().float()
        v = x.transpose(1, 2).reshape(x.shape[2], -1)
        stats = torch.cat([v.mean(1), v.std(1)])
        if self._ref_n < cfg.reference_chunks:
            self._ref = stats if self._ref is None else self._ref + stats
            self._ref_n += 1
            return
        ref = self._ref / self._ref_n
        self._avg = stats if self._avg is None else torch.lerp(self._avg, stats, cfg.smoothing)
        self._pending = (self._avg - ref).norm() / ref.norm().clamp_min(1e-6)

    def _take(self, score: float) -> None:
        cfg = self.config
        self.score = score
        self.max_score = max(self.max_score, score)
        self.over = self.over + 1 if score > cfg.threshold else 0
        if self.over >= cfg.patience:
            self.flags += 1
            self.over = 0
            self.refresh_due = cfg.refresh

    def refreshed(self) -> None:
        """The stream's sinks were re-primed: the reference starts again."""
        self.refreshes += 1
        self.refresh_due = False
        self._ref, self._ref_n, self._avg, self._pending = None, 0, None, None
        self.chunks = self.config.skip_chunks

    def summary(self) -> dict:
        return {"score": None if self.score is None else round(self.score, 4), "max": round(self.max_score, 4),
                "threshold": self.config.threshold, "flags": self.flags, "refreshes": self.refreshes}

    # ------------------------------------------------------------------------------------------ parking
    def state(self, tensors: dict, prefix: str = "drift") -> dict:
        """Host values; its tensors go into ``tensors`` (a parked stream's)."""
        for name in ("_ref", "_avg", "_pending"):
            if getattr(self, name) is not None:
                tensors[f"{prefix}.{name[1:]}"] = getattr(self, name)
        return {"chunks": self.chunks, "score": self.score, "max_score": self.max_score, "over": self.over,
                "flags": self.flags, "refreshes": self.refreshes, "refresh_due": self.refresh_due,
                "ref_n": self._ref_n}

    @classmethod
    def restore(cls, config: DriftConfig, state: dict, tensors: dict, device, prefix: str = "drift") -> "DriftWatch":
        w = cls(config)
        for k in ("chunks", "over", "flags", "refreshes", "ref_n"):
            v = state[k]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"drift watchdog: bad {k}")
        w.chunks, w.over, w.flags, w.refreshes, w._ref_n = (state[k] for k in ("chunks", "over", "flags",
                                                                                 "refreshes", "ref_n"))
        w.score = None if state["score"] is None else float(state["score"])
        w.max_score, w.refresh_due = float(state["max_score"]), bool(state["refresh_due"])
        for name in ("ref", "avg", "pending"):
            t = tensors.get(f"{prefix}.{name}")
            if t is not None:
                if not t.is_floating_point() or t.ndim > 1 or t.numel() > 4096:
                    raise ValueError(f"drift watchdog: bad {name}")
                setattr(w, f"_{name}", t.to(device))
        return w


def refresh_sinks(runner, stream, last_frames: dict[int, int]) -> bool:
    """Re-prime a stream's sink slots from its most recent frames: in each of its cache rows ``r`` (which last
    wrote frame ``last_frames[r]``), sink slot ``i`` becomes a copy of the ring slot of frame ``last - sink + 1 + i``
    (K, V and their token means, every block). False (nothing changed) when the runner has no pool here (a
    pipeline), not every row ran, or the ring does not hold that many frames yet."""
    pool, policy = getattr(runner, "pool", None), getattr(runner, "policy", None)
    if pool is None or policy is None or stream not in pool.leases:
        return False
    lease, sink, f = pool.leases[stream], policy.sink, pool.tokens_per_frame
    if sink == 0 or policy.ring < sink or set(last_frames) != set(range(lease.rows)) or \
            min(last_frames.values()) - sink + 1 < sink:
        return False
    for r, last in last_frames.items():
        row = lease.row + r
        for i in range(sink):
            src = policy.slot(last - sink + 1 + i)
            for store in (pool.k, pool.v):
                for t in store.values():
                    t[row, i * f:(i + 1) * f] = t[row, src * f:(src + 1) * f]
            for store in (pool.km, pool.vm):
                for t in store.values():
                    t[row, i] = t[row, src]
    return True


def watch(engine, group, plan, finished: dict) -> None:
    """One tick's watchdog work (the engine calls it when it has a :class:`DriftConfig`): every chunk that left
    clean is observed, each flagged stream whose rows all ran this tick gets its sinks refreshed."""
    for items in finished.values():
        for s, d in items:
            if s.drift is not None:
                flags = s.drift.flags
                s.drift.observe(d.latent)
                engine.drift_counts["flags"] += s.drift.flags - flags
    for s in group.streams:
        if s.drift is None or not s.drift.refresh_due or s.closed:
            continue
        last = {r.cache_row: r.frame + c.frames - 1 for c in plan.calls for r in c.rows if r.stream == s.id}
        if refresh_sinks(group.runner, s.id, last):
            s.drift.refreshed()
            engine.drift_counts["refreshes"] += 1
