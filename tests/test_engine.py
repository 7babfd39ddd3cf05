"""The engine: streams batched into shared DiT calls give what each stream gives alone; the shared KV pool lends,
re-lays and compacts rows; continuous batching really shares calls; one stream's failure ends only that stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kit import tap_latents

from wanstream.engine.loop import Engine
from wanstream.io.video import make_motion_clip
from wanstream.models.kv_cache import KVPool, prompt_groups, runs

W, H = 80, 48
LATENT_TOL = 1e-5


@pytest.fixture(scope="module")
def clips():
    return [make_motion_clip(44, W, H, seed=10 + i) for i in range(4)]


def _prompt(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(1, 9, 4096, generator=g) * 0.1


# Four streams: different prompts, seeds and step counts. D joins late, B leaves early, C changes steps and prompt
# live. Times are in ticks; each tick feeds every active stream one chunk (5 frames for its first, then 4).
PLAN = {
    "A": dict(steps=1, seed=1, start=0, stop=None),
    "B": dict(steps=2, seed=2, start=0, stop=5),
    "C": dict(steps=3, seed=3, start=0, stop=None, steps_at=4, new_steps=2, prompt_at=6),
    "D": dict(steps=4, seed=4, start=3, stop=None),
}
TICKS = 10



def _run(model, clips, names, shared: bool):
    """Run the plan; ``shared``: all streams on one engine, else each on its own. Returns frames and latents by
    stream name."""
    engines = {}
    streams = {}
    taps: dict = {}
    frames: dict = {n: [] for n in names}
    fed = {n: 0 for n in names}
    one = Engine(model) if shared else None
    if one is not None:
        tap_latents(one, taps.setdefault(id(one), {}))
    for tick in range(TICKS + 8):
        for i, n in enumerate(names):
            p = PLAN[n]
            if tick == p["start"]:
                eng = one or Engine(model)
                if one is None:
                    tap_latents(eng, taps.setdefault(id(eng), {}))
                engines[n] = eng
                streams[n] = eng.open(prompt_embeds=_prompt(i), width=W, height=H, steps=p["steps"], seed=p["seed"])
            s = streams.get(n)
            if s is None or s.closed or tick >= TICKS:
                continue
            if tick == p.get("steps_at"):
                engines[n].update(s, steps=p["new_steps"])
            if tick == p.get("prompt_at"):
                engines[n].set_prompt_embedding(s, _prompt(9), transition_chunks=2)
            if tick == p["stop"]:
                engines[n].finish(s)
                continue
            k = 5 if fed[n] == 0 else 4
            engines[n].feed(s, clips[i][fed[n]: fed[n] + k])
            fed[n] += k
            if tick == TICKS - 1:
                engines[n].finish(s)
        for eng in ({id(e): e for e in engines.values()}.values()):
            eng.step()
        for n, s in streams.items():
            frames[n] += [o.image for o in s.take_outputs()]
    for eng in {id(e): e for e in engines.values()}.values():
        eng.run_until_idle(100)
    for n, s in streams.items():
        frames[n] += [o.image for o in s.take_outputs()]
    latents = {n: taps[id(engines[n])].get(streams[n].id, {}) for n in names}
    return frames, latents, fed, engines


def test_streams_batched_together_equal_each_stream_alone(tiny_model, clips):
    names = list(PLAN)
    shared_frames, shared_lat, fed, engines = _run(tiny_model, clips, names, shared=True)
    alone_frames, alone_lat, _, alone_engines = _run(tiny_model, clips, names, shared=False)
    _engines_alone = list(alone_engines.values())
    engine = engines["A"]
    for n in names:
        assert len(shared_frames[n]) == fed[n] == len(alone_frames[n]), n      # every frame out
        assert sorted(shared_lat[n]) == sorted(alone_lat[n])
        worst = max((shared_lat[n][c] - alone_lat[n][c]).abs().max().item() for c in alone_lat[n])
        assert worst <= LATENT_TOL, (n, worst)
        diff = np.abs(np.stack(shared_frames[n]).astype(int) - np.stack(alone_frames[n]).astype(int)).max()
        assert diff <= 1, (n, diff)
    # the streams really shared calls: far fewer DiT calls than chunks of all streams, several rows per call
    alone_calls = sum(e.dit_calls for e in _engines_alone)
    assert engine.dit_calls < 0.5 * alone_calls, (engine.dit_calls, alone_calls)
    assert engine.rows_run / engine.dit_calls > 2.5


def test_pool_leases_stay_packed_through_joins_leaves_and_step_changes():
    pool = KVPool(range(2), capacity=3, tokens_per_frame=2, heads=1, head_dim=4, dtype=torch.float32, device="cpu",
                  text_len=5)
    for sid, rows in (("a", 2), ("b", 3), ("c", 1)):
        pool.acquire(sid, rows)
        lease = pool.leases[sid]
        for i in pool.k:
            pool.k[i][lease.row: lease.row + rows] = torch.arange(rows).float()[:, None, None, None] + 10 * len(sid) * ord(sid)
            pool.pk[i][lease.slot] = ord(sid)
    snap = {sid: pool.k[0][pool.leases[sid].row: pool.leases[sid].row + pool.leases[sid].rows].clone()
            for sid in "abc"}
    pool.release("b")                                        # c moves down over b's rows and slot
    assert [(l.row, l.rows, l.slot) for l in pool.leases.values()] == [(0, 2, 0), (2, 1, 1)]
    assert torch.equal(pool.k[0][2:3], snap["c"]) and torch.equal(pool.pk[1][1], torch.full_like(pool.pk[1][1], ord("c")))
    pool.resize("a", 4)                                      # a grows: c moves up first, a's rows re-laid
    assert [(l.row, l.rows) for l in pool.leases.values()] == [(0, 4), (4, 1)]
    assert torch.equal(pool.k[0][4:5], snap["c"])
    assert torch.equal(pool.k[0][0:4], snap["a"][[0, 1, 1, 1]])   # new levels start from the closest old level
    pool.resize("a", 1)
    assert [(l.row, l.rows) for l in pool.leases.values()] == [(0, 1), (1, 1)]
    assert torch.equal(pool.k[0][1:2], snap["c"]) and torch.equal(pool.k[0][0:1], snap["a"][:1])
    rows_before = pool.rows
    pool.acquire("d", 2)                                     # fits in the storage already there: no growth
    assert pool.rows == rows_before and pool.leases["d"].row == 2


def test_call_layout_runs_and_prompt_groups():
    assert runs([4, 5, 6, 0, 1, 9]) == [(0, 3, 4), (3, 5, 0), (5, 6, 9)]
    # two streams of 2 rows each with their own slots → one grouped attention over 2 slots
    assert prompt_groups([0, 0, 1, 1]) == [(0, 4, 0, 2)]
    # mixed step counts: runs of different lengths stay separate groups
    assert prompt_groups([0, 1, 1, 2, 2, 2]) == [(0, 1, 0, 1), (1, 3, 1, 1), (3, 6, 2, 1)]
    assert prompt_groups([3, 3, 3]) == [(0, 3, 3, 1)]


@pytest.mark.parametrize("batch_vae", [False, True])
def test_a_failure_in_one_stream_ends_only_that_stream(tiny_model, clips, batch_vae):
    """A decoder fault of one stream (also inside a batched decode of both) ends that stream only."""
    engine = Engine(tiny_model, batch_vae=batch_vae)
    good = engine.open(prompt_embeds=_prompt(0), width=W, height=H, steps=2, seed=1)
    bad = engine.open(prompt_embeds=_prompt(1), width=W, height=H, steps=2, seed=2)
    original = tiny_model.vae.decode_many

    def decode(states, latents, *a, **k):
        if any(st is bad.dec_state for st in states):
            raise RuntimeError("simulated decoder fault")
        return original(states, latents, *a, **k)
    faults = []
    engine.on_fault = lambda s, msg: faults.append((s.id, msg))
    tiny_model.vae.decode_many = decode
    try:
        for k in range(4):
            n = 5 if k == 0 else 4
            for s, clip in ((good, clips[0]), (bad, clips[1])):
                if not s.closed:
                    engine.feed(s, clip[(0 if k == 0 else 1 + 4 * k): (5 if k == 0 else 5 + 4 * k)])
            engine.step()
    finally:
        del tiny_model.vae.decode_many
    assert bad.closed and "simulated decoder fault" in bad.error and faults == [(bad.id, bad.error)]
    assert not good.closed and good.stats.frames_out >= 9
    with pytest.raises(RuntimeError, match="closed"):
        engine.feed(bad, clips[1][:4])
    assert bad.id not in engine.streams and list(engine.groups.values())[0].runner.pool.used_rows == 2


def test_vae_work_of_several_streams_shares_calls_and_equals_each_alone(tiny_model, clips):
    """With VAE batching on, the chunks of streams at the same phase are encoded (and decoded) in one call each;
    a stream that joins later runs its first chunk in its own call; every stream equals itself alone."""
    calls = []
    original = tiny_model.vae.encode_many

    def spy(states, frames, *a, **k):
        calls.append(frames.shape[0])
        return original(states, frames, *a, **k)

    def run(shared: bool):
        engine = Engine(tiny_model, batch_vae=True)
        outs = {}
        streams = {}
        for k in range(5):
            if k in (0, 2):                                 # stream 2 joins at tick 2
                for i in ((0, 1) if k == 0 else (2,)):
                    eng = engine if shared else Engine(tiny_model)
                    streams[i] = (eng, eng.open(prompt_embeds=_prompt(i), width=W, height=H, steps=2, seed=i))
            for i, (eng, s) in streams.items():
                start = 0 if s.frames_in == 0 else s.frames_in
                eng.feed(s, clips[i][start: start + (5 if start == 0 else 4)])
            for eng in {id(e): e for e, _ in streams.values()}.values():
                eng.step()
        for i, (eng, s) in streams.items():
            eng.finish(s)
            eng.run_until_idle(50)
            outs[i] = np.stack([o.image for o in s.take_outputs()])
        return outs

    tiny_model.vae.encode_many = spy
    try:
        shared = run(True)
    finally:
        del tiny_model.vae.encode_many
    alone = run(False)
    assert 2 in calls                                       # streams 0 and 1 shared encode calls
    for i in shared:
        assert shared[i].shape == alone[i].shape
        assert np.abs(shared[i].astype(int) - alone[i].astype(int)).max() <= 1


def test_streams_with_different_autoencoders_share_dit_calls_and_equal_each_alone(tiny_model_dir, clips):
    """Wan VAE or TAEHV at either end, per stream: the four mixes share DiT calls on one engine (the VAE work runs
    per autoencoder) and each stream gives what it gives alone."""
    from wanstream.models.loader import load_model
    model = load_model(tiny_model_dir, device="cpu", text_encoder=False, taehv=True)
    mixes = [("vae", "vae"), ("taehv", "vae"), ("vae", "taehv"), ("taehv", "taehv")]

    def run(shared: bool):
        one = Engine(model, batch_vae=True)
        streams = []
        for i, (enc, dec) in enumerate(mixes):
            eng = one if shared else Engine(model, batch_vae=True)
            streams.append((eng, eng.open(prompt_embeds=_prompt(i), width=W, height=H, steps=2, seed=i,
                                          encoder=enc, decoder=dec)))
        for k in range(4):
            for i, (eng, s) in enumerate(streams):
                eng.feed(s, clips[i][0 if k == 0 else 1 + 4 * k: 5 + 4 * k])
            for eng in {id(e): e for e, _ in streams}.values():
                eng.step()
        outs = []
        for eng, s in streams:
            eng.finish(s)
            eng.run_until_idle(50)
            outs.append(np.stack([o.image for o in s.take_outputs()]))
        return outs, {id(e): e for e, _ in streams}.values()
    shared, (engine,) = run(True)
    alone, engines = run(False)
    alone_calls = sum(e.dit_calls for e in engines)       # the four streams' rows ran in shared calls
    assert engine.dit_calls < 0.5 * alone_calls and engine.rows_run == sum(e.rows_run for e in engines)
    for (enc, dec), a, b in zip(mixes, shared, alone):
        assert a.shape == b.shape and a.shape[0] == 17, (enc, dec)
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1, (enc, dec)
    taehv_out, vae_out = shared[1], shared[0]               # the encoder changes what the DiT sees
    assert np.abs(taehv_out.astype(int) - vae_out.astype(int)).max() > 8
    with pytest.raises(ValueError, match="encoder='taehv' needs a model loaded with taehv=True"):
        Engine(load_model(tiny_model_dir, device="cpu", text_encoder=False)).open(
            prompt_embeds=_prompt(0), width=W, height=H, encoder="taehv")
    with pytest.raises(ValueError, match="encoder must be 'vae' or 'taehv'"):
        engine.open(prompt_embeds=_prompt(0), width=W, height=H, encoder="vqgan")
