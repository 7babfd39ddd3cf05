"""Suspend and resume (engine/parking.py): a parked stream gives back its rows, and once resumed its output is
bit-identical (CPU) to a stream that was never parked; states that do not fit are refused and change nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kit import resume_elsewhere, tap_latents

from wanstream.engine.loop import Engine
from wanstream.engine.parking import NotParkable, StateError
from wanstream.io.video import make_motion_clip

W, H = 64, 48


@pytest.fixture(scope="module")
def clip():
    return make_motion_clip(60, W, H, seed=5)


def _prompt(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(200 + i)
    return torch.randn(1, 7, 4096, generator=g) * 0.1



def _run(model, clip, park_at: int | None, other: bool = True, via_blob: bool = False):
    """One stream (2 steps, noise controller on, a prompt transition running across the park) fed chunk by chunk;
    with ``park_at`` it is parked after that many chunks (2 frames of the next chunk already queued), another stream
    uses the freed rows meanwhile, then it resumes — with ``via_blob`` in a new engine, from the blob of its state
    and its input queue. Returns its frames, latents and the engine."""
    eng = Engine(model)
    lat: dict = {}
    tap_latents(eng, lat)
    s = eng.open(prompt_embeds=_prompt(0), width=W, height=H, steps=2, seed=7)
    frames, pos = [], 0
    for c in range(12):
        n = 5 if c == 0 else 4
        if c == 4:
            eng.set_prompt_embedding(s, _prompt(1), transition_chunks=4)
        if park_at is not None and c == park_at:
            eng.feed(s, clip[pos: pos + 2])                 # a partial chunk waits in the queue
            eng.run_until_idle()
            frames += [o.image for o in s.take_outputs()]
            rows_before = s.group.runner.pool.used_rows
            parked = eng.park(s)
            assert s.id not in eng.streams and parked.buffer is s.buffer
            assert s.group.runner.pool.used_rows == rows_before - 2      # its rows went back to the pool
            assert parked.nbytes > 0 and all(t.device.type == "cpu" for t in parked.tensors.values())
            if other:                                       # another stream takes the freed rows and scribbles
                o = eng.open(prompt_embeds=_prompt(3), width=W, height=H, steps=2, seed=99)
                eng.feed(o, clip[30:43])
                eng.run_until_idle()
                o.take_outputs()
                eng.close(o)
                eng.release_closed()
            if via_blob:
                other = Engine(model)                       # another engine (another server)
                tap_latents(other, lat)
                s, eng = resume_elsewhere(eng, parked, other), other
            else:
                s = eng.resume(parked)
            eng.feed(s, clip[pos + 2: pos + n])
            pos += n
        else:
            eng.feed(s, clip[pos: pos + n])
            pos += n
        eng.run_until_idle()
        frames += [o.image for o in s.take_outputs()]
    eng.finish(s)
    eng.run_until_idle()
    frames += [o.image for o in s.take_outputs()]
    mine = {**lat.get(0, {}), **lat.get(s.id, {})}             # its chunks before and after the park
    return frames, mine, eng, s


def test_a_parked_stream_resumes_bit_exact(tiny_model, clip):
    ref_frames, ref_lat, _, _ = _run(tiny_model, clip, None)
    frames, lat, eng, s = _run(tiny_model, clip, park_at=6)
    assert len(frames) == len(ref_frames) == 5 + 11 * 4                  # none lost, none repeated
    assert sorted(lat) == sorted(ref_lat)
    for c in ref_lat:
        assert torch.equal(lat[c], ref_lat[c]), c
    assert all(np.array_equal(a, b) for a, b in zip(frames, ref_frames))
    assert s.stats.chunks == 12                                          # its counters came back with it


def test_parking_refuses_what_it_cannot_take_and_changes_nothing(tiny_model, clip):
    eng = Engine(tiny_model)
    s = eng.open(prompt_embeds=_prompt(0), width=W, height=H, steps=2, seed=1)
    eng.feed(s, clip[:9])
    eng.run_until_idle()
    s.take_outputs()
    eng.update(s, noise_scale=0.7)                      # a live change waits for the next tick
    with pytest.raises(NotParkable, match="live changes"):
        eng.park(s)
    assert s.id in eng.streams and not s.closed
    eng.step()
    parked = eng.park(s)
    used = eng.groups[next(iter(eng.groups))].runner.pool.used_rows
    # states that do not fit this engine: refused before anything changes
    for mutate, match in ((lambda h, t: h.update(model="0" * 32), "another model"),
                          (lambda h, t: h.update(device="cuda"), "device"),
                          (lambda h, t: t.update({"kv.k.0": t["kv.k.0"][:1]}), "kv.k.0"),
                          (lambda h, t: h["runner"].update(latents=[]), "in flight"),
                          (lambda h, t: h["schedule"].update(steps=9), "integer"),
                          (lambda h, t: t.pop("noise.mix"), "noise.mix")):
        import copy
        bad = copy.copy(parked)
        bad.host, bad.tensors = copy.deepcopy(parked.host), dict(parked.tensors)
        mutate(bad.host, bad.tensors)
        with pytest.raises(StateError, match=match):
            eng.resume(bad)
        assert not eng.streams and eng.groups[next(iter(eng.groups))].runner.pool.used_rows == used
    s2 = eng.resume(parked)                             # the untouched state still resumes
    eng.feed(s2, clip[9:13])
    eng.run_until_idle()
    assert len(s2.take_outputs()) == 4


def test_a_stream_moved_as_a_blob_to_another_engine_resumes_bit_exact(tiny_model, clip):
    ref_frames, ref_lat, _, _ = _run(tiny_model, clip, None)
    frames, lat, _, s = _run(tiny_model, clip, park_at=5, other=False, via_blob=True)
    assert len(frames) == len(ref_frames)
    assert all(torch.equal(lat[c], ref_lat[c]) for c in ref_lat)
    assert all(np.array_equal(a, b) for a, b in zip(frames, ref_frames))


def test_a_blob_is_never_trusted(tiny_model, clip):
    from wanstream.engine.blob import HEADER, BlobError, dumps, loads
    from wanstream.engine.parking import check
    eng = Engine(tiny_model)
    s = eng.open(prompt_embeds=_prompt(0), width=W, height=H, steps=2, seed=1)
    eng.feed(s, clip[:9])
    eng.run_until_idle()
    s.take_outputs()
    data = dumps(eng.park(s), eng.clock(), {"note": "x"})
    parked, extra, images = loads(data, len(data), eng.clock())
    assert extra["note"] == "x" and images == [] and check(eng, parked) == (W, H)
    cases = {
        "too_large": (data, len(data) - 1),
        "malformed": [(data[:-10], len(data)), (data[:20], len(data)), (b"XXXX" + data[4:], len(data)),
                      (data[:HEADER.size + 100] + bytes([data[HEADER.size + 100] ^ 1]) + data[HEADER.size + 101:],
                       len(data)), (data + b"\0", len(data) + 1)],
        "version": (data[:4] + (2).to_bytes(2, "little") + data[6:], len(data)),
    }
    for kind, items in cases.items():
        for blob, cap in (items if isinstance(items, list) else [items]):
            with pytest.raises(BlobError) as err:
                loads(blob, cap, eng.clock())
            assert err.value.kind == kind
    parked.host["model"] = "f" * 32                      # a well-formed blob of another model
    with pytest.raises(StateError, match="another model"):
        check(eng, parked)
    assert not eng.streams


def test_a_self_forcing_stream_parks_and_resumes_bit_exact(tmp_path_factory, clip):
    """Parking carries what the other backbones add: their schedule's block and RoPE rebase, the clean frames a
    KV re-cache re-encodes; a blob of one backbone does not resume on another."""
    from kit import backbone_model_root

    from wanstream.models.loader import load_model
    model = load_model(backbone_model_root("self-forcing", tmp_path_factory.mktemp("sf")), device="cpu",
                       text_encoder=False)
    frames = clip[:33]
    ref_engine = Engine(model)
    ref = ref_engine.open(prompt_embeds=_prompt(0), width=W, height=H, seed=3)
    ref_engine.feed(ref, frames)
    ref_engine.finish(ref)
    ref_engine.run_until_idle()
    expect = ref.take_outputs()
    engine = Engine(model)
    s = engine.open(prompt_embeds=_prompt(0), width=W, height=H, seed=3)
    engine.feed(s, frames[:21])
    engine.run_until_idle()
    out = s.take_outputs()
    parked = engine.park(s)
    assert parked.host["runner"]["history"]                     # the re-cache window travels with it
    s = engine.resume(parked)
    engine.feed(s, frames[21:])
    engine.finish(s)
    engine.run_until_idle()
    out += s.take_outputs()
    assert [o.index for o in out] == [o.index for o in expect]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(out, expect))
    longlive = load_model(backbone_model_root("longlive", tmp_path_factory.mktemp("ll")), device="cpu",
                          text_encoder=False)
    with pytest.raises(StateError, match="another model|backbone"):
        Engine(longlive).resume(engine.park(s))


def test_a_stream_with_taehv_at_both_ends_parks_and_resumes_bit_exact(tiny_model_dir, clip):
    """The tiny autoencoder's encoder and decoder memories travel with a parked stream; its encoder state does not
    resume as another encoder's."""
    from wanstream.engine.parking import check
    from wanstream.models.loader import load_model
    model = load_model(tiny_model_dir, device="cpu", text_encoder=False, taehv=True)

    def run(park: bool):
        eng = Engine(model)
        s = eng.open(prompt_embeds=_prompt(0), width=W, height=H, seed=4, encoder="taehv", decoder="taehv")
        out = []
        for a, b in ((0, 13), (13, 21), (21, 33)):
            eng.feed(s, clip[a:b])
            eng.run_until_idle()
            out += s.take_outputs()
            if park and a == 0:
                parked = eng.park(s)
                assert parked.host["vae"]["enc"]["kind"] == "taehv_enc"
                s = eng.resume(parked)
        eng.finish(s)
        eng.run_until_idle()
        return out + s.take_outputs(), eng, s

    ref, _, _ = run(False)
    got, eng, s = run(True)
    assert len(got) == len(ref) == 33 and all(np.array_equal(a.image, b.image) for a, b in zip(got, ref))
    s2 = eng.open(prompt_embeds=_prompt(0), width=W, height=H, seed=4, encoder="taehv")
    eng.feed(s2, clip[:5])
    eng.run_until_idle()
    s2.take_outputs()
    parked = eng.park(s2)
    parked.host["stream"]["encoder"] = "vae"
    with pytest.raises(StateError, match="encoder state"):
        eng.resume(parked)
    parked.host["stream"]["encoder"] = "taehv"
    assert check(eng, parked) == (W, H)
