"""Stream batch: end-to-end conformance with the official prepare + 12 calls, slot shifting, cache write order,
RoPE refresh, no-batch mode, draining and live reconfiguration."""

from __future__ import annotations

import pytest
import torch
from kit import stream_batch_golden_errors

from wanstream.core.config import CacheConfig
from wanstream.engine.latent_stream import LatentStream
from wanstream.engine.noise import SeededNoise
from wanstream.models.sampling import FlowMatchSampler

TOL = 1e-4
SINK_OFF = CacheConfig(sink_threshold=-1)


def _stream(dit, context, steps=2, batch=True, cache=SINK_OFF, seed=0, noise=None):
    return LatentStream(dit, FlowMatchSampler(), dit.embed_prompt(context), noise or SeededNoise(seed),
                        tokens_per_frame=15, steps=steps, batch=batch, cache=cache)


def test_conformance_stream_batch_free_running(kit_dit, kit_context):
    """Only the clean latents, s, t and the recorded noise go in; every output, register and cache matches."""
    errors = stream_batch_golden_errors(lambda noise: _stream(kit_dit, kit_context, noise=noise))
    assert max(errors.values()) <= TOL, errors


def _latents(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 1, 16, 6, 10, generator=g) for _ in range(n)]


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_chunk_enters_slot0_and_leaves_n_calls_later(kit_dit, kit_context, steps):
    ls = _stream(kit_dit, kit_context, steps=steps)
    ls.prepare(torch.randn(1, 2, 16, 6, 10), 0.8)
    seen = {}
    t = torch.tensor(700)
    for call, z in enumerate(_latents(7)):
        for cid, latent in ls.push(z, 0.8, t, call):
            seen[cid] = call
        assert ls.slots[0].chunk == call if steps > 1 else True
        assert ls.calls == steps + call + 1
    assert seen == {cid: cid + steps - 1 for cid in range(7 - steps + 1)}
    drained = [cid for cid, _ in ls.drain()]
    assert drained == list(range(7 - steps + 1, 7))
    assert all(s is None for s in ls.slots)


def _written_slots(before, after, row=0, tok=15):
    return [s for s in range(before.shape[1] // tok)
            if not torch.equal(before[row, s * tok:(s + 1) * tok], after[row, s * tok:(s + 1) * tok])]


def test_cache_write_order_over_many_chunks(kit_dit, kit_context):
    """Sinks 0-2 are written once and stay; the ring 3-5 cycles, oldest first (refresh off)."""
    ls = _stream(kit_dit, kit_context, steps=2)
    before = ls.cache.k[0].clone()
    ls.prepare(torch.randn(1, 2, 16, 6, 10), 0.8)
    assert _written_slots(before, ls.cache.k[0]) == [0, 1]
    order = []
    for call, z in enumerate(_latents(14)):
        before = ls.cache.k[0].clone()
        ls.push(z, 0.8, torch.tensor(700), call)
        order += _written_slots(before, ls.cache.k[0], row=0)
    assert order == [2, 3, 4, 5] + [3, 4, 5] * 3 + [3]


def test_rope_refresh_wraps_and_keeps_streaming(kit_dit, kit_context):
    cfg = CacheConfig(sink_threshold=-1, rope_wrap_at=9, rope_wrap_to=5)
    ls = _stream(kit_dit, kit_context, steps=2, cache=cfg)
    ls.prepare(torch.randn(1, 2, 16, 6, 10), 0.8)
    ropes, outs = [], []
    for call, z in enumerate(_latents(12)):
        outs += ls.push(z, 0.8, torch.tensor(700), call)
        ropes.append(ls.slots[0].rope)
    assert ropes == [2, 3, 4, 5, 6, 7, 8, 5, 6, 7, 8, 5]
    assert len(outs) == 11 and all(torch.isfinite(x).all() for _, x in outs)


def test_no_batch_mode_writes_each_chunk_once_per_slot(kit_dit, kit_context):
    ls = _stream(kit_dit, kit_context, steps=3, batch=False)
    ls.prepare(torch.randn(1, 2, 16, 6, 10), 0.8)
    assert ls.cache.k[0].shape[0] == 1
    order = []
    for call, z in enumerate(_latents(8)):
        before = ls.cache.k[0].clone()
        (cid, latent), = ls.push(z, 0.8, torch.tensor(700), call)   # output at once
        assert cid == call
        order += _written_slots(before, ls.cache.k[0])
    assert ls.calls == 3 + 8 * 3
    assert order == [2, 3, 4, 5, 3, 4, 5, 3]   # same slot for all steps of a chunk (no B3 off-by-one)


def test_same_seed_same_output_different_seed_differs(kit_dit, kit_context):
    def run(seed):
        ls = _stream(kit_dit, kit_context, seed=seed)
        outs = [ls.prepare(torch.ones(1, 2, 16, 6, 10), 0.8)]
        for call, z in enumerate(_latents(4)):
            outs += [x for _, x in ls.push(z, 0.8, torch.tensor(680), call)]
        return torch.cat(outs, 1)
    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_reconfigure_steps_mid_stream_loses_no_chunk(kit_dit, kit_context):
    ls = _stream(kit_dit, kit_context, steps=2)
    ls.prepare(torch.randn(1, 2, 16, 6, 10), 0.8)
    got = []
    zs = _latents(10)
    for call in range(4):
        got += [cid for cid, _ in ls.push(zs[call], 0.8, torch.tensor(700), call)]
    got += [cid for cid, _ in ls.reconfigure(4)]
    assert ls.rows == 4 and ls.cache.k[0].shape[0] == 4
    for call in range(4, 10):
        got += [cid for cid, _ in ls.push(zs[call], 0.8, torch.tensor(700), call)]
    got += [cid for cid, _ in ls.reconfigure(1)]
    got += [cid for cid, _ in ls.drain()]
    assert got == list(range(10))


@pytest.mark.parametrize("steps,lag", [(2, 2), (3, 3)])
def test_pipelined_schedule_lag(kit_dit, kit_context, steps, lag):
    """With W = lag pipeline stages a chunk leaves (n-1)*W calls after it entered, in order, none lost."""
    ls = LatentStream(kit_dit, FlowMatchSampler(), kit_dit.embed_prompt(kit_context), SeededNoise(0),
                      tokens_per_frame=15, steps=steps, cache=SINK_OFF, lag=lag)
    ls.prepare(torch.randn(1, 2, 16, 6, 10), 0.8)
    seen = {}
    for call, z in enumerate(_latents(9)):
        for cid, _ in ls.push(z, 0.8, torch.tensor(700), call):
            seen[cid] = call
    assert seen == {cid: cid + (steps - 1) * lag for cid in seen}
    assert [cid for cid, _ in ls.drain()] == [c for c in range(9) if c not in seen]
