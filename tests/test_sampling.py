"""Sampler, step lists and the motion-aware noise controller against the official traces."""

from __future__ import annotations

import pytest
import torch
from kit import load_kit

from wanstream.core.schedule import step_list
from wanstream.engine.noise_controller import NoiseController, motion_level, timestep_for
from wanstream.models.sampling import FlowMatchSampler


def test_conformance_scheduler_exact():
    a = load_kit("a_scheduler.pt")
    s = FlowMatchSampler()
    assert torch.equal(s.grid_sigmas, a["grid_sigmas"])
    assert torch.equal(s.grid_timesteps, a["grid_timesteps"])
    assert torch.equal(s.index, a["index_f32"])
    assert torch.equal(s.sigma_table, a["sigma_for_t"])
    assert torch.equal(s.sigma_table64, a["sigma_for_t_f64"])
    for n, steps in a["step_lists_v2v"].items():
        assert step_list(n) == steps
    assert s.sigma(torch.tensor([700, 500, 400, 200, 0, 1000])).tolist() == pytest.approx(
        [0.70023, 0.49972, 0.40026, 0.19835, 0.00794, 1.0], abs=1e-5)


def test_step_lists():
    assert [step_list(n) for n in range(1, 5)] == [[700], [700, 500], [700, 500, 400], [700, 500, 400, 200]]
    assert step_list(4, "t2v") == [1000, 750, 500, 250, 0]
    assert step_list(2, "t2v") == [1000, 750, 0]
    for bad in (0, 5):
        with pytest.raises(ValueError, match="1..4"):
            step_list(bad)


def test_x0_and_renoise_arithmetic():
    s = FlowMatchSampler()
    x, v = torch.randn(2, 1, 4, 2, 2), torch.randn(2, 1, 4, 2, 2)
    t = torch.tensor([700, 500])
    x0 = s.to_x0(x, v, t)
    sig = s.sigma_table64[t].view(2, 1, 1, 1, 1)
    assert torch.equal(x0, (x.double() - sig * v.double()).float())
    eps = torch.randn_like(x)
    y = s.add_noise(x0, eps, torch.tensor([500, 400]))
    sig32 = s.sigma_table[torch.tensor([500, 400])].view(2, 1, 1, 1, 1)
    assert torch.equal(y, (1 - sig32) * x0 + sig32 * eps)


@pytest.mark.parametrize("key,dtype", [("motion_video_fp32", torch.float32), ("motion_video_bf16", torch.bfloat16)])
def test_conformance_noise_controller(key, dtype):
    b = load_kit("b_noise_controller.pt")
    frames = b["motion_video"].to(dtype).transpose(1, 2)   # [B, T, 3, H, W]
    nc = NoiseController(b["s_init"])
    ts = []
    for rec in b[key]:
        e = rec["end_idx"]
        assert nc.s_prev is None or abs(nc.s_prev.item() - rec["s_prev"]) <= 1e-6
        s, t = nc(frames[:, e - 5], frames[:, e - 4:e])
        assert int(t) == rec["t"], e
        assert abs(float(s) - rec["s"]) <= 1e-6
        ts.append(rec["t"])
    assert min(ts) == 600 and max(ts) >= 695   # the clip sweeps d over its whole range


def test_controller_arithmetic_on_synthetic_clip():
    still = torch.zeros(1, 4, 3, 8, 8)
    assert motion_level(torch.zeros(1, 3, 8, 8), still).item() == 0.0
    jump = still.clone()
    jump[:, 2] = 0.1                                   # RMS difference 0.1 → d = 0.5
    assert motion_level(torch.zeros(1, 3, 8, 8), jump).item() == pytest.approx(0.5)
    nc = NoiseController(0.8)
    s, t = nc(torch.zeros(1, 3, 8, 8), jump)
    assert float(s) == pytest.approx((0.8 - 0.05) * 0.9 + 0.1 * 0.8) and int(t) == int(1000 * float(s)) - 100
    off = NoiseController(0.75, enabled=False)
    s, t = off(torch.zeros(1, 3, 8, 8), jump + 1)
    assert float(s) == 0.75 and int(t) == 650
    assert int(timestep_for(torch.tensor(0.7, dtype=torch.float64))) == 600
