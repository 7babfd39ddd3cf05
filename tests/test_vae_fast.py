"""Fast streaming Wan VAE: equal to diffusers' eager modules, conformance compiled, batched streams == alone."""

from __future__ import annotations

import json

import pytest
import torch
from kit import kit_dir
from test_vae import test_conformance_stream_encode_decode as _run_conformance  # one conformance check

from wanstream.bench.vae_compare import compare_vae_paths
from wanstream.models import vae_fast
from wanstream.models.checkpoints import build_vae, read_torch_file
from wanstream.models.vae import StreamingVAE

EQ = 1e-5        # same math, different kernels / batch
# NNPACK's convolutions are Winograd F(6x6, 3x3) transforms: a few 1e-5 from the direct ones at the tiny VAE
NNPACK_EQ = 5e-5
IMPLS = ["stack2d", "conv3d"] + (["nnpack"] if vae_fast.nnpack_available() else [])


@pytest.fixture(params=["auto", "everywhere"])
def nnpack_area(request, monkeypatch):
    """NNPACK on the frames it is picked for (``auto``: 48x80 and up) or on every frame, the smallest included."""
    if not vae_fast.nnpack_available():
        pytest.skip("NNPACK is not available here")
    if request.param == "everywhere":
        monkeypatch.setattr(vae_fast, "NNPACK_MIN_AREA", 0)


@pytest.fixture(scope="module")
def vae():
    return build_vae(read_torch_file(kit_dir() / "Wan2.1_VAE_tiny.pth"), "tiny vae")


def _video(seed: int, t: int = 13, h: int = 16, w: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, t, 3, h, w, generator=g) * 2 - 1


def _latents(seed: int, t: int = 4, h: int = 2, w: int = 3) -> torch.Tensor:
    return torch.randn(1, t, 16, h, w, generator=torch.Generator().manual_seed(seed))


def _chunks(t_total: int) -> list[tuple[int, int]]:
    return [(0, 5)] + [(a, a + 4) for a in range(5, t_total - 3, 4)]


@pytest.mark.parametrize("conv_impl", ["stack2d", "conv3d"])
def test_fast_path_conformance(vae, conv_impl):
    _run_conformance(StreamingVAE(vae, conv_impl=conv_impl))


def test_nnpack_path_conformance(vae, nnpack_area):
    svae = StreamingVAE(vae, conv_impl="nnpack")
    assert svae.fast.channels_first
    _run_conformance(svae)


def test_default_conv_impl_by_device_and_width():
    assert vae_fast.default_conv_impl(torch.device("cuda"), 96) == "conv3d"
    assert vae_fast.default_conv_impl(torch.device("cpu"), 8) == "stack2d"          # the tiny preset
    assert vae_fast.default_conv_impl(torch.device("cpu"), 96) == \
        ("nnpack" if vae_fast.nnpack_available() else "stack2d")
    assert StreamingVAE(build_vae(read_torch_file(kit_dir() / "Wan2.1_VAE_tiny.pth"), "tiny")).fast.impl == "stack2d"


def _fast_equals_eager(fast: StreamingVAE, eager: StreamingVAE, tol: float) -> None:
    """Chunk by chunk over a stream (first call included), normalised encode too, batch of 2 rows."""
    video = torch.cat([_video(0), _video(1)])
    sf, se = fast.new_state(), eager.new_state()
    for a, b in _chunks(13):
        mf, me = fast.encode(sf, video[:, a:b], normalize=True), eager.encode(se, video[:, a:b], normalize=True)
        assert mf.shape == me.shape and (mf - me).abs().max() <= tol
    z = torch.cat([_latents(0), _latents(1)])
    sf, se = fast.new_state(), eager.new_state()
    for a, b in ((0, 2), (2, 3), (3, 4)):
        pf, pe = fast.decode(sf, z[:, a:b]), eager.decode(se, z[:, a:b])
        assert pf.shape == pe.shape and pf.dtype == torch.float32 and (pf - pe).abs().max() <= tol


def test_fast_equals_eager_diffusers_stream(vae):
    _fast_equals_eager(StreamingVAE(vae), StreamingVAE(vae, fast=False), EQ)


def test_nnpack_equals_eager_diffusers_stream(vae, nnpack_area):
    _fast_equals_eager(StreamingVAE(vae, conv_impl="nnpack"), StreamingVAE(vae, fast=False), NNPACK_EQ)


