"""VACE conditioning through the engine: a reference image per stream, streams with and without conditioning in
one DiT call equal each alone, live strength / clear, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wanstream.engine.loop import Engine
from wanstream.io.video import make_motion_clip

W, H = 80, 48
LATENT_TOL = 1e-5


@pytest.fixture(scope="module")
def vace_model(tmp_path_factory):
    from wanstream.models.loader import load_model
    from wanstream.models.random_init import init_random
    root = tmp_path_factory.mktemp("vace_engine")
    init_random(root, "tiny", seed=0, log=lambda *_: None, vace=True)
    return load_model(root, device="cpu", text_encoder=False)


@pytest.fixture(scope="module")
def clips():
    return [make_motion_clip(21, W, H, seed=30 + i) for i in range(2)]


def _prompt(i: int) -> torch.Tensor:
    return torch.randn(1, 9, 4096, generator=torch.Generator().manual_seed(200 + i)) * 0.1


def _reference() -> np.ndarray:
    rng = np.random.default_rng(5)
    return rng.integers(0, 255, (60, 100, 3), dtype=np.uint8)       # another size: framed like the frames


def _run(model, clips, refs, shared: bool, strength_at: int | None = None):
    """Each stream i: reference ``refs[i]`` (None: no conditioning); returns frames and latents per stream."""
    engines, streams, lat = [], [], []
    one = Engine(model) if shared else None
    for i, ref in enumerate(refs):
        eng = one or Engine(model)
        s = eng.open(prompt_embeds=_prompt(i), width=W, height=H, steps=2, seed=i)
        if ref is not None:
            eng.set_conditioning(s, reference=ref, strength=0.8)
        engines.append(eng)
        streams.append(s)
    for eng in {id(e): e for e in engines}.values():
        sink = {}
        original = eng.codec.decode

        def tap(finished, sink=sink, original=original):
            for sid, items in finished.items():
                for _, d in items:
                    sink.setdefault(sid, {})[d.row.chunk] = d.latent.clone()
            return original(finished)
        eng.codec.decode = tap
        lat.append((eng, sink))
    fed = 0
    tick = 0
    while fed < 21:
        k = 5 if fed == 0 else 4
        for i, s in enumerate(streams):
            engines[i].feed(s, clips[i][fed: fed + k])
            if tick == strength_at and refs[i] is not None:
                engines[i].set_conditioning(s, strength=0.3)
        fed += k
        tick += 1
        for eng in {id(e): e for e in engines}.values():
            eng.step()
    for i, s in enumerate(streams):
        engines[i].finish(s)
    for eng in {id(e): e for e in engines}.values():
        eng.run_until_idle(100)
    frames = [np.stack([o.image for o in s.take_outputs()]) for s in streams]
    sinks = {id(e): sk for e, sk in lat}
    latents = [sinks[id(engines[i])][s.id] for i, s in enumerate(streams)]
    return frames, latents, engines


def test_conditioned_and_plain_streams_share_calls_and_equal_each_alone(vace_model, clips):
    refs = [_reference(), None]
    shared_f, shared_l, engines = _run(vace_model, clips, refs, shared=True, strength_at=2)
    alone_f, alone_l, _ = _run(vace_model, clips, refs, shared=False, strength_at=2)
    for i in range(2):
        assert shared_f[i].shape[0] == 21 == alone_f[i].shape[0]
        worst = max((shared_l[i][c] - alone_l[i][c]).abs().max().item() for c in alone_l[i])
        assert worst <= LATENT_TOL, (i, worst)
    assert engines[0].rows_run / engines[0].dit_calls > 1.5          # they shared calls
    plain_f, plain_l, _ = _run(vace_model, clips, [None, None], shared=False)
    assert max((plain_l[1][c] - shared_l[1][c]).abs().max().item() for c in plain_l[1]) <= LATENT_TOL
    assert max((plain_l[0][c] - shared_l[0][c]).abs().max().item() for c in plain_l[0]) > 1e-3   # it steers


def test_clearing_the_reference_and_bad_input(vace_model, tiny_model, clips):
    eng = Engine(vace_model)
    s = eng.open(prompt_embeds=_prompt(0), width=W, height=H, steps=1, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        eng.set_conditioning(s, reference=np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="strength must be in"):
        eng.set_conditioning(s, strength=9)
    eng.set_conditioning(s, reference=_reference())
    eng.feed(s, clips[0][:5])
    eng.step()
    st = eng.groups[next(iter(eng.groups))].runner.streams[s.id]
    assert st.vace.reference is not None
    eng.set_conditioning(s, reference=None)
    eng.feed(s, clips[0][5:9])
    eng.step()
    assert st.vace.reference is None and not st.vace.active
    plain = Engine(tiny_model)
    p = plain.open(prompt_embeds=_prompt(0), width=W, height=H, steps=1, seed=0)
    with pytest.raises(ValueError, match="no VACE modules.*wanstream download vace-1.3b"):
        plain.set_conditioning(p, reference=_reference())


@pytest.fixture(scope="module")
def sf_vace_model(tmp_path_factory):
    from wanstream.models.loader import load_model
    from wanstream.models.random_init import init_random
    root = tmp_path_factory.mktemp("sf_vace")
    init_random(root, "tiny", seed=0, log=lambda *_: None, backbone="self-forcing", vace=True)
    return load_model(root, device="cpu", text_encoder=False)


def _t2v_with_reference(model, cache=None):
    """A Self-Forcing clip of 20 blocks (60 DiT calls: 2 levels + the context pass each) with a reference."""
    eng = Engine(model)
    frames = 9 + 12 * 19
    s = eng.open(prompt_embeds=_prompt(3), width=W, height=H, steps=2, mode="t2v", frames=frames, seed=1,
                 cache=cache)
    eng.set_conditioning(s, reference=_reference())
    got = {}
    original = eng.codec.decode

    def tap(finished):
        for _, items in finished.items():
            for _, d in items:
                got[d.row.chunk] = d.latent.clone()
        return original(finished)
    eng.codec.decode = tap
    eng.run_until_idle()
    assert not s.error and len(s.take_outputs()) == frames
    assert eng.dit_calls == 60
    return torch.cat([got[c] for c in sorted(got)], dim=1)


def test_reference_prefix_turns_back_with_the_cache_on_rope_rebase(sf_vace_model, monkeypatch):
    """The reference stays attended over a 60-call run: with the RoPE table cut to 30 positions (a rebase every
    few blocks) the stream equals the uncut one; a prefix left unturned (negative control) does not."""
    from dataclasses import replace

    from wanstream.core.backbones import SELF_FORCING
    from wanstream.engine import runner as runner_module
    want = _t2v_with_reference(sf_vace_model)
    short = replace(SELF_FORCING.t2v_cache, rope_wrap_at=30, rope_wrap_to=12)
    assert (_t2v_with_reference(sf_vace_model, short) - want).abs().max().item() <= 1e-4
    monkeypatch.setattr(runner_module, "rebase_reference", lambda *a: None)
    assert (_t2v_with_reference(sf_vace_model, short) - want).abs().max().item() > 1e-3


@pytest.fixture(scope="module")
def vace_root(tmp_path_factory):
    from wanstream.models.random_init import init_random
    root = tmp_path_factory.mktemp("vace_cli")
    init_random(root, "tiny", seed=0, log=lambda *_: None, vace=True)
    return root


def test_v2v_and_t2v_take_a_reference_and_refuse_bad_images(vace_root, clip_path, tmp_path, capsys):
    from PIL import Image

    from wanstream.cli.main import main
    from wanstream.io.reading import open_video
    img = tmp_path / "ref.png"
    Image.fromarray(_reference()).save(img)
    out = tmp_path / "o.mp4"
    assert main(["v2v", str(clip_path), "-o", str(out), "--model", str(vace_root), "--prompt", "x", "--device",
                 "cpu", "--reference", str(img), "--reference-strength", "0.5"]) == 0
    assert open_video(out).info.frames == 14
    t2v = tmp_path / "t.mp4"
    assert main(["t2v", "--prompt", "a fox", "--frames", "10", "-o", str(t2v), "--model", str(vace_root),
                 "--device", "cpu", "--resolution", "64x48", "--steps", "1", "--reference", str(img),
                 "--reference", str(img)]) == 0                                 # two images: a 2-frame prefix
    capsys.readouterr()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    assert main(["v2v", str(clip_path), "-o", str(tmp_path / "b.mp4"), "--model", str(vace_root), "--prompt", "x",
                 "--device", "cpu", "--reference", str(bad)]) == 2
    assert "is not an image" in capsys.readouterr().err
    assert not (tmp_path / "b.mp4").exists()


def test_reference_images_are_validated():
    import io

    from PIL import Image

    from wanstream.api.conditioning import ReferenceImageError, decode_reference

    def encoded(fmt, size=(8, 6)):
        buf = io.BytesIO()
        Image.new("RGB", size, (10, 20, 30)).save(buf, fmt)
        return buf.getvalue()
    assert decode_reference(encoded("PNG")).shape == (6, 8, 3)
    assert decode_reference(encoded("JPEG")).dtype == np.uint8
    for data, kind in [(b"", "not_an_image"), (b"GIF89a-garbage", "not_an_image"), (encoded("GIF"), "wrong_type"),
                       (encoded("TIFF"), "wrong_type")]:
        with pytest.raises(ReferenceImageError) as err:
            decode_reference(data)
        assert err.value.kind == kind
    with pytest.raises(ReferenceImageError, match="too large: .* bytes"):
        decode_reference(encoded("PNG"), max_bytes=10)
    with pytest.raises(ReferenceImageError, match="too large: 8x6 pixels"):
        decode_reference(encoded("PNG"), max_pixels=40)


def test_v2v_takes_a_control_kind_or_a_control_video(vace_root, clip_path, tmp_path):
    from wanstream.cli.main import main
    from wanstream.io.reading import open_video
    out = tmp_path / "edges.mp4"
    assert main(["v2v", str(clip_path), "-o", str(out), "--model", str(vace_root), "--prompt", "x", "--device",
                 "cpu", "--control", "edges"]) == 0
    assert open_video(out).info.frames == 14
    out = tmp_path / "video.mp4"
    assert main(["v2v", str(clip_path), "-o", str(out), "--model", str(vace_root), "--prompt", "x", "--device",
                 "cpu", "--control-video", str(clip_path), "--reference-strength", "0.7"]) == 0
    assert open_video(out).info.frames == 14
    assert main(["v2v", str(clip_path), "-o", str(tmp_path / "d.mp4"), "--model", str(vace_root), "--prompt", "x",
                 "--device", "cpu", "--control", "depth"]) == 2                      # no depth model: named
    assert not (tmp_path / "d.mp4").exists()


def test_bench_reference_and_control_give_a_plain_and_a_conditioned_row(vace_root, tmp_path, capsys):
    from PIL import Image

    from wanstream.cli import bench as bench_cli
    from wanstream.cli.main import build_parser
    img = tmp_path / "ref.png"
    Image.fromarray(_reference()).save(img)
    out = tmp_path / "bench.json"
    args = build_parser().parse_args(["bench", "--model", str(vace_root), "--device", "cpu", "--resolution", "32x32",
                                      "--frames", "21", "--warmup", "2", "--prime-chunks", "1", "--no-peak",
                                      "--reference", str(img), "--control", "edges", "--json", str(out), "--quiet"])
    assert bench_cli.run_bench(args) == 0
    import json
    rows = json.loads(out.read_text())["rows"]
    assert [r["conditioning"] for r in rows] == ["plain", "ref + edges"]
    assert rows[1]["stage_ms"]["control"] > 0 and rows[1]["stage_ms"]["control_encode"] > 0
    assert rows[1]["reference_once_ms"] > 0 and "control" not in rows[0]["stage_ms"]
    text = capsys.readouterr().out
    assert "VACE conditioning" in text and max(len(line) for line in text.splitlines()) <= 100


def _conditioned_run(model, clip, park_at=None, via_blob=False):
    """A stream with a reference and edges control, 10 chunks; parked after ``park_at`` chunks and resumed (with
    ``via_blob`` in a new engine from its blob). Returns its latents by chunk."""
    eng = Engine(model)
    lat = {}

    def tap(finished, original=eng.codec.decode):
        for _, items in finished.items():
            for _, d in items:
                lat[d.row.chunk] = d.latent.clone()
        return original(finished)
    eng.codec.decode = tap
    s = eng.open(prompt_embeds=_prompt(5), width=W, height=H, steps=2, seed=3)
    eng.set_conditioning(s, reference=_reference(), control="edges", strength=0.7)
    pos = 0
    for c in range(10):
        n = 5 if c == 0 else 4
        if c == park_at:
            parked = eng.park(s)
            if via_blob:
                from kit import resume_elsewhere
                other = Engine(model)
                other.codec.decode = lambda finished, original=other.codec.decode: tap(finished, original)
                s, eng = resume_elsewhere(eng, parked, other), other
            else:
                s = eng.resume(parked)
        eng.feed(s, clip[pos: pos + n])
        pos += n
        eng.run_until_idle()
        s.take_outputs()
    return lat, s


@pytest.mark.parametrize("via_blob", [False, True])
def test_a_conditioned_stream_parks_and_resumes_bit_exact(vace_model, via_blob):
    clip = make_motion_clip(41, W, H, seed=12)
    want, _ = _conditioned_run(vace_model, clip)
    got, s = _conditioned_run(vace_model, clip, park_at=5, via_blob=via_blob)
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[c], want[c]) for c in want)
    vace = s.group.runner.streams[s.id].vace
    assert vace.reference is not None and vace.control.kind == "edges" and vace.strength == 0.7


def test_a_stream_steered_by_a_control_video_is_not_parkable(vace_model):
    from wanstream.engine.parking import NotParkable
    eng = Engine(vace_model)
    s = eng.open(prompt_embeds=_prompt(0), width=W, height=H, steps=1, seed=0)
    eng.set_conditioning(s, control="video", control_video=[np.zeros((H, W, 3), np.uint8)])
    eng.feed(s, make_motion_clip(5, W, H))
    eng.run_until_idle()
    s.take_outputs()
    with pytest.raises(NotParkable, match="control video"):
        eng.park(s)
    assert s.id in eng.streams


def test_presets_carry_a_reference_file_or_an_embedded_image(vace_root, clip_path, tmp_path):
    import json

    from PIL import Image

    from wanstream.api.conditioning import ReferenceImageError, data_uri
    from wanstream.api.presets import Preset, PresetError
    from wanstream.cli.main import main
    folder = tmp_path / "looks"
    folder.mkdir()
    Image.fromarray(_reference()).save(folder / "look.png")
    path = folder / "p.json"
    path.write_text(json.dumps({"format": "wanstream-preset", "version": 1, "prompt": "ink",
                                "conditioning": {"reference": "look.png", "strength": 0.6, "control": "edges"}}))
    preset = Preset.load(path)
    assert preset.conditioning.image(preset.folder).shape == (60, 100, 3)
    moved = preset.save(tmp_path / "elsewhere" / "q.json")            # the relative path follows the file
    assert Preset.load(moved).conditioning.image(moved.parent).shape == (60, 100, 3)
    embedded = Preset(conditioning={"reference": data_uri(_reference())})
    assert embedded.conditioning.embedded and embedded.conditioning.image().shape == (60, 100, 3)
    with pytest.raises(ReferenceImageError, match="wrong type"):
        Preset(conditioning={"reference": "data:text/plain;base64,aGk="}).conditioning.image()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"conditioning": {"strength": 9}}))
    with pytest.raises(PresetError, match="conditioning.strength"):
        Preset.load(bad)
    out = tmp_path / "o.mp4"                                           # v2v --preset: its reference and control
    assert main(["v2v", str(clip_path), "-o", str(out), "--model", str(vace_root), "--device", "cpu", "--preset",
                 str(path)]) == 0
    from wanstream.cli.main import build_parser
    from wanstream.cli.presets import apply_preset
    args = apply_preset(build_parser(), ["v2v", str(clip_path), "-o", str(out), "--model", str(vace_root),
                                         "--preset", str(path)], "v2v", path)
    assert args.control == "edges" and args.reference_strength == 0.6 and len(args.preset_reference) == 1
