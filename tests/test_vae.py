"""Streaming Wan VAE: conformance with the official streaming traces, streaming == one-shot, isolation."""

from __future__ import annotations

import pytest
import torch
from kit import kit_dir, load_kit

from wanstream.core.config import LATENT_MEAN, LATENT_STD
from wanstream.models.checkpoints import build_vae, read_torch_file
from wanstream.models.vae import StreamingVAE

TOL = 1e-4


@pytest.fixture(scope="module")
def svae():
    return StreamingVAE(build_vae(read_torch_file(kit_dir() / "Wan2.1_VAE_tiny.pth"), "tiny vae"))


def test_conformance_stream_encode_decode(svae):
    d = load_kit("d_vae_stream.pt")
    assert torch.allclose(torch.as_tensor(d["mean"]).float(), torch.tensor(LATENT_MEAN))
    assert torch.allclose(torch.as_tensor(d["std"]).float(), torch.tensor(LATENT_STD))
    state = svae.new_state()
    video = d["video"].transpose(1, 2)  # [B, T, 3, H, W]
    for rec in d["stream_encode"]:
        a, b = rec["frames"]
        mu = svae.encode(state, video[:, a:b])
        assert (mu - rec["mu"].transpose(1, 2)).abs().max() <= TOL
    state = svae.new_state()
    for rec in d["stream_decode_pure_fp32"]:
        a, b = rec["latents"]
        pixels = svae.decode(state, d["decode_latents"][:, a:b])
        assert pixels.shape == rec["pixels"].shape
        assert (pixels - rec["pixels"]).abs().max() <= TOL


def test_normalised_encode_matches_reference(svae):
    d = load_kit("d_vae_stream.pt")
    mu = svae.encode(svae.new_state(), d["video"].transpose(1, 2)[:, :5], normalize=True)
    assert (mu - d["stream_encode_first_is_scale_true"].transpose(1, 2)).abs().max() <= TOL


def test_streaming_equals_one_shot(svae):
    torch.manual_seed(0)
    video = torch.rand(1, 13, 3, 32, 48) * 2 - 1
    state = svae.new_state()
    parts = [svae.encode(state, video[:, :5]), svae.encode(state, video[:, 5:9]), svae.encode(state, video[:, 9:])]
    assert [p.shape[1] for p in parts] == [2, 1, 1]
    one_shot = svae.vae.encode(video.transpose(1, 2)).latent_dist.mode().transpose(1, 2)
    assert (torch.cat(parts, 1) - one_shot).abs().max() <= 1e-5
    eight = svae.encode(svae.new_state(), video[:, :5]), svae.encode(svae.new_state(), video[:, :5])
    s2 = svae.new_state()
    svae.encode(s2, video[:, :5])
    assert (svae.encode(s2, video[:, 5:13]) - torch.cat(parts[1:], 1)).abs().max() <= 1e-5
    assert torch.equal(eight[0], eight[1])

    z = torch.randn(1, 4, 16, 4, 6)
    state = svae.new_state()
    frames = [svae.decode(state, z[:, :2]), svae.decode(state, z[:, 2:3]), svae.decode(state, z[:, 3:])]
    assert [f.shape[1] for f in frames] == [5, 4, 4]
    zd = (z.transpose(1, 2) / (1 / torch.tensor(LATENT_STD)).view(1, -1, 1, 1, 1)
          + torch.tensor(LATENT_MEAN).view(1, -1, 1, 1, 1))
    one_shot = svae.vae.decode(zd).sample.transpose(1, 2)
    assert (torch.cat(frames, 1) - one_shot).abs().max() <= 1e-5


def test_streams_do_not_share_state(svae):
    torch.manual_seed(1)
    a, b = torch.rand(1, 9, 3, 32, 48) * 2 - 1, torch.rand(1, 9, 3, 32, 48) * 2 - 1
    alone = [svae.encode(sa := svae.new_state(), a[:, :5]), svae.encode(sa, a[:, 5:])]
    sa, sb = svae.new_state(), svae.new_state()
    mixed = [svae.encode(sa, a[:, :5]), svae.encode(sb, b[:, :5]), svae.encode(sa, a[:, 5:])]
    assert torch.equal(mixed[0], alone[0]) and torch.equal(mixed[2], alone[1])


def test_bad_chunk_sizes_are_rejected(svae):
    state = svae.new_state()
    with pytest.raises(ValueError, match="1\\+4k"):
        svae.encode(state, torch.zeros(1, 4, 3, 32, 48))
    svae.encode(state, torch.zeros(1, 5, 3, 32, 48))
    with pytest.raises(ValueError, match="multiple of 4"):
        svae.encode(state, torch.zeros(1, 3, 3, 32, 48))