def test_fast_path_shares_the_module_weights(vae):
    """The fast path reads the diffusers parameters: changing a norm's gamma changes its output."""
    svae = StreamingVAE(vae)
    norm = vae.decoder.up_blocks[-1].resnets[-1].norm1
    z = _latents(2)[:, :2]
    before = svae.decode(svae.new_state(), z)
    with torch.no_grad():
        norm.gamma.mul_(2)
    try:
        after = svae.decode(svae.new_state(), z)
    finally:
        with torch.no_grad():
            norm.gamma.div_(2)
    assert (after - before).abs().max() > 1e-3


class _Stream:
    """One stream's inputs and its outputs when run alone."""

    def __init__(self, svae: StreamingVAE, seed: int, n_chunks: int):
        self.video = _video(seed, t=1 + 4 * n_chunks)
        self.z = _latents(seed, t=1 + n_chunks)
        self.enc_chunks = _chunks(self.video.shape[1])
        self.dec_chunks = [(0, 2)] + [(i, i + 1) for i in range(2, self.z.shape[1])]
        s = svae.new_state()
        self.mu_alone = [svae.encode(s, self.video[:, a:b]) for a, b in self.enc_chunks]
        s = svae.new_state()
        self.px_alone = [svae.decode(s, self.z[:, a:b]) for a, b in self.dec_chunks]
        self.enc, self.dec = svae.new_state(), svae.new_state()
        self.i = 0


def _tick(svae: StreamingVAE, streams: list[_Stream], tol: float = EQ) -> None:
    """Encode + decode the next chunk of every stream, one call per phase group, checking against alone."""
    groups = [[s for s in streams if s.enc.first_encode == first] for first in (True, False)]
    for group in filter(None, groups):
        frames = torch.cat([s.video[:, slice(*s.enc_chunks[s.i])] for s in group])
        mu = svae.encode_many([s.enc for s in group], frames)
        lat = torch.cat([s.z[:, slice(*s.dec_chunks[s.i])] for s in group])
        px = svae.decode_many([s.dec for s in group], lat)
        for k, s in enumerate(group):
            assert (mu[k:k + 1] - s.mu_alone[s.i]).abs().max() <= tol
            assert px[k:k + 1].shape == s.px_alone[s.i].shape
            assert (px[k:k + 1] - s.px_alone[s.i]).abs().max() <= tol
            s.i += 1


@pytest.mark.parametrize("path", ["fast", "eager", "nnpack"])
def test_many_streams_equal_each_stream_alone(vae, path, monkeypatch):
    """Streams join at different ticks, leave, come back reordered: every chunk equals the stream alone."""
    if path == "nnpack":
        if not vae_fast.nnpack_available():
            pytest.skip("NNPACK is not available here")
        monkeypatch.setattr(vae_fast, "NNPACK_MIN_AREA", 0)
    svae = StreamingVAE(vae, fast=path != "eager", conv_impl="nnpack" if path == "nnpack" else None)
    a, b, c, d = (_Stream(svae, seed, 5) for seed in range(4))
    for live in ([a], [a, b], [a, b, c, d], [d, c, a], [b, c, a]):
        _tick(svae, live, NNPACK_EQ if path == "nnpack" else EQ)
    assert [s.i for s in (a, b, c, d)] == [5, 3, 3, 2]


def test_same_streams_in_the_same_order_reuse_the_stacked_caches(vae):
    svae = StreamingVAE(vae)
    states = [svae.new_state() for _ in range(3)]
    video = torch.cat([_video(s, t=9) for s in range(3)])
    svae.encode_many(states, video[:, :5])
    shared = states[0].enc_rows.caches
    assert all(s.enc_rows.caches is shared for s in states)
    assert [(s.enc_rows.a, s.enc_rows.b) for s in states] == [(0, 1), (1, 2), (2, 3)]
    from wanstream.models import vae as vae_mod
    assert vae_mod._gather([s.enc_rows for s in states], "encode") is shared          # no copy
    assert vae_mod._gather([s.enc_rows for s in states[::-1]], "encode") is not shared  # reordered: gathered


