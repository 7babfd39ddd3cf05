"""`wanstream bench` smoke tests on the CPU (tiny preset) and roofline counts against hand-computed values.

No timing thresholds: only structure and sanity of the figures.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch import nn

from wanstream.bench import harness as bench
from wanstream.bench import roofline
from wanstream.cli import bench as bench_cli
from wanstream.models.vae import StreamingVAE

REQUIRED = ["ttff_s", "fps_e2e", "fps_denoise", "latency_ms", "jitter_ms", "deadline_miss_rate", "stage_ms",
            "peak_mem_bytes", "device", "steps", "mode", "resolution", "warmup_chunks"]


def _parse(argv):
    parser = argparse.ArgumentParser(prog="wanstream")
    sub = parser.add_subparsers(dest="command", required=True)
    bench_cli.add_bench_parser(sub)
    return parser.parse_args(["bench", *argv])


def _check_row(row: dict, steps: int, mode: str) -> None:
    for key in REQUIRED:
        assert key in row, key
    assert set(row["latency_ms"]) >= {"p50", "p90", "p95", "p99", "p999", "mean"}
    assert set(row["jitter_ms"]) >= {"mean", "p99"}
    assert set(row["stage_ms"]) >= {"encode", "dit", "decode", "host"}
    lat = row["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["p999"]
    assert row["jitter_ms"]["mean"] >= 0 and row["jitter_ms"]["p99"] >= 0
    assert row["ttff_s"] > 0
    assert row["fps_e2e"] > 0 and row["fps_denoise"] > 0 and row["fps_capacity"] > 0
    assert 0.0 <= row["deadline_miss_rate"] <= 1.0
    assert all(row["stage_ms"][s] > 0 for s in ("encode", "dit", "decode"))
    assert row["peak_mem_bytes"] > 0
    assert row["steps"] == steps and row["mode"] == mode
    assert row["frames_out"] == row["frames_in"] == row["frames"] and row["output_order_ok"]
    assert row["latency_samples"] > 0
    assert row["dit_calls_per_chunk"] == (1 if mode == "stream_batch" else steps)
    dit = row["roofline"]["dit"]
    assert dit["flops_per_call"] > 0 and dit["bytes_per_call"] > 0 and dit["achieved_flops_per_s"] > 0


def test_bench_cli_single_run(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    args = _parse(["--model", str(tiny_model_dir), "--device", "cpu", "--resolution", "32x32", "--steps", "2",
                   "--frames", "21", "--warmup", "2", "--prime-chunks", "1", "--target-latency", "1.0",
                   "--json", str(out), "--markdown", str(md), "--quiet"])
    assert bench_cli.run_bench(args) == 0
    row = json.loads(out.read_text())
    _check_row(row, 2, "stream_batch")
    assert row["resolution"] == "32x32" and row["warmup_chunks"] == 2 and row["input_fps"] == "max"
    assert row["device_type"] == "cpu" and row["timing"] == "perf_counter"
    assert row["meta"]["schema"] == bench.SCHEMA and row["meta"]["commit"]
    assert row["meta"]["peaks"]["matmul_flops_per_s"] > 0
    assert {"vae_encode", "vae_decode"} <= set(row["roofline"])
    text = capsys.readouterr().out
    assert "TTFF" in text and "32x32" in text
    assert max(len(line) for line in text.splitlines()) <= 100        # the tables fit a 100-column terminal
    latency = text[text.index("latency"):].splitlines()[2]              # input fps max: no deadline to miss
    assert latency.split()[-2] == "—", latency
    assert "| res |" in md.read_text()


def test_bench_real_time_source_and_restores_model(tiny_model_dir):
    """A 100 FPS live source, TAEHV decoder: frames arrive on schedule; the stage wrappers are gone afterwards."""
    from wanstream.models.loader import load_model
    model = load_model(tiny_model_dir, device="cpu", text_encoder=False, taehv=True)
    cfg = bench.BenchConfig(width=32, height=32, steps=1, input_fps=100.0, frames=17, warmup=1, prime_chunks=0,
                            decoder="taehv")
    prompt = bench.synthetic_prompt(model.dit.transformer.config.text_dim)
    clip = bench.LiveClip(32, 32, 12)
    row = bench.run_stream(model, cfg, prompt, clip)
    assert row["input_fps"] == 100.0 and row["decoder"] == "taehv"
    assert row["wall_s"] >= (cfg.frames - 1) / cfg.input_fps       # the source is paced
    assert row["queue"]["backlog_max_frames"] >= 0 and isinstance(row["queue"]["keeps_up"], bool)
    assert row["ttff_s"] > 0 and row["latency_ms"]["p50"] > 0
    assert all(row["stage_ms"][s] > 0 for s in ("encode", "dit", "decode"))
    assert row["frames_out"] == row["frames_in"] == cfg.frames
    assert "forward" not in vars(model.dit) and "_decode" not in vars(model.taehv)
    assert "encode" not in vars(model.vae) and "decode" not in vars(model.vae)


def test_bench_sweep_eight_rows(tiny_model_dir, tmp_path):
    out = tmp_path / "sweep.json"
    args = _parse(["--model", str(tiny_model_dir), "--device", "cpu", "--resolution", "32x32", "--sweep",
                   "--frames", "21", "--warmup", "1", "--prime-chunks", "0", "--no-peak", "--json", str(out),
                   "--quiet"])
    assert bench_cli.run_bench(args) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert len(rows) == 8
    assert [(r["steps"], r["mode"]) for r in rows] == [(s, m) for s in (1, 2, 3, 4)
                                                       for m in ("stream_batch", "no_batch")]
    for r in rows:
        _check_row(r, r["steps"], r["mode"])
    assert result["meta"]["peaks"] is None


def test_bench_sessions_share_dit_calls_and_compare_with_round_robin(tiny_model_dir, tmp_path):
    """Three streams: batched, every steady tick is ONE DiT call over all streams' rows; round robin serves one
    stream per call, so it makes three times the calls with a third of the rows."""
    out = tmp_path / "sessions.json"
    args = _parse(["--model", str(tiny_model_dir), "--device", "cpu", "--resolution", "32x32", "--steps", "2",
                   "--frames", "21", "--warmup", "2", "--prime-chunks", "1", "--sessions", "3",
                   "--compare-round-robin", "--no-peak", "--json", str(out), "--quiet"])
    assert bench_cli.run_bench(args) == 0
    row = json.loads(out.read_text())
    rr = row["round_robin"]
    assert row["sessions"] == rr["sessions"] == 3 and rr["policy"] == "round_robin"
    assert row["frames_out"] == row["frames_in"] == row["frames"] == 3 * 21 and row["output_order_ok"]
    assert row["rows_per_call_mean"] == 2 * 3 and rr["rows_per_call_mean"] == 2
    assert row["measured_chunks"] == 3 * row["dit_calls"]            # one call per tick, one chunk per stream
    assert rr["dit_calls"] == 3 * row["dit_calls"]
    assert row["dit_calls_per_chunk"] == pytest.approx(1 / 3)
    assert len(row["per_session"]) == 3 and all(p["fps"] > 0 for p in row["per_session"])
    assert row["fps_per_session_min"] <= row["fps_aggregate"] / 3 + 1e-9
    for x in (row, rr):
        assert x["fps_denoise"] > 0 and x["latency_ms"]["p99"] > 0 and 0 <= x["deadline_miss_rate"] <= 1


def test_bench_compare_eager_alternates_the_reference_path(tiny_model_dir, tmp_path, monkeypatch):
    """--compare-eager: the row runs fast, eager, eager, fast in one process; the eager runs use diffusers' own
    VAE modules (a StreamingVAE built with fast=False and used); the ratios are the pairs' fast / eager."""
    from wanstream.models import vae as vae_mod
    used = []                                        # per encode call: did it run the eager (diffusers) path
    encode = vae_mod.StreamingVAE.encode

    def spy(self, *a, **kw):
        used.append(self.fast is None)
        return encode(self, *a, **kw)
    monkeypatch.setattr(vae_mod.StreamingVAE, "encode", spy)
    out = tmp_path / "eager.json"
    args = _parse(["--model", str(tiny_model_dir), "--device", "cpu", "--resolution", "32x32", "--steps", "2",
                   "--frames", "13", "--warmup", "1", "--prime-chunks", "1", "--compare-eager", "--no-peak",
                   "--json", str(out), "--quiet"])
    assert bench_cli.run_bench(args) == 0
    row = json.loads(out.read_text())
    assert any(used) and not all(used)               # both paths ran (CPU: one stream's encode is vae.encode)
    v = row["vs_eager"]
    assert len(v["chunk_ratios"]) == 2 and len(v["vae_ratios"]) == 2
    assert v["chunk_ratios"][0] == pytest.approx(v["fast_chunk_ms"][0] / v["eager_chunk_ms"][0])
    assert v["chunk_ratio"] == pytest.approx(sum(v["chunk_ratios"]) / 2)     # the median of two
    assert row["stage_ms"]["chunk"] == v["fast_chunk_ms"][0] and row["eager"]["stage_ms"]["encode"] > 0
    assert row["frames_out"] == row["frames_in"] and row["compiled"] is False
    assert row["dit_paths"]["eager"] > 0 and row["dit_paths"]["compiled"] == row["dit_paths"]["graph"] == 0


