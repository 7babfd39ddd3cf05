"""DiT weights in int8 / fp8 through torchao: which layers, how close, where fp8 is refused, v2v end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from kit import kit_dir, load_kit
from torch import nn

from wanstream.core.config import CacheConfig
from wanstream.io.video import read_video
from wanstream.models.checkpoints import build_transformer, causal_state_dict, diffusers_dit_config
from wanstream.models.dit import CausalWanDiT
from wanstream.models.kv_cache import CachePolicy, CacheStep
from wanstream.models.quantize import (
    DEFAULT_EXCLUDE,
    QuantizationError,
    check_quantize,
    flow_relative_error,
    fp8_unsupported_reason,
    quantizable_linears,
    quantize_dit,
)


def _kit_transformer():
    cfg = json.loads((kit_dir() / "tiny_config.json").read_text())["dit"]
    path = kit_dir() / "model.pt"
    return build_transformer(diffusers_dit_config(cfg), causal_state_dict(path), str(path))


def _flow(tr, context) -> torch.Tensor:
    """Flow prediction of the conformance trace's first (prepare) call."""
    st = load_kit("c_dit_stream_n2_sinkoff.pt")["prepare"]["steps"][0]
    dit = CausalWanDiT(tr)
    with torch.no_grad():
        cache = dit.new_cache(2, 6, 15)
        step = CacheStep.build(CachePolicy(CacheConfig(sink_threshold=-1)), [0], [0], 2, 15, "cpu")
        return dit(st["x_t"], st["timestep"], dit.embed_prompt(context), cache, step)


def test_int8_quantizes_the_block_linears_only_and_stays_close():
    tr = _kit_transformer()
    context = load_kit("text_context.pt")["context"]
    reference = _flow(tr, context)
    linears = {n for n, m in tr.named_modules() if isinstance(m, nn.Linear)}
    names = quantize_dit(tr, "int8")
    assert set(names) == {n for n in linears if n.startswith("blocks.")}
    assert len(names) == 10 * len(tr.blocks)                  # 4 + 4 attention projections, 2 FFN linears
    for n, m in tr.named_modules():
        if n in linears:
            plain = type(m.weight) is nn.Parameter
            assert plain == (n not in names), n
    err = flow_relative_error(reference, _flow(tr, context))
    assert 0 < err < 2e-2


def test_exclusions_are_patterns_over_module_names():
    tr = _kit_transformer()
    no_ffn = quantizable_linears(tr, DEFAULT_EXCLUDE + ("*.ffn.*",))
    assert no_ffn and not any(".ffn." in n for n in no_ffn)
    assert all(n.startswith("blocks.") for n in no_ffn)
    with pytest.raises(QuantizationError, match="no linear layer left"):
        quantize_dit(tr, "int8", exclude=("*",))


def test_fp8_is_refused_where_the_hardware_lacks_it(monkeypatch):
    with pytest.raises(QuantizationError, match="compute capability >= 8.9.*cpu"):
        quantize_dit(_kit_transformer(), "fp8")
    with pytest.raises(QuantizationError, match="must be one of int8, fp8"):
        check_quantize("int4", "cpu")
    check_quantize(None, "cpu")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (8, 0))
    assert "A100 has compute capability 8.0" in fp8_unsupported_reason("cuda:0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (9, 0))
    assert fp8_unsupported_reason("cuda:0") is None


def test_v2v_quantize_int8_end_to_end_and_fp8_refused_on_cpu(tiny_model_dir, clip_path, tmp_path):
    out = tmp_path / "q.mp4"
    base = [sys.executable, "-m", "wanstream.cli", "v2v", str(clip_path), "--model", str(tiny_model_dir),
            "--prompt", "a watercolor", "--steps", "1", "--device", "cpu"]
    proc = subprocess.run(base + ["-o", str(out), "--quantize", "int8"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert read_video(out)[0].shape == (14, 48, 80, 3)
    proc = subprocess.run(base + ["-o", str(tmp_path / "f.mp4"), "--quantize", "fp8"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("wanstream v2v: error: --quantize fp8 needs a CUDA GPU")
    assert not (tmp_path / "f.mp4").exists()
