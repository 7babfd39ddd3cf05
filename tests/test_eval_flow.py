"""Warp error, occlusion check and RAFT wrapper on synthetic video with known flow."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from eval_kit import write_random_raft

from wanstream.core.errors import CheckpointError
from wanstream.eval.flow import (
    Motion,
    input_motion,
    inside,
    load_raft,
    occlusion_mask,
    valid_mask,
    warp,
    warp_error,
    warp_errors,
)


def texture(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth colour texture (bilinear sampling of it stays close to the sampled function)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    for c in range(3):
        for _ in range(3):
            kx, ky, ph = rng.uniform(0.05, 0.25), rng.uniform(0.05, 0.25), rng.uniform(0, 6.3)
            img[..., c] += 40 * np.sin(kx * xs + ky * ys + ph)
    return np.clip(img + 128, 0, 255).astype(np.uint8)


def chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1)[None].float()


def const_flow(dx: float, dy: float, h: int, w: int) -> torch.Tensor:
    f = torch.zeros(1, 2, h, w)
    f[:, 0], f[:, 1] = dx, dy
    return f


def test_integer_shift_exact_warp_has_zero_error_and_a_wrong_flow_does_not():
    a = texture()
    h, w = a.shape[:2]
    b = np.roll(a, shift=(2, 3), axis=(0, 1))          # b(x + (3, 2)) = a(x): everything moves right 3, down 2
    right = const_flow(3, 2, h, w)
    valid = inside(right)
    assert valid.float().mean() == pytest.approx((h - 2) * (w - 3) / (h * w))
    assert warp_error(chw(a), chw(b), right, valid).item() == pytest.approx(0.0, abs=1e-4)
    for wrong in (const_flow(0, 0, h, w), const_flow(-3, -2, h, w), const_flow(3, 0, h, w)):
        err = warp_error(chw(a), chw(b), wrong, inside(wrong)).item()
        assert err > 5.0, err


def test_smooth_flow_exact_warp_matches_an_independent_bilinear_sampler():
    """Frame t is frame t+1 sampled at x + f(x) (f smooth, non-integer), built with numpy: error ≈ 0 with f."""
    nxt = texture(seed=1).astype(np.float64)
    h, w = nxt.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    fx = 2.5 * np.sin(ys / 9.0) + 1.2
    fy = 1.7 * np.cos(xs / 11.0) - 0.4
    px, py = xs + fx, ys + fy
    ok = (px >= 0) & (px <= w - 1) & (py >= 0) & (py <= h - 1)
    x0, y0 = np.clip(np.floor(px), 0, w - 2).astype(int), np.clip(np.floor(py), 0, h - 2).astype(int)
    tx, ty = (px - x0)[..., None], (py - y0)[..., None]
    cur = ((1 - ty) * ((1 - tx) * nxt[y0, x0] + tx * nxt[y0, x0 + 1])
           + ty * ((1 - tx) * nxt[y0 + 1, x0] + tx * nxt[y0 + 1, x0 + 1]))
    flow = torch.from_numpy(np.stack([fx, fy])[None]).float()
    cur_t, nxt_t = chw(cur), chw(nxt)
    valid = inside(flow)
    assert torch.equal(valid[0], torch.from_numpy(ok))
    assert warp_error(cur_t, nxt_t, flow, valid).item() < 1e-3
    wrong = torch.zeros_like(flow)
    assert warp_error(cur_t, nxt_t, wrong, inside(wrong)).item() > 3.0


def moving_square_flows(h=40, w=60, x0=10, y0=12, size=12, dx=8):
    """Static background, a square at (x0, y0) moving right by dx: the true forward and backward flow."""
    fwd = torch.zeros(1, 2, h, w)
    fwd[0, 0, y0:y0 + size, x0:x0 + size] = dx
    bwd = torch.zeros(1, 2, h, w)
    bwd[0, 0, y0:y0 + size, x0 + dx:x0 + dx + size] = -dx
    return fwd, bwd


def test_occlusion_mask_marks_the_covered_and_the_disoccluded_strip():
    h, w, x0, y0, size, dx = 40, 60, 10, 12, 12, 8
    fwd, bwd = moving_square_flows(h, w, x0, y0, size, dx)
    covered = torch.zeros(h, w, dtype=torch.bool)       # background of frame t hidden by the square at t+1
    covered[y0:y0 + size, x0 + size:x0 + size + dx] = True
    revealed = torch.zeros(h, w, dtype=torch.bool)      # background of frame t+1 uncovered by the square
    revealed[y0:y0 + size, x0:x0 + dx] = True
    assert torch.equal(occlusion_mask(fwd, bwd)[0], covered)
    assert torch.equal(occlusion_mask(bwd, fwd)[0], revealed)   # the disoccluded region, seen from t+1
    # the square itself and the static background pass the check
    assert not occlusion_mask(fwd, bwd)[0, y0:y0 + size, x0:x0 + size].any()
    assert torch.equal(valid_mask(fwd, bwd)[0], ~covered)


def test_occlusion_check_threshold_beta_on_a_static_scene():
    """Zero backward flow: the check reduces to |f|² > 0.01 |f|² + 0.5, i.e. |f| > 0.7107 px."""
    h, w = 20, 30
    bwd = torch.zeros(1, 2, h, w)
    assert not occlusion_mask(const_flow(0.45, 0.45, h, w), bwd).any()      # |f|² = 0.405
    assert not occlusion_mask(const_flow(0.71, 0.0, h, w), bwd).any()
    assert occlusion_mask(const_flow(0.72, 0.0, h, w), bwd).all()
    # α scales with the flow: a 5% mismatch on a 10 px motion passes, a 20% one does not (targets in frame)
    fwd = const_flow(10.0, 0.0, h, w)
    assert not occlusion_mask(fwd, const_flow(-9.5, 0.0, h, w))[:, :, :w - 10].any()
    assert occlusion_mask(fwd, const_flow(-8.0, 0.0, h, w))[:, :, :w - 10].all()


def test_warp_brings_next_frame_back():
    a = texture()
    b = np.roll(a, shift=(0, 5), axis=(0, 1))
    back = warp(chw(b), const_flow(5, 0, *a.shape[:2]))
    assert torch.allclose(back[0, :, :, :-5], chw(a)[0, :, :, :-5], atol=1e-3)


def test_warp_errors_over_motion_batches_and_nan_without_valid_pixels():
    a = texture()
    h, w = a.shape[:2]
    frames = np.stack([a, np.roll(a, 2, axis=1), np.roll(a, 4, axis=1), np.roll(a, 6, axis=1)])
    f = const_flow(2, 0, h, w).repeat(2, 1, 1, 1)
    motions = [Motion(0, f, inside(f)), Motion(2, f[:1], torch.zeros(1, h, w, dtype=torch.bool))]
    errs, fracs = warp_errors(frames, motions)
    assert errs.shape == (3,) and fracs.shape == (3,)
    assert errs[:2] == pytest.approx([0.0, 0.0], abs=1e-4)
    assert np.isnan(errs[2]) and fracs[2] == 0.0


@pytest.fixture(scope="module")
def raft(tmp_path_factory):
    return load_raft(write_random_raft(tmp_path_factory.mktemp("raft")), iters=2)


def test_raft_random_weights_shapes_and_padding(raft):
    """raft_small(weights=None) through the real loader; frames smaller than 128 px and not multiples of 8."""
    frames = np.stack([texture(50, 70, s) for s in range(3)])
    flow = raft.flow(frames[:2], frames[1:])
    assert flow.shape == (2, 2, 50, 70) and flow.dtype == torch.float32
    assert torch.isfinite(flow).all()
    motions = list(input_motion(frames, raft, batch=1))
    assert [m.start for m in motions] == [0, 1]
    assert all(m.fwd.shape == (1, 2, 50, 70) and m.valid.shape == (1, 50, 70) for m in motions)
    errs, fracs = warp_errors(frames, motions)
    assert errs.shape == (2,) and ((fracs >= 0) & (fracs <= 1)).all()
    assert raft.describe()["architecture"] == "torchvision raft_small"


def test_raft_is_deterministic(raft):
    frames = np.stack([texture(64, 64, s) for s in range(2)])
    assert torch.equal(raft.flow(frames[:1], frames[1:]), raft.flow(frames[:1], frames[1:]))


def test_raft_loader_names_the_bad_file(tmp_path):
    bad = tmp_path / "raft_large_C_T_SKHT_V2-ff5fadd5.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="raft_large_C_T_SKHT_V2"):
        load_raft(bad)
    small = write_random_raft(tmp_path / "s")
    mismatched = tmp_path / "raft_large_C_T_SKHT_V2-ff5fadd5.pth"
    mismatched.write_bytes(small.read_bytes())      # small weights under a large name
    with pytest.raises(CheckpointError, match="does not match torchvision raft_large"):
        load_raft(mismatched)