def test_bench_rejects_too_few_frames():
    with pytest.raises(ValueError, match="frames"):
        bench.BenchConfig(frames=9, warmup=3).validate()
    with pytest.raises(ValueError, match="frames"):     # 4-step stream batch: the first measured chunk leaves 4
        bench.BenchConfig(frames=21, warmup=2, steps=4).validate()  # calls later; 6 chunks are not enough
    bench.BenchConfig(frames=25, warmup=2, steps=4).validate()
    bench.BenchConfig(frames=21, warmup=2, steps=4, batch=False).validate()
    with pytest.raises(SystemExit):
        _parse(["--model", "x", "--input-fps", "0"])
    assert _parse(["--model", "x", "--input-fps", "max"]).input_fps is None
    assert _parse(["--model", "x", "--input-fps", "30"]).input_fps == 30.0


# --------------------------------------------------------------------------------------------- roofline
def _hand_dit_flops(d, f, layers, rows, lq, lkv, text=512, freq=256, cin=16, cout=16, patch=4):
    m = rows * lq
    per_layer = (4 * 2 * m * d * d          # self-attention q, k, v, out
                 + 2 * 2 * m * lkv * d      # QK^T and PV against the cache
                 + 2 * 2 * m * d * d        # cross-attention q, out
                 + 2 * 2 * m * text * d     # cross QK^T and PV over the prompt
                 + 2 * 2 * m * d * f)       # FFN up and down
    embed = 2 * m * cin * patch * d + 2 * m * d * cout * patch + 2 * rows * (freq * d + d * d + d * 6 * d)
    return layers * per_layer + embed


