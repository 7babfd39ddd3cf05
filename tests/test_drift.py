"""The drift watchdog (engine/drift.py): it flags a synthetic drifting stream and not a stable one; a flagged
stream's sinks are re-primed from its most recent frames in the engine, and its output goes on; it is off by
default and its state travels with a parked stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wanstream.engine.drift import DriftConfig, DriftWatch
from wanstream.engine.loop import Engine
from wanstream.io.video import make_motion_clip

W, H = 64, 48


def latents(n, drift_per_chunk=0.0, seed=0):
    """Synthetic clean latents [1, 1, 16, 24, 32]: per-channel statistics that hold (with noise), or that wash out
    (the standard deviation shrinks and the mean slides by ``drift_per_chunk`` of itself per chunk)."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.linspace(-1, 1, 16).view(1, 1, 16, 1, 1)
    for k in range(n):
        fade = max(0.0, 1.0 - drift_per_chunk * k)
        yield mean * (1 + drift_per_chunk * k) + fade * torch.randn(1, 1, 16, 24, 32, generator=g)


def test_the_watchdog_flags_a_drifting_stream_and_not_a_stable_one():
    cfg = DriftConfig(refresh=True)
    stable, drifting = DriftWatch(cfg), DriftWatch(cfg)
    for x in latents(120, 0.0, seed=1):
        stable.observe(x)
    for x in latents(120, 0.01, seed=1):
        drifting.observe(x)
    assert stable.flags == 0 and not stable.refresh_due and stable.max_score < cfg.threshold / 2
    assert drifting.flags >= 1 and drifting.refresh_due and drifting.max_score > cfg.threshold
    first = next(k for k in range(5, 120) if _flags_after(cfg, k) >= 1)
    assert 10 < first < 60                                  # after the reference, not at the first wobble
    drifting.refreshed()                                    # a refresh starts the reference again
    assert drifting.refreshes == 1 and not drifting.refresh_due and drifting.score is not None


def _flags_after(cfg, n):
    w = DriftWatch(cfg)
    for x in latents(n, 0.01, seed=1):
        w.observe(x)
    return w.flags


def test_a_flagged_stream_gets_its_sinks_reprimed_and_goes_on(tiny_model):
    """A threshold so low that the tiny model's stream is flagged as soon as its reference is made: its sinks are
    re-primed (each sink slot a copy of a recent ring slot), no frame is lost, the counts say so."""
    clip = make_motion_clip(60, W, H, seed=4)
    eng = Engine(tiny_model, drift=DriftConfig(threshold=1e-9, patience=1, reference_chunks=2))
    s = eng.open(prompt_embeds=torch.randn(1, 5, 4096) * 0.1, width=W, height=H, steps=2, seed=2)
    pool, policy = s.group.runner.pool, s.group.runner.policy
    seen, pos, checked = 0, 0, False
    for c in range(13):
        n = 5 if c == 0 else 4
        eng.feed(s, clip[pos: pos + n])
        pos += n
        before = s.drift.refreshes
        eng.run_until_idle()
        seen += len(s.take_outputs())
        if s.drift.refreshes > before and not checked:     # right after a refresh: sinks == the newest frames
            lease, f = pool.leases[s.id], pool.tokens_per_frame
            last = s.schedule.next_frame - 1               # row 0 wrote the newest chunk's frame
            for i in range(policy.sink):
                src = policy.slot(last - policy.sink + 1 + i)
                for t in pool.k.values():
                    assert torch.equal(t[lease.row, i * f:(i + 1) * f], t[lease.row, src * f:(src + 1) * f])
                for t in pool.km.values():
                    assert torch.equal(t[lease.row, i], t[lease.row, src])
            checked = True
    assert checked and s.drift.refreshes >= 1 and eng.drift_counts["refreshes"] == s.drift.refreshes
    assert eng.drift_counts["flags"] >= s.drift.refreshes
    assert seen == pos - 4                                   # every frame came out (the last chunk is in flight)
    assert s.drift.summary()["refreshes"] == s.drift.refreshes
    assert all(v is None for v in (Engine(tiny_model).drift,))            # off by default


def test_the_watchdog_travels_with_a_parked_stream(tiny_model):
    clip = make_motion_clip(30, W, H, seed=5)
    eng = Engine(tiny_model, drift=DriftConfig())
    s = eng.open(prompt_embeds=torch.randn(1, 5, 4096) * 0.1, width=W, height=H, steps=2, seed=2)
    eng.feed(s, clip[:25])
    eng.run_until_idle()
    s.take_outputs()
    before = (s.drift.chunks, s.drift._ref_n, s.drift.summary())
    s2 = eng.resume(eng.park(s))
    assert (s2.drift.chunks, s2.drift._ref_n, s2.drift.summary()) == before
    assert torch.equal(s2.drift._ref, s.drift._ref)


@pytest.mark.parametrize("bad", [dict(threshold=0), dict(patience=0), dict(smoothing=1.5)])
def test_bad_watchdog_settings_are_refused(bad):
    with pytest.raises(ValueError, match="drift watchdog"):
        DriftConfig(**bad)
    assert np.isfinite(DriftConfig().threshold)
