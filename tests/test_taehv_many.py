"""TAEHV: several streams decoded (encoded) in one call equal each stream decoded (encoded) alone."""

from __future__ import annotations

import pytest
import torch

from wanstream.models.taehv import TAEHV, TAEHVStreamDecoder, TAEHVStreamEncoder


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TAEHV(decoder_widths=(32, 16, 8, 8)).eval()


def test_decode_many_equals_each_stream_alone(model):
    g = torch.Generator().manual_seed(1)
    z = [torch.randn(1, 5, 16, 2, 3, generator=g) for _ in range(3)]
    alone = []
    for zi in z:
        d = TAEHVStreamDecoder(model)
        alone.append([d.decode(zi[:, :2])] + [d.decode(zi[:, t:t + 1]) for t in range(2, 5)])
    chunks = [[(0, 2)] + [(t, t + 1) for t in range(2, 5)] for _ in z]
    decs, done = [TAEHVStreamDecoder(model) for _ in z], [0, 0, 0]
    for live in ([0], [0, 1], [0, 1, 2], [2, 0], [1, 2], [1]):     # join, leave, reorder
        for group in ([i for i in live if decs[i].frames_to_drop], [i for i in live if not decs[i].frames_to_drop]):
            if not group:
                continue
            lat = torch.cat([z[i][:, slice(*chunks[i][done[i]])] for i in group])
            out = TAEHVStreamDecoder.decode_many([decs[i] for i in group], lat)
            for k, i in enumerate(group):
                ref = alone[i][done[i]]
                assert out[k:k + 1].shape == ref.shape and (out[k:k + 1] - ref).abs().max() <= 1e-5
                done[i] += 1
    assert done == [4, 4, 3]


def test_decode_many_rejects_mixed_phases(model):
    a, b = TAEHVStreamDecoder(model), TAEHVStreamDecoder(model)
    a.decode(torch.randn(1, 2, 16, 2, 3))
    with pytest.raises(ValueError, match="group them by phase"):
        TAEHVStreamDecoder.decode_many([a, b], torch.randn(2, 1, 16, 2, 3))
    with pytest.raises(ValueError, match="do not match a batch"):
        TAEHVStreamDecoder.decode_many([a], torch.randn(2, 1, 16, 2, 3))


def test_encode_many_equals_each_stream_alone(model):
    g = torch.Generator().manual_seed(2)
    x = [torch.rand(1, 13, 3, 16, 24, generator=g) * 2 - 1 for _ in range(3)]
    chunks = [(0, 5), (5, 9), (9, 13)]
    alone = []
    for xi in x:
        e = TAEHVStreamEncoder(model)
        alone.append([e.encode(xi[:, a:b]) for a, b in chunks])
    encs, done = [TAEHVStreamEncoder(model) for _ in x], [0, 0, 0]
    for live in ([0], [0, 1], [2, 1, 0], [1, 2]):                 # join, reorder, leave
        for group in ([i for i in live if encs[i].first_encode], [i for i in live if not encs[i].first_encode]):
            if not group:
                continue
            out = TAEHVStreamEncoder.encode_many([encs[i] for i in group],
                                                 torch.cat([x[i][:, slice(*chunks[done[i]])] for i in group]))
            for k, i in enumerate(group):
                assert (out[k:k + 1] - alone[i][done[i]]).abs().max() <= 1e-5
                done[i] += 1
    assert done == [3, 3, 2]
    with pytest.raises(ValueError, match="group them by phase"):
        TAEHVStreamEncoder.encode_many([encs[0], TAEHVStreamEncoder(model)], torch.zeros(2, 4, 3, 16, 24))