def test_dit_flops_tiny_hand_count():
    dims = roofline.DiTDims.from_preset("tiny")          # dim 256, ffn 384, 2 layers
    cost = roofline.dit_call_cost(dims, tokens_per_frame=16, rows=2, cache_frames=6, bytes_per_el=4)
    assert cost["flops"] == _hand_dit_flops(256, 384, 2, rows=2, lq=16, lkv=96)
    # the same sum, written out for this config: 2 layers x 32 token rows
    assert cost["flops"] == 2 * (8 * 32 * 256 ** 2 + 4 * 32 * 96 * 256 + 4 * 32 * 256 ** 2 + 4 * 32 * 512 * 256
                                 + 4 * 32 * 256 * 384) + 2 * 32 * 64 * 256 * 2 + 4 * (256 * 256 * 2 + 256 * 1536)
    assert cost["flops"] == 119_537_664
    nb = cost["bytes_by_part"]
    assert nb["kv_read"] == 2 * 2 * 2 * 96 * 256 * 4
    assert nb["kv_write"] == 2 * 2 * 2 * 16 * 256 * 4
    assert nb["prompt_kv_read"] == 2 * 2 * 512 * 256 * 4
    assert nb["io"] == 2 * (2 * 16 * 64) * 4
    assert cost["bytes"] == sum(nb.values())


