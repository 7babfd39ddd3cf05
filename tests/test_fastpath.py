"""The DiT fast path: sink refresh on kept sink means (same decisions as the reference), persistent step buffers,
cached RoPE grids, the compiled steady-state call (conformance, no recompiles), CUDA graphs and attention backends
(GPU tests skip without CUDA)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kit import reference_refresh_sinks, stream_batch_golden_errors

from wanstream.core.config import CacheConfig
from wanstream.core.schedule import StreamSchedule, compose
from wanstream.engine.latent_stream import LatentStream
from wanstream.engine.noise import SeededNoise
from wanstream.engine.runner import ChunkInput, Runner, RunnerStream
from wanstream.engine.transfer import download_frames, start_download, upload_frames
from wanstream.io.video import frames_to_tensor, tensor_to_frames
from wanstream.models import attention, attention_backends
from wanstream.models import dit as dit_module
from wanstream.models.attention import _heads, frame_means, self_attention
from wanstream.models.kv_cache import CachePolicy, CacheStep, KVPool, StepBuffers
from wanstream.models.rope import RopeTables, apply_rope
from wanstream.models.sampling import FlowMatchSampler

TOL = 1e-4
F_TOK = 15
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ============================================================================================ reference refresh
def reference_self_attention(attn, x, cos, sin, cache_k, cache_v, step, cache_km, cache_vm):
    """Self-attention with the reference refresh (per segment, on the cache), then the normal write and attention."""
    if step.refresh_rows is not None:
        k = apply_rope(_heads(attn.norm_k(attn.to_k(x)), attn.heads), cos, sin)
        v = _heads(attn.to_v(x), attn.heads)
        for b0, b1, r0 in step.segments:
            rows = slice(r0, r0 + b1 - b0)
            reference_refresh_sinks(cache_k[rows], cache_v[rows], k[b0:b1], v[b0:b1], step.refresh_rows[b0:b1],
                                    step)
    return self_attention(attn, x, cos, sin, cache_k, cache_v, dataclasses.replace(step, refresh_rows=None),
                          cache_km, cache_vm)


# ============================================================================================ a small driver
class Driver:
    """Streams on one Runner through StreamSchedule + compose (the engine's DiT side, without the VAE)."""

    def __init__(self, dit, context, cache: CacheConfig, compile=False, seed=1):
        self.cache = cache
        self.pool = KVPool(range(dit.num_layers), cache.capacity, F_TOK, dit.heads, dit.head_dim, dit.dtype, "cpu",
                           text_len=dit.text_len)
        self.runner = Runner(dit, FlowMatchSampler(), self.pool, CachePolicy(cache), F_TOK, compile=compile)
        self.prompt = dit.embed_prompt(context)
        self.schedules: dict[int, StreamSchedule] = {}
        self.gen = torch.Generator().manual_seed(seed)
        self.t0 = torch.tensor(700)
        self.next_chunk = 0

    def open(self, sid: int, steps: int = 2) -> None:
        sch = self.schedules[sid] = StreamSchedule(sid, steps, cache=self.cache)
        self.runner.add(RunnerStream(sid, SeededNoise(100 + sid)), sch.rows)
        self.runner.set_prompt(sid, self.prompt)

    def close(self, sid: int) -> None:
        self.schedules.pop(sid)
        self.runner.remove(sid)

    def tick(self, sids, steps: dict | None = None, on_call=None) -> list:
        """Each stream in ``sids`` feeds a chunk (after a step change to ``steps[sid]`` where given)."""
        stage_lists = []
        for sid in sids:
            sch = self.schedules[sid]
            stages = sch.reconfigure(steps[sid]) if steps and sid in steps else []
            frames = 1 if sch.prepared else 2
            cid = self.next_chunk
            self.next_chunk += 1
            z = torch.randn(1, frames, 16, 6, 10, generator=self.gen)
            self.runner.streams[sid].inputs[cid] = ChunkInput(z, 0.8, None if frames == 2 else self.t0)
            stage_lists.append(stages + (sch.push(cid, 1) if sch.prepared else sch.prepare(cid, 2)))
        done = []
        for call in compose(stage_lists):
            done += self.runner.run(call)
            if on_call:
                on_call(call, self.snapshot())
        return done

    def snapshot(self):
        return {i: (self.pool.k[i].clone(), self.pool.v[i].clone()) for i in self.pool.k}


def _recording(impl, log: list):
    """``impl`` (a self-attention) that logs, per block call, the eligible cache rows and the sinks it rewrote."""
    def wrapped(attn, x, cos, sin, cache_k, cache_v, step, cache_km, cache_vm):
        before = cache_k[:, : step.sink_tokens].clone()
        out = impl(attn, x, cos, sin, cache_k, cache_v, step, cache_km, cache_vm)
        changed = (before != cache_k[:, : step.sink_tokens]).unflatten(1, (-1, F_TOK)).flatten(2).any(-1)
        eligible = [] if step.refresh_rows is None else \
            step.cache_row[step.refresh_rows].tolist()
        log.append((eligible, sorted(map(tuple, changed.nonzero().tolist()))))
        return out
    return wrapped


def _check_sink_means(pool: KVPool, sink: int):
    """Every leased row's sink means are the token means of what its sinks hold."""
    for i in pool.k:
        for lease in pool.leases.values():
            rows = slice(lease.row, lease.row + lease.rows)
            for name, store, means in (("K", pool.k, pool.km), ("V", pool.v, pool.vm)):
                expect = frame_means(store[i][rows, : sink * F_TOK], sink)
                got = means[i][rows, :sink]
                assert torch.allclose(got, expect, atol=1e-6, rtol=0), f"block {i} {name} means of {lease}"


def _run_scenario(dit, context, cache, monkeypatch, reference: bool):
    """Three streams on one pool: batched ticks, ticks where the middle stream sits out (two segments), a step
    change of one stream (rows re-laid by resize) and a stream leaving (rows moved by repack). Returns the per-block
    log of refresh chances and sink writes, and the caches after every call."""
    log, caches = [], []
    impl = reference_self_attention if reference else attention.self_attention
    monkeypatch.setattr(dit_module, "self_attention", _recording(impl, log))
    d = Driver(dit, context, cache)

    def on_call(call, after):
        caches.append(after)

    for sid in (0, 1, 2):
        d.open(sid)
    for _ in range(8):
        d.tick([0, 1, 2], on_call=on_call)
    for _ in range(4):
        d.tick([0, 2], on_call=on_call)                     # rows of 0 and 2 are not consecutive: 2 segments
    d.tick([0, 1, 2], steps={1: 3}, on_call=on_call)      # stream 1: 2 → 3 rows (drain, resize)
    for _ in range(4):
        d.tick([0, 1, 2], on_call=on_call)
    d.close(0)                                              # streams 1 and 2 move down (repack)
    for _ in range(6):
        d.tick([1, 2], on_call=on_call)
    if not reference:
        _check_sink_means(d.pool, cache.sink)
    return log, caches


def test_sink_refresh_same_decisions_and_caches_as_reference(kit_dit, kit_context, monkeypatch):
    """Over a recorded multi-stream run with refresh on, the sink-means path writes the same sinks in the same
    block calls as the reference (the whole-sink-region compare and rewrite) and leaves bit-identical caches,
    through segments, a resize and a repack; the kept means always match the sinks."""
    cache = CacheConfig(sink_threshold=0.5)
    log_r, caches_r = _run_scenario(kit_dit, kit_context, cache, monkeypatch, reference=True)
    log_n, caches_n = _run_scenario(kit_dit, kit_context, cache, monkeypatch, reference=False)
    assert log_r == log_n
    assert len(caches_r) == len(caches_n) > 20
    for n, (cache_r, cache_n) in enumerate(zip(caches_r, caches_n)):
        for i in cache_r:
            assert torch.equal(cache_r[i][0], cache_n[i][0]) and torch.equal(cache_r[i][1], cache_n[i][1]), \
                f"call {n}: block {i} cache differs"
    _assert_some_refresh(log_n)


def _assert_some_refresh(log):
    """Some eligible rows refreshed a sink and some did not (the threshold is not vacuous)."""
    chances = sum(len(eligible) for eligible, _ in log)
    refreshes = sum(sum(row in eligible for row, _ in changed) for eligible, changed in log)
    assert 0 < refreshes < chances, (refreshes, chances)


def test_sink_refresh_single_stream_many_chunks(kit_dit, kit_context, monkeypatch):
    """One stream, 40 chunks, 3 steps, refresh on: identical outputs and caches to the reference."""
    outs, logs = {}, {True: [], False: []}
    for reference in (True, False):
        impl = reference_self_attention if reference else attention.self_attention
        monkeypatch.setattr(dit_module, "self_attention", _recording(impl, logs[reference]))
        ls = LatentStream(kit_dit, FlowMatchSampler(), kit_dit.embed_prompt(kit_context), SeededNoise(3),
                          tokens_per_frame=F_TOK, steps=3, cache=CacheConfig(sink_threshold=0.5))
        g = torch.Generator().manual_seed(5)
        got = [ls.prepare(torch.randn(1, 2, 16, 6, 10, generator=g), 0.8)]
        for j in range(40):
            got += [x for _, x in ls.push(torch.randn(1, 1, 16, 6, 10, generator=g), 0.8, torch.tensor(700), j)]
        outs[reference] = (got, ls.cache.k[0].clone(), ls.cache.v[1].clone())
    (a, ka, va), (b, kb, vb) = outs[True], outs[False]
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(ka, kb) and torch.equal(va, vb)
    assert logs[True] == logs[False]
    _assert_some_refresh(logs[False])


def test_pool_moves_carry_sink_means():
    """resize, repack, copy_row0, growth and block moves keep each row's means beside its K/V."""
    pool = KVPool(range(2), capacity=4, tokens_per_frame=2, heads=1, head_dim=4, dtype=torch.float32, device="cpu",
                  text_len=3)
    for sid, rows in (("a", 2), ("b", 1), ("c", 2)):
        pool.acquire(sid, rows)
    for t in pool.row_tensors():
        t.copy_(torch.randn_like(t))

    def fingerprint(sid):
        lease = pool.leases[sid]
        return [t[lease.row: lease.row + lease.rows].clone() for t in pool.row_tensors()]

    c = fingerprint("c")
    gen = pool.generation
    pool.release("b")                                     # c moves down one row
    assert all(torch.equal(x, y) for x, y in zip(fingerprint("c"), c))
    a = fingerprint("a")
    pool.resize("a", 4)                                   # rows 0,1 kept, rows 2,3 = row 1; c moves up
    got = fingerprint("a")
    assert all(torch.equal(g[:2], x) and torch.equal(g[2], x[1]) and torch.equal(g[3], x[1]) for g, x in zip(got, a))
    assert all(torch.equal(x, y) for x, y in zip(fingerprint("c"), c))
    assert pool.generation > gen                          # storage grew: captured graphs are stale
    pool.copy_row0("a")
    assert all(torch.equal(t[1], t[0]) for t in pool.row_tensors())
    moved = pool.pop_layer(1)
    assert len(moved) == 6 and 1 not in pool.km
    pool.put_layer(1, *moved)
    assert pool.km[1] is moved[2] and pool.vm[1] is moved[3]


# ============================================================================================ step buffers, RoPE
def test_step_buffers_are_persistent_and_match_a_fresh_build():
    policy = CachePolicy(CacheConfig(capacity=6, sink=3, sink_threshold=0.2))
    buf = StepBuffers(policy, 1, 4, "cpu", [2, 3, 7], prompts=[0, 0, 1], row_values=1)
    first = buf.fill([1, 5, 9], [1, 5, 9], ([700, 500, 400],))
    ptrs = {f: getattr(first, f).data_ptr() for f in ("write_index", "row_index", "rope_starts", "slot_index")}
    for frames in ([4, 8, 9], [6, 7, 8], [2, 30, 3]):
        step = buf.fill(frames, [f + 1 for f in frames], ([f * 10 for f in frames],))
        ref = CacheStep.build(policy, frames, [f + 1 for f in frames], 1, 4, "cpu", cache_rows=[2, 3, 7],
                              prompts=[0, 0, 1])
        assert {f: getattr(step, f).data_ptr() for f in ptrs} == ptrs       # the same tensors, refilled
        for f in ("write_index", "row_index", "rope_starts", "slot_index", "cache_row"):
            assert torch.equal(getattr(step, f), getattr(ref, f)), f
        assert (step.attn_mask is None) == (ref.attn_mask is None)
        if step.attn_mask is not None:
            assert torch.equal(step.attn_mask, ref.attn_mask)
        assert torch.equal(step.refresh_rows, ref.refresh_rows) if ref.refresh_rows is not None \
            else step.refresh_rows is None
        assert step.write_means == ref.write_means == (min(frames) < 3)
        assert step.segments == [(0, 2, 2), (2, 3, 7)] and step.prompt_groups == [(0, 2, 0, 1), (2, 3, 1, 1)]
        assert buf.values[0].tolist() == [f * 10 for f in frames]
    with pytest.raises(ValueError, match="one entry per batch row"):
        buf.fill([1, 2], [1, 2], ([0, 0],))
    # per stream: a stream still filling its cache attends with the mask, a full one without (as alone)
    mixed = StepBuffers(policy, 1, 4, "cpu", [0, 1, 2, 3], streams=["a", "a", "b", "b"])
    step = mixed.fill([9, 8, 2, 1], [0] * 4)
    assert step.segments == [(0, 2, 0), (2, 4, 2)] and step.masked == [False, True]
    assert mixed.fill([9, 8, 7, 6], [0] * 4).attn_mask is None


def test_steady_runner_calls_build_no_tensors_from_host_lists(kit_dit, kit_context, monkeypatch):
    """After warm-up, a steady call uploads its integers through the layout's buffers: no torch.tensor(...)."""
    d = Driver(kit_dit, kit_context, CacheConfig(sink_threshold=0.5))
    d.open(0)
    d.open(1)
    for _ in range(8):
        d.tick([0, 1])
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    for _ in range(3):
        d.tick([0, 1])
    assert made == []


def _rope_reference(tables, starts, frames, height, width):
    b = starts.shape[0]
    t_idx = starts[:, None] + torch.arange(frames)[None]
    out = []
    for tt, th, tw in (tables.cos, tables.sin):
        ft = tt[t_idx][:, :, None, None, :].expand(b, frames, height, width, -1)
        fh = th[:height][None, None, :, None, :].expand(b, frames, height, width, -1)
        fw = tw[:width][None, None, None, :, :].expand(b, frames, height, width, -1)
        out.append(torch.cat([ft, fh, fw], dim=-1).reshape(b, frames * height * width, 1, -1))
    return out


def test_rope_grid_is_cached_and_unchanged():
    tables = RopeTables(128, 64)
    for starts, grid in ((torch.tensor([0, 7]), (2, 3, 5)), (torch.tensor([49, 5, 3]), (1, 3, 5)),
                         (torch.tensor([4]), (2, 3, 5))):
        cos, sin = tables.for_grid(starts, *grid)
        ref_cos, ref_sin = _rope_reference(tables, starts, *grid)
        assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    assert set(tables._grids) == {(2, 3, 5), (1, 3, 5)}
    spatial = tables._grids[(2, 3, 5)][1]
    tables.for_grid(torch.tensor([9, 9]), 2, 3, 5)
    assert tables._grids[(2, 3, 5)][1] is spatial             # built once per grid


# ============================================================================================ compiled path
def test_compiled_runner_passes_the_stream_batch_golden(kit_dit, kit_context):
    """tests/test_stream_batch.py::test_conformance_stream_batch_free_running through a compiled runner."""
    streams = []

    def make(noise):
        streams.append(LatentStream(kit_dit, FlowMatchSampler(), kit_dit.embed_prompt(kit_context), noise,
                                    tokens_per_frame=F_TOK, steps=2, cache=CacheConfig(sink_threshold=-1),
                                    compile=True))
        return streams[-1]

    errors = stream_batch_golden_errors(make)
    assert max(errors.values()) <= TOL, errors
    assert streams[0].runner.path_calls["compiled"] >= 5     # the steady calls of the golden ran compiled


def _no_recompiles(run_warm, run_steady):
    from torch._dynamo.utils import counters
    run_warm()
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        run_steady()
    assert counters["stats"]["unique_graphs"] == graphs      # nothing new was compiled either


def test_no_recompiles_over_50_steady_chunks_of_one_stream(kit_dit, kit_context):
    ls = LatentStream(kit_dit, FlowMatchSampler(), kit_dit.embed_prompt(kit_context), SeededNoise(0),
                      tokens_per_frame=F_TOK, steps=2, cache=CacheConfig(sink_threshold=-1), compile=True)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor(700)

    def warm():
        ls.prepare(torch.randn(1, 2, 16, 6, 10, generator=g), 0.8)
        for j in range(8):
            ls.push(torch.randn(1, 1, 16, 6, 10, generator=g), 0.8, t, j)

    def steady():
        for j in range(8, 58):
            ls.push(torch.randn(1, 1, 16, 6, 10, generator=g), 0.8, t, j)

    _no_recompiles(warm, steady)
    assert ls.runner.path_calls["compiled"] >= 50


def test_no_recompiles_with_two_streams_batched(kit_dit, kit_context):
    """Two streams (sink refresh on) in one call per tick: after warm-up, 50 steady ticks compile nothing."""
    d = Driver(kit_dit, kit_context, CacheConfig(sink_threshold=0.5), compile=True)
    d.open(0)
    d.open(1)
    _no_recompiles(lambda: [d.tick([0, 1]) for _ in range(8)],
                   lambda: [d.tick([0, 1]) for _ in range(50)])
    assert d.runner.path_calls["compiled"] >= 50


# ============================================================================================ CUDA
def _cuda_stream(dit, context, dtype, compile, cuda_graphs, threshold=0.5, steps=2):
    dev_dit = dit.to("cuda", dtype)
    return LatentStream(dev_dit, FlowMatchSampler(), dev_dit.embed_prompt(context.to("cuda")),
                        SeededNoise(0, "cuda"), tokens_per_frame=F_TOK, steps=steps,
                        cache=CacheConfig(sink_threshold=threshold), compile=compile)


@cuda
def test_cuda_graph_replays_match_eager(kit_dit, kit_context):
    """Compiled + CUDA graph (the default with compile on CUDA) gives the eager outputs, and replays run."""
    import copy
    outs = {}
    for compile in (False, True):
        ls = _cuda_stream(copy.deepcopy(kit_dit), kit_context, torch.float32, compile, None)
        g = torch.Generator().manual_seed(0)
        got = [ls.prepare(torch.randn(1, 2, 16, 6, 10, generator=g).cuda(), 0.8)]
        for j in range(20):
            got += [x for _, x in ls.push(torch.randn(1, 1, 16, 6, 10, generator=g).cuda(), 0.8,
                                          torch.tensor(700, device="cuda"), j)]
        outs[compile] = (torch.cat(got), ls.cache.k[0].clone())
        if compile:
            assert ls.runner.cuda_graphs and ls.runner.path_calls["graph"] >= 8
    assert (outs[True][0] - outs[False][0]).abs().max() <= 1e-3
    assert (outs[True][1] - outs[False][1]).abs().max() <= 1e-3


@cuda
def test_steady_attention_uses_flash_or_cudnn(kit_dit, kit_context):
    """In the steady state (no mask) SDPA runs on the flash / cuDNN kernels: with only those allowed, the call works."""
    import copy

    from torch.nn.attention import SDPBackend, sdpa_kernel
    previous = attention_backends.attention_backend()
    attention_backends.set_attention_backend("sdpa")
    try:
        ls = _cuda_stream(copy.deepcopy(kit_dit), kit_context, torch.bfloat16, False, False)
        g = torch.Generator().manual_seed(0)
        z = lambda n: torch.randn(1, n, 16, 6, 10, generator=g).to("cuda", torch.bfloat16)  # noqa: E731
        ls.prepare(z(2), 0.8)
        t = torch.tensor(700, device="cuda")
        for j in range(8):                                   # fill (masked calls may use any kernel)
            ls.push(z(1), 0.8, t, j)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            for j in range(8, 12):
                ls.push(z(1), 0.8, t, j)
    finally:
        attention_backends.set_attention_backend(previous)


# ============================================================================================ attention backends
def test_attention_backend_selection_and_fallback(monkeypatch):
    with pytest.raises(ValueError, match="must be one of"):
        attention_backends.set_attention_backend("xformers")
    monkeypatch.setitem(attention_backends._kernels, "sage", None)
    with pytest.raises(ValueError, match="sageattention"):
        attention_backends.set_attention_backend("sage")
    calls = []

    def fake_fa3(q, k, v, causal=False):
        calls.append(q.shape)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2), None                       # an older FA3 build: (out, lse)

    monkeypatch.setitem(attention_backends._kernels, "flash3", fake_fa3)
    monkeypatch.setattr(attention_backends, "_active", "sdpa")
    assert attention_backends.set_attention_backend("auto") == "flash3"
    q, k = torch.randn(2, 5, 2, 8), torch.randn(2, 7, 2, 8)
    assert attention_backends.backend_for(q, None) == "sdpa"                 # CPU / fp32: SDPA covers it
    assert attention_backends.backend_for(q.bfloat16(), torch.ones(2, 1, 1, 7, dtype=torch.bool)) == "sdpa"
    out = torch.ops.wanstream.attend_ext(q, k, k, "flash3")               # the custom op around the kernel
    ref = attention_backends.attend(q, k, k)
    assert calls == [q.shape] and torch.allclose(out, ref, atol=1e-6)


# ============================================================================================ host <-> device
def _transfer_roundtrip(device):
    frames = np.random.default_rng(0).integers(0, 256, (3, 8, 10, 3), dtype=np.uint8)
    for dtype in (torch.float32, torch.bfloat16):
        up = upload_frames(list(frames), device, dtype)
        assert up.device.type == torch.device(device).type and up.dtype == dtype
        assert torch.equal(up.cpu(), frames_to_tensor(frames).to(dtype))
    x = torch.randn(2, 3, 8, 10) * 1.2
    pending = start_download(x.to(device))
    assert np.array_equal(pending.wait(), tensor_to_frames(x))


def test_frame_transfer_matches_the_reference_conversions():
    _transfer_roundtrip("cpu")
    with pytest.raises(ValueError, match="uint8"):
        upload_frames([np.zeros((8, 10, 3), np.float32)], "cpu", torch.float32)
    with pytest.raises(ValueError, match=r"\[T, 3, H, W\]"):
        download_frames(torch.zeros(2, 8, 10, 3))


@cuda
def test_frame_transfer_on_cuda():
    _transfer_roundtrip("cuda")
