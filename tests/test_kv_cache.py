"""KV cache policy: sink + ring write order, validity, adaptive sink refresh on the device."""

from __future__ import annotations

import torch

from wanstream.core.config import CacheConfig
from wanstream.models.attention import frame_means, refresh_sinks
from wanstream.models.kv_cache import CachePolicy, CacheStep, KVCache


def test_write_order_sinks_fixed_ring_cycles():
    policy = CachePolicy(CacheConfig(capacity=6, sink=3, sink_threshold=-1))
    slots = [policy.slot(f) for f in range(16)]
    assert slots == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 3, 4, 5, 3]
    assert [policy.valid_after(f) for f in range(8)] == [1, 2, 3, 4, 5, 6, 6, 6]
    assert [policy.valid_after(0, 2)] == [2]


def test_fast_config_ring_of_two():
    policy = CachePolicy(CacheConfig(capacity=5, sink=2, sink_threshold=-1))
    assert [policy.slot(f) for f in range(9)] == [0, 1, 2, 3, 4, 2, 3, 4, 2]


def test_cache_step_indices_and_mask():
    policy = CachePolicy(CacheConfig(capacity=6, sink=3, sink_threshold=-1))
    step = CacheStep.build(policy, [4, 7], [4, 7], 1, 3, "cpu", row_start=1)
    assert step.write_index.tolist() == [[12, 13, 14], [12, 13, 14]]  # frame 4 → slot 4, frame 7 → slot 4
    assert step.row_index.tolist() == [[1, 1, 1], [2, 2, 2]]
    assert step.rows == slice(1, 3)
    assert step.attn_mask[:, 0, 0].sum(1).tolist() == [15, 18]
    assert step.refresh_rows is None
    full = CacheStep.build(policy, [6, 9], [6, 9], 1, 3, "cpu")
    assert full.attn_mask is None  # steady state: no mask, static shapes


def test_refresh_only_when_all_sinks_hold_data():
    policy = CachePolicy(CacheConfig(capacity=6, sink=3, sink_threshold=0.2))
    assert [policy.refresh_eligible(f) for f in range(5)] == [False, False, False, True, True]
    assert not policy.refresh_eligible(5, frames=2)
    assert not CachePolicy(CacheConfig(sink_threshold=-1)).refresh_eligible(8)
    step = CacheStep.build(policy, [2, 3], [2, 3], 1, 4, "cpu")
    assert step.refresh_rows.tolist() == [False, True]


def _sinks_and_frame(opposite_sink: bool):
    """A 2-row cache whose 3 sinks (and their means) are close to ``base``; with ``opposite_sink`` sink 2 points the
    other way. Returns the cache and a new frame equal to ``base``."""
    torch.manual_seed(0)
    n_tok, heads, hd = 4, 2, 8
    cache = KVCache([0], 2, 6, n_tok, heads, hd, torch.float32, "cpu")
    k, v = cache.k[0], cache.v[0]
    base = torch.randn(heads, hd)
    for s in range(3):
        sign = -1.0 if (s == 2 and opposite_sink) else 1.0
        k[:, s * n_tok:(s + 1) * n_tok] = sign * base + 0.01 * torch.randn(n_tok, heads, hd)
        v[:, s * n_tok:(s + 1) * n_tok] = sign * base + 0.01 * torch.randn(n_tok, heads, hd)
    cache.km[0][:, :3] = frame_means(k[:, :3 * n_tok], 3)
    cache.vm[0][:, :3] = frame_means(v[:, :3 * n_tok], 3)
    new = base.expand(2, n_tok, heads, hd).clone()
    return cache, new


def _refresh(cache, new, step):
    m = frame_means(new, 1)[:, 0]
    refresh_sinks(cache.k[0], cache.v[0], cache.km[0], cache.vm[0], new, new, m, m, step)


def test_refresh_replaces_least_similar_sink_when_forced():
    cache, new = _sinks_and_frame(True)
    policy = CachePolicy(CacheConfig(capacity=6, sink=3, sink_threshold=0.2))
    step = CacheStep.build(policy, [2, 7], [2, 7], 1, 4, "cpu")  # row 0 still filling, row 1 eligible
    k0, v0, km0 = cache.k[0].clone(), cache.v[0].clone(), cache.km[0].clone()
    _refresh(cache, new, step)
    k, v = cache.k[0], cache.v[0]
    # row 0 is not eligible: only its own slot (2, which the normal write fills anyway) got the frame
    assert torch.equal(k[0, 8:12], new[0]) and torch.equal(k[0, :8], k0[0, :8]) and torch.equal(k[0, 12:], k0[0, 12:])
    assert torch.equal(k[1, 8:12], new[1]) and torch.equal(v[1, 8:12], new[1])  # sink 2 replaced
    assert torch.equal(k[1, :8], k0[1, :8]) and torch.equal(k[1, 12:], k0[1, 12:])
    assert torch.equal(cache.km[0][1, 2], frame_means(new, 1)[1, 0])           # its means travel with it
    assert torch.equal(cache.km[0][1, :2], km0[1, :2])


def test_refresh_keeps_sinks_above_threshold():
    cache, new = _sinks_and_frame(False)
    policy = CachePolicy(CacheConfig(capacity=6, sink=3, sink_threshold=0.2))  # every sink is similar
    step = CacheStep.build(policy, [7, 7], [7, 7], 1, 4, "cpu")               # frame 7 → ring slot 4
    k0 = cache.k[0].clone()
    _refresh(cache, new, step)
    assert torch.equal(cache.k[0][:, :12], k0[:, :12])                          # no sink touched
    assert torch.equal(cache.k[0][:, 16:20], new)                               # the frame's own ring slot


def test_refresh_never_compares_against_empty_sinks():
    """While sinks fill, no row is eligible, so an all-zero sink is never 'least similar' (official bug B2)."""
    policy = CachePolicy(CacheConfig(capacity=6, sink=3, sink_threshold=0.2))
    for frame in range(3):
        assert CacheStep.build(policy, [frame], [frame], 1, 4, "cpu").refresh_rows is None