def test_dit_flops_1p3b_480p_hand_count():
    """1.3B at 832x480 (1560 tokens per frame), 4 stream-batch rows, 6-frame cache."""
    cost = roofline.dit_call_cost(roofline.DiTDims.from_preset("1.3b"), 1560, rows=4)
    assert cost["flops"] == _hand_dit_flops(1536, 8960, 30, rows=4, lq=1560, lkv=9360)
    # weights once in bf16: the per-call parameters of the 1.3B DiT are ~1.3 G
    assert 1.2e9 < cost["bytes_by_part"]["weights"] / 2 < 1.45e9


def test_dit_call_params_match_module(tiny_model):
    tr = tiny_model.dit.transformer
    skip = ("condition_embedder.text_embedder", "attn2.to_k", "attn2.to_v", "attn2.norm_k")
    n = sum(p.numel() for k, p in tr.named_parameters() if not any(s in k for s in skip))
    assert roofline.DiTDims.from_dit(tiny_model.dit).call_params() == n


def test_dit_flops_match_torch_flop_counter(tiny_model):
    """The formula equals torch's FLOP counter on a real steady-state call (math attention so it is counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from wanstream.engine.latent_stream import LatentStream
    from wanstream.engine.noise import SeededNoise
    from wanstream.models.kv_cache import CacheStep
    model = tiny_model
    dit = model.dit
    tpf = model.tokens_per_frame(64, 64)
    prompt = dit.embed_prompt(bench.synthetic_prompt(dit.transformer.config.text_dim))
    stream = LatentStream(dit, model.sampler, prompt, SeededNoise(0), tokens_per_frame=tpf, steps=2)
    with torch.no_grad():
        stream.prepare(torch.randn(1, 2, 16, 8, 8), 0.8)
        step = CacheStep.build(stream.runner.policy, [7, 6], [7, 6], 1, tpf, "cpu")
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            dit(torch.randn(2, 1, 16, 8, 8), torch.tensor([700, 500]), prompt, stream.cache, step)
    expected = roofline.dit_call_cost(roofline.DiTDims.from_dit(dit), tpf, rows=2)["flops"]
    assert counter.get_total_flops() == expected


def test_conv_flops_one_layer_hand_count():
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
    conv = WanCausalConv3d(8, 16, 3, padding=1)
    x = torch.randn(1, 8, 4, 16, 16)
    with roofline.FlopCounter(conv) as fc, torch.no_grad():
        y = conv(x)
    assert y.shape == (1, 16, 4, 16, 16)
    assert fc.flops == 2 * (16 * 4 * 16 * 16) * (8 * 27)       # 2 x outputs x (Cin x kernel volume)
    strided = nn.Conv2d(4, 6, 3, stride=2, groups=2)
    with roofline.FlopCounter(strided) as fc, torch.no_grad():
        y = strided(torch.randn(1, 4, 9, 9))
    assert y.shape == (1, 6, 4, 4) and fc.flops == 2 * (6 * 4 * 4) * (2 * 9)
    assert roofline.spatial_attention_flops((1, 32, 2, 8, 8)) == 2 * 2 * 2 * 64 * 64 * 32


def test_vae_flops_match_torch_flop_counter(tiny_model):
    """Hook counts of a real streaming encode / decode equal torch's counter, and the meta count equals both."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    vae = StreamingVAE(tiny_model.vae.vae, fast=False)      # the hooks count diffusers' modules
    costs = roofline.vae_call_costs(vae, 32, 48, bytes_per_el=4)
    with torch.no_grad():
        st = vae.new_state()
        vae.encode(st, torch.rand(1, 5, 3, 32, 48) * 2 - 1)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as ref, roofline.FlopCounter(vae.vae) as fc:
            vae.encode(st, torch.rand(1, 4, 3, 32, 48) * 2 - 1)
        assert fc.flops == ref.get_total_flops() == costs["encode"]["flops"]
        ds = vae.new_state()
        vae.decode(ds, torch.randn(1, 2, 16, 4, 6))
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as ref, roofline.FlopCounter(vae.vae) as fc:
            vae.decode(ds, torch.randn(1, 1, 16, 4, 6))
        assert fc.flops == ref.get_total_flops() == costs["decode"]["flops"]
    enc = costs["encode"]["bytes_by_part"]
    assert enc["io"] == (4 * 3 * 32 * 48 + 16 * 4 * 6) * 4
    assert enc["weights"] == 4 * sum(p.numel() for m in (vae.vae.encoder, vae.vae.quant_conv) for p in m.parameters())


