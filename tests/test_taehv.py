"""TAEHV: released key layout, strict loading, streaming decode == one-shot decode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wanstream.core.errors import CheckpointError
from wanstream.models.taehv import TAEHV, TAEHVStreamDecoder, TAEHVStreamEncoder, load_taehv, write_random_taehv

N_TENSORS = 128
N_PARAMS = 11_315_539


def _expected_keys() -> set[str]:
    """The released ``taew2_1.pth`` key set, spelled out from the documented layout."""
    keys = {"encoder.0.weight", "encoder.0.bias", "encoder.17.weight", "encoder.17.bias",
            "decoder.1.weight", "decoder.1.bias", "decoder.22.weight", "decoder.22.bias"}
    keys |= {f"encoder.{i}.conv.weight" for i in (2, 7, 12)}                        # TPool
    keys |= {f"encoder.{i}.weight" for i in (3, 8, 13)}                             # stride-2 convs
    keys |= {f"decoder.{i}.conv.weight" for i in (7, 13, 19)}                       # TGrow
    keys |= {f"decoder.{i}.weight" for i in (8, 14, 20)}                            # bias-free convs
    mem = [*range(4, 7), *range(9, 12), *range(14, 17)]
    keys |= {f"encoder.{i}.conv.{j}.{p}" for i in mem for j in (0, 2, 4) for p in ("weight", "bias")}
    mem = [*range(3, 6), *range(9, 12), *range(15, 18)]
    keys |= {f"decoder.{i}.conv.{j}.{p}" for i in mem for j in (0, 2, 4) for p in ("weight", "bias")}
    return keys


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("taehv") / "taew2_1.pth"
    write_random_taehv(path, seed=0)
    return path


@pytest.fixture(scope="module")
def model(ckpt) -> TAEHV:
    return load_taehv(ckpt)


def _latents(t: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, t, 16, 4, 6, generator=torch.Generator().manual_seed(seed))


def test_keys_and_param_count():
    sd = TAEHV().state_dict()
    assert set(sd) == _expected_keys()
    assert len(sd) == N_TENSORS
    assert sum(v.numel() for v in sd.values()) == N_PARAMS
    assert sd["decoder.7.conv.weight"].shape == (256, 256, 1, 1)        # stride-1 TGrow
    assert sd["decoder.13.conv.weight"].shape == (256, 128, 1, 1)       # stride-2 TGrow


def test_round_trip(ckpt, model):
    sd = torch.load(ckpt, weights_only=True)
    assert model.state_dict().keys() == sd.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    assert next(model.parameters()).dtype == torch.float32


def test_channels_inferred(tmp_path):
    path = tmp_path / "small.pth"
    torch.save(TAEHV(latent_channels=8, encoder_width=16, decoder_widths=(32, 16, 8, 8)).state_dict(), path)
    m = load_taehv(path)
    assert m.latent_channels == 8 and m.decoder[1].out_channels == 32 and m.encoder[0].out_channels == 16


def test_tgrow_trimmed_to_last_rows(ckpt, tmp_path):
    sd = torch.load(ckpt, weights_only=True)
    w = torch.randn(512, 256, 1, 1)
    sd["decoder.7.conv.weight"] = w
    torch.save(sd, tmp_path / "wide.pth")
    assert torch.equal(load_taehv(tmp_path / "wide.pth").decoder[7].conv.weight, w[256:])


@pytest.mark.parametrize("edit, culprit", [
    (lambda sd: sd.pop("decoder.4.conv.2.bias"), "decoder.4.conv.2.bias"),
    (lambda sd: sd.__setitem__("decoder.99.weight", torch.zeros(1)), "decoder.99.weight"),
    (lambda sd: sd.__setitem__("decoder.9.conv.0.weight", torch.zeros(128, 128, 3, 3)), "decoder.9.conv.0.weight"),
])
def test_bad_keys_raise(ckpt, tmp_path, edit, culprit):
    sd = torch.load(ckpt, weights_only=True)
    edit(sd)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=culprit) as err:
        load_taehv(path)
    assert str(path) in str(err.value)


def test_truncated_file_raises(ckpt, tmp_path):
    path = tmp_path / "truncated.pth"
    path.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_taehv(path)
    with pytest.raises(CheckpointError, match="absent.pth"):
        load_taehv(tmp_path / "absent.pth")


def test_one_shot_shapes_range_and_causality(model):
    z = _latents(5)
    full = model.decode_video(z)
    assert full.shape == (1, 17, 3, 32, 48)
    assert full.min() >= -1 and full.max() <= 1
    assert full.std() > 0.05                                  # random weights give non-degenerate pixels
    moved = model.decode_video(torch.cat([z[:, :1] + 1, z[:, 1:]], 1))
    assert (moved[:, 5:] - full[:, 5:]).abs().max() > 0.01    # MemBlock memory carries latent 0 forward
    torch.testing.assert_close(model.decode_video(z[:, :3]), full[:, :9], rtol=0, atol=1e-5)
    assert model.encode_video(full).shape == (1, 5, 16, 4, 6)


def test_stream_equals_one_shot(model):
    z = _latents(5)
    full = model.decode_video(z)
    stream = TAEHVStreamDecoder(model)
    chunks = [stream.decode(c) for c in z.split([2, 1, 1, 1], dim=1)]
    assert [c.shape[1] for c in chunks] == [5, 4, 4, 4]
    assert (torch.cat(chunks, 1) - full).abs().max() <= 1e-5

    stream.reset()
    again = torch.cat([stream.decode(c) for c in z.split([2, 1, 1, 1], dim=1)], 1)
    assert torch.equal(again, torch.cat(chunks, 1))


def test_interleaved_streams_independent(model):
    za, zb = _latents(3, seed=1), _latents(3, seed=2)
    a, b = TAEHVStreamDecoder(model), TAEHVStreamDecoder(model)
    out_a, out_b = [], []
    for t in (slice(0, 2), slice(2, 3)):
        out_a.append(a.decode(za[:, t]))
        out_b.append(b.decode(zb[:, t]))
    for out, z in ((out_a, za), (out_b, zb)):
        assert (torch.cat(out, 1) - model.decode_video(z)).abs().max() <= 1e-5


def _frames(t: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, t, 3, 32, 48, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_stream_encode_has_the_wan_frame_law_and_equals_one_shot(model):
    """1 + 4k frames → 1 + k latents, chunk by chunk as in one shot over the stream with frame 0 three times in
    front (latent 0 sees frame 0 alone, latent k frames 4k-3..4k)."""
    x = _frames(13)
    enc = TAEHVStreamEncoder(model)
    parts = [enc.encode(x[:, :5]), enc.encode(x[:, 5:9]), enc.encode(x[:, 9:])]
    assert [p.shape[1] for p in parts] == [2, 1, 1] and parts[0].shape[2:] == (16, 4, 6)
    one_shot = model.encode_video(torch.cat([x[:, :1].expand(-1, 3, -1, -1, -1), x], 1))
    assert (torch.cat(parts, 1) - one_shot).abs().max() <= 1e-5
    alone = TAEHVStreamEncoder(model).encode(x[:, :1])            # latent 0 depends on frame 0 only
    assert (alone - parts[0][:, :1]).abs().max() <= 1e-5
    enc.reset()
    assert torch.equal(enc.encode(x[:, :5]), parts[0])


def test_stream_encode_maps_to_the_wan_mean_and_rejects_bad_chunks(model):
    mean, std = torch.linspace(-1, 1, 16), torch.linspace(0.5, 2, 16)
    x = _frames(5, seed=3)
    raw = TAEHVStreamEncoder(model).encode(x)
    shifted = TAEHVStreamEncoder(model, mean, std).encode(x)
    assert (shifted - (raw * std.view(1, 1, -1, 1, 1) + mean.view(1, 1, -1, 1, 1))).abs().max() <= 1e-5
    enc = TAEHVStreamEncoder(model)
    with pytest.raises(ValueError, match="1\\+4k"):
        enc.encode(x[:, :4])
    enc.encode(x)
    with pytest.raises(ValueError, match="multiple of 4"):
        enc.encode(x[:, :3])
    with pytest.raises(ValueError, match="expected pixels"):
        enc.encode(x[:, :4, :1])