def test_many_rejects_mixed_phases_resolutions_and_bad_rows(vae):
    svae = StreamingVAE(vae)
    s1, s2, s3 = svae.new_state(), svae.new_state(), svae.new_state()
    svae.encode(s1, _video(0, t=5))
    with pytest.raises(ValueError, match="group them by phase"):
        svae.encode_many([s1, s2], torch.zeros(2, 4, 3, 16, 24))
    svae.encode(s3, _video(0, t=5, h=16, w=16))
    with pytest.raises(ValueError, match="same resolution"):
        svae.encode_many([s1, s3], torch.zeros(2, 4, 3, 16, 24))
    with pytest.raises(ValueError, match="do not match a batch"):
        svae.encode_many([s1], torch.zeros(2, 4, 3, 16, 24))
    with pytest.raises(ValueError, match="twice"):
        svae.encode_many([s1, s1], torch.zeros(2, 4, 3, 16, 24))
    eager = StreamingVAE(vae, fast=False)
    e1 = eager.new_state()
    eager.encode(e1, _video(0, t=5))
    with pytest.raises(ValueError, match="fast=False"):
        svae.encode(e1, _video(0, t=4))
    d1, d2 = svae.new_state(), svae.new_state()
    svae.decode(d1, _latents(0)[:, :2])
    with pytest.raises(ValueError, match="group them by phase"):
        svae.decode_many([d1, d2], torch.zeros(2, 1, 16, 2, 3))


def test_compare_vae_paths_reports_paired_ratios(vae):
    out = compare_vae_paths(vae, 16, 16, rounds=2)
    assert set(out["ms"]) == {"eager", "fast"} and out["ms"]["eager"]["total"] > 0
    assert out["ratio"]["min"] <= out["ratio"]["median"] <= out["ratio"]["max"]
    assert out["max_abs_diff"]["encode"] <= EQ and out["max_abs_diff"]["decode"] <= EQ


@pytest.mark.slow
def test_compiled_conformance_and_no_recompiles_in_the_steady_state(vae):
    """Inductor-compiled steady calls: conformance ≤ 1e-4, then 50 steady chunks without a recompile."""
    torch._dynamo.reset()
    svae = StreamingVAE(vae, compile=True)
    _run_conformance(svae)
    enc, dec = svae.new_state(), svae.new_state()
    svae.encode(enc, _video(3, t=5, h=48, w=80))
    svae.decode(dec, _latents(3, t=2, h=6, w=10))
    svae.encode(enc, _video(4, t=4, h=48, w=80))
    svae.decode(dec, _latents(4, t=1, h=6, w=10))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(50):
            svae.encode(enc, _video(5 + i, t=4, h=48, w=80))
            svae.decode(dec, _latents(5 + i, t=1, h=6, w=10))


def test_compare_vae_paths_counts_flops_on_a_random_released_layout_vae(capsys):
    """The released-width rows: a random VAE in the released layout (narrow here, for speed), FLOP/s per path."""
    from wanstream.bench.vae_compare import random_vae_state_dict
    from wanstream.cli.vae_compare import main
    sd = random_vae_state_dict(8, seed=1)
    assert sd["encoder.conv1.weight"].shape == (8, 3, 3, 3, 3) and len(sd) == 194
    assert main(["--width", "8", "--resolution", "32x32", "--rounds", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["base_width"] == 8 and out["gflop"]["encode"] > 0 and out["peak_fraction"] is None
    assert all(out["tflops"][p][part] > 0 for p in ("fast", "eager") for part in ("encode", "decode"))


def test_gpu_default_is_bf16_conv3d_on_channels_last_3d(vae, monkeypatch):
    """What GPUs run by default, checked for dispatch on the CPU: bf16 weights (the loader's dtype on CUDA), the
    conv3d implementation, and every 3-D conv fed a channels-last-3d input (cuDNN's NDHWC kernels)."""
    from wanstream.models.loader import default_dtype
    assert default_dtype(torch.device("cuda")) == torch.bfloat16
    assert vae_fast.default_conv_impl(torch.device("cuda"), 96) == "conv3d"
    seen = []
    conv3d = torch.nn.functional.conv3d

    def spy(x, *a, **k):
        seen.append(x.is_contiguous(memory_format=torch.channels_last_3d))
        return conv3d(x, *a, **k)
    monkeypatch.setattr(vae_fast.F, "conv3d", spy)
    svae = StreamingVAE(vae, conv_impl="conv3d")
    s = svae.new_state()
    svae.encode(s, _video(0, t=5))
    svae.encode(s, _video(1, t=4))
    assert seen and all(seen)