def test_measure_peaks_cpu():
    peaks = roofline.measure_peaks("cpu", torch.float32, size=128, copy_bytes=1 << 20, repeats=2)
    assert peaks["matmul_flops_per_s"] > 0 and peaks["copy_bytes_per_s"] > 0
    assert roofline.roofline_time(2e9, 1e6, {"matmul_flops_per_s": 1e9, "copy_bytes_per_s": 1e9}) == 2.0


def test_bench_overload_compares_todays_policy_with_playback_slack(tiny_model_dir, tmp_path, capsys):
    """--overload 2: after the row, the same streams at twice the measured per-stream rate under both policies;
    each policy reports the viewer figures of every stream (structure only: no timing thresholds)."""
    out = tmp_path / "overload.json"
    args = _parse(["--model", str(tiny_model_dir), "--device", "cpu", "--resolution", "32x32", "--steps", "2",
                   "--frames", "25", "--warmup", "2", "--prime-chunks", "1", "--sessions", "2", "--overload", "2",
                   "--no-peak", "--json", str(out)])
    assert bench_cli.run_bench(args) == 0
    o = json.loads(out.read_text())["overload"]
    assert o["input_fps"] == pytest.approx(2 * o["capacity_fps_per_stream"])
    assert set(o["policies"]) == {"continuous", "slack"}
    for policy, x in o["policies"].items():
        assert len(x["per_session"]) == 2
        for p in x["per_session"]:
            assert p["frames_in"] == 25 and p["frames_out"] + p["dropped"] <= 25 and p["frames_out"] > 0
            assert 0.0 <= p["continuous_ratio"] <= 1.0 and p["ttfc_s"] > 0 and p["stalls"] >= 0
            assert 0.0 <= p["degraded_share"] <= 1.0
    assert all(p["degraded_share"] == 0 for p in o["policies"]["continuous"]["per_session"])
    assert "overload" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--overload"):
        bench_cli.spec_from_args(_parse(["--model", str(tiny_model_dir), "--overload", "2", "--input-fps", "8"]))


def test_bench_reports_the_drift_watchdog_cost_per_chunk(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "drift.json"
    args = _parse(["--model", str(tiny_model_dir), "--device", "cpu", "--resolution", "32x32", "--steps", "2",
                   "--frames", "21", "--warmup", "2", "--prime-chunks", "1", "--drift-watchdog", "--no-peak",
                   "--json", str(out)])
    assert bench_cli.run_bench(args) == 0
    row = json.loads(out.read_text())
    assert row["drift_watchdog"] and row["drift_ms_per_chunk"] > 0 and row["drift_flags"] >= 0
    assert "drift watchdog" in capsys.readouterr().out
