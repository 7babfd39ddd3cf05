"""UMT5 text encoder: parity with a plain-PyTorch Wan T5 reference, strict loading, cleaning, caching."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, UMT5EncoderModel

from wanstream.core.errors import CheckpointError
from wanstream.models.text_encoder import (
    T5_PRESETS,
    TextEncoder,
    build_umt5_encoder,
    clean_prompt,
    convert_wan_t5_to_transformers,
    load_text_encoder,
    umt5_config,
    umt5_config_from_state_dict,
    wan_t5_shapes,
    write_random_text_encoder,
)

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER = Path("google") / "umt5-xxl"


# ------------------------------------------------------------------------------ reference (from the spec)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.type_as(weight)


def relative_buckets(lq: int, lk: int, num_buckets: int = 32, max_dist: int = 128) -> torch.Tensor:
    """Bidirectional T5 buckets of (key position - query position): exact below 8, log-spaced up to 128."""
    rel = torch.arange(lk)[None, :] - torch.arange(lq)[:, None]
    num_buckets //= 2
    buckets = (rel > 0).long() * num_buckets
    rel = rel.abs()
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(rel.float() / max_exact) / math.log(max_dist / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.minimum(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(rel < max_exact, rel, large)


def reference_wan_t5(sd: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor,
                     num_layers: int) -> torch.Tensor:
    """Wan's T5 encoder forward pass, written directly from the specification."""
    x = sd["token_embedding.weight"][ids]
    b, n = ids.shape
    for i in range(num_layers):
        p = f"blocks.{i}."
        heads = sd[p + "pos_embedding.embedding.weight"].shape[1]
        h = rms_norm(x, sd[p + "norm1.weight"])
        q, k, v = (F.linear(h, sd[f"{p}attn.{c}.weight"]).view(b, n, heads, -1) for c in "qkv")
        bias = sd[p + "pos_embedding.embedding.weight"][relative_buckets(n, n)].permute(2, 0, 1)[None]
        attn = torch.einsum("binc,bjnc->bnij", q, k) + bias  # no 1/sqrt(d) scaling
        attn = attn.masked_fill(mask[:, None, None, :] == 0, torch.finfo(attn.dtype).min)
        attn = F.softmax(attn.float(), dim=-1).type_as(attn)
        out = torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, n, -1)
        x = x + F.linear(out, sd[p + "attn.o.weight"])
        h = rms_norm(x, sd[p + "norm2.weight"])
        gate = F.gelu(F.linear(h, sd[p + "ffn.gate.0.weight"]), approximate="tanh")
        x = x + F.linear(F.linear(h, sd[p + "ffn.fc1.weight"]) * gate, sd[p + "ffn.fc2.weight"])
    return rms_norm(x, sd["norm.weight"])


def small_wan_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small random Wan-layout encoder (vocab 300, d 64, 4 heads x 16, d_ff 96, 2 layers) in fp32."""
    config = umt5_config(vocab_size=300, d_model=64, num_heads=4, d_kv=16, d_ff=96, num_layers=2)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in wan_t5_shapes(config).items():
        t = torch.randn(shape, generator=gen)
        if "norm" in key:
            t = 1 + 0.1 * t
        elif "pos_embedding" in key:
            t = 2 * t  # strong relative bias, so every bucket matters
        elif key != "token_embedding.weight":
            t = t / shape[1] ** 0.5
        sd[key] = t
    return sd


def test_matches_wan_reference():
    sd = small_wan_state_dict()
    model = build_umt5_encoder(sd, "small")
    assert isinstance(model, UMT5EncoderModel)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (2, 256), generator=gen)
    mask = torch.ones_like(ids)
    for row, length in enumerate((230, 170)):  # distances up to 255: exact, log and clamped buckets
        ids[row, length:], mask[row, length:] = 0, 0
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = reference_wan_t5(sd, ids, mask, num_layers=2)
    assert (ours - ref).abs().max() <= 1e-4
    assert ref.abs().max() > 0.5


# --------------------------------------------------------------------------------------------- config
def test_config_and_key_map():
    sd = small_wan_state_dict()
    cfg = umt5_config_from_state_dict(sd)
    assert (cfg.vocab_size, cfg.d_model, cfg.d_kv, cfg.d_ff, cfg.num_layers, cfg.num_heads,
            cfg.relative_attention_num_buckets) == (300, 64, 16, 96, 2, 4, 32)
    assert cfg.relative_attention_max_distance == 128 and cfg.is_gated_act and cfg.dense_act_fn == "gelu_new"
    assert cfg.layer_norm_epsilon == 1e-6 and cfg.dropout_rate == 0
    out = convert_wan_t5_to_transformers(sd)
    assert out["encoder.embed_tokens.weight"] is out["shared.weight"] is sd["token_embedding.weight"]
    assert out["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"] is sd["blocks.1.ffn.gate.0.weight"]
    assert out["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] is \
        sd["blocks.0.pos_embedding.embedding.weight"]
    assert len(out) == len(sd) + 1
    with pytest.raises(ValueError, match="blocks.0.attn.bogus"):
        convert_wan_t5_to_transformers({**sd, "blocks.0.attn.bogus": torch.zeros(1)})


def test_umt5_xxl_dims_and_param_count():
    """The umt5-xxl preset, built on the meta device: released dims and 5.68B parameters."""
    sd = {k: torch.empty(s, dtype=torch.bfloat16, device="meta")
          for k, s in wan_t5_shapes(T5_PRESETS["umt5-xxl"]).items()}
    assert len(sd) == 242
    cfg = umt5_config_from_state_dict(sd)
    assert (cfg.vocab_size, cfg.d_model, cfg.d_kv, cfg.d_ff, cfg.num_layers, cfg.num_heads,
            cfg.relative_attention_num_buckets) == (256384, 4096, 64, 10240, 24, 64, 32)
    with torch.device("meta"):
        model = UMT5EncoderModel(cfg)
    params = sum(p.numel() for p in model.parameters())  # the tied embedding counted once
    assert abs(params - 5.68e9) < 0.01e9
    assert sum(t.numel() for t in sd.values()) == params


# -------------------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("raw, clean", [
    ("  a   cat\n\tin the\u00a0snow  ", "a cat in the snow"),
    ("fish &amp; chips", "fish & chips"),
    ("fish &amp;amp; chips", "fish & chips"),  # unescaped twice
    ("&lt;b&gt;bold&lt;/b&gt;", "<b>bold</b>"),
    ("The Mona Lisa doesnÃ¢â‚¬â„¢t smile", "The Mona Lisa doesn't smile"),  # mojibake (ftfy)
    ("caf\u00c3\u00a9 at night", "café at night"),
])
def test_clean_prompt(raw, clean):
    assert clean_prompt(raw) == clean


# ------------------------------------------------------------------------------ tiny preset end to end
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("t5")
    write_random_text_encoder(folder, "tiny", seed=0)
    return folder


@pytest.fixture(scope="module")
def tiny_sd(tiny_dir) -> dict[str, torch.Tensor]:
    return torch.load(tiny_dir / T5_FILE, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def encoder(tiny_dir) -> TextEncoder:
    return load_text_encoder(tiny_dir / T5_FILE, tiny_dir / TOKENIZER)


def test_tiny_files(tiny_dir, tiny_sd):
    assert (tiny_dir / T5_FILE).stat().st_size < 40e6
    assert set(tiny_sd) == set(wan_t5_shapes(T5_PRESETS["tiny"]))
    assert all(t.dtype == torch.bfloat16 for t in tiny_sd.values())
    assert tiny_sd["token_embedding.weight"].shape[1] == 4096
    tok = AutoTokenizer.from_pretrained(tiny_dir / TOKENIZER, local_files_only=True)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("a red fox in the snow").input_ids
    assert ids[-1] == 1 and 2 not in ids
    assert len(tok) <= tiny_sd["token_embedding.weight"].shape[0]


def test_round_trip_is_exact(encoder, tiny_sd):
    assert encoder.dim == 4096 and encoder.model.dtype == torch.float32
    model_sd = encoder.model.state_dict()
    for key, value in convert_wan_t5_to_transformers(tiny_sd).items():
        assert torch.equal(model_sd[key], value.float()), key
    assert encoder.model.encoder.embed_tokens.weight is encoder.model.shared.weight
    assert not any(p.is_meta for p in encoder.model.parameters())


def test_encode_shape_and_zeroing(encoder):
    prompts = ["a red fox running in the snow", "an oil painting of a small village by the sea at night"]
    out = encoder.encode(prompts)
    assert out.shape == (2, 512, 4096) and out.dtype == torch.float32
    lengths = encoder.tokenizer(prompts, padding=True, return_tensors="pt").attention_mask.sum(1)
    assert lengths[0] != lengths[1]
    for row, length in enumerate(lengths.tolist()):
        assert out[row, :length].abs().sum(-1).gt(0).all()
        assert out[row, length:].eq(0).all()
    assert not torch.equal(out[0, :4], out[1, :4])
    single = encoder.encode(prompts[1])  # a str is a batch of one; equal to its row of the batch
    assert single.shape == (1, 512, 4096)
    torch.testing.assert_close(single[0], out[1], atol=1e-5, rtol=1e-5)


def test_cache_skips_the_model(tiny_dir):
    enc = load_text_encoder(tiny_dir / T5_FILE, tiny_dir / TOKENIZER, cache_size=2)
    calls = []
    enc.model.register_forward_hook(lambda module, args, output: calls.append(1))
    first = enc.encode(["a cat"])
    assert len(calls) == 1
    again = enc.encode(["  a   cat "])  # same prompt after cleaning
    assert len(calls) == 1 and torch.equal(first, again)
    enc.encode(["a cat", "a dog", "a dog"])  # one pass for the one new prompt
    assert len(calls) == 2
    enc.encode(["a bird"])  # evicts the least recently used prompt ("a cat")
    enc.encode(["a dog"])
    assert len(calls) == 3
    torch.testing.assert_close(enc.encode(["a cat"]), first)
    assert len(calls) == 4


def test_cache_keeps_true_rows_only_and_is_bounded_by_bytes(tiny_dir):
    enc = load_text_encoder(tiny_dir / T5_FILE, tiny_dir / TOKENIZER, cache_size=100)
    fresh = load_text_encoder(tiny_dir / T5_FILE, tiny_dir / TOKENIZER, cache_size=0)
    prompts = [f"a cat number {i} on a roof" + " and a dog" * i for i in range(6)]
    lengths = enc.tokenizer(prompts, padding=True, return_tensors="pt").attention_mask.sum(1).tolist()
    row_bytes = enc.dim * 4
    enc.encode(prompts[:1])
    assert enc.cache_info()["bytes"] == lengths[0] * row_bytes         # not 512 rows
    enc.limit_cache(max_bytes=(lengths[4] + lengths[5]) * row_bytes)
    for p in prompts[1:]:
        enc.encode([p])
    info = enc.cache_info()
    assert info["bytes"] <= info["max_bytes"] and info["entries"] == 2 and info["evictions"] == 4
    assert info["misses"] == 6 and info["hits"] == 0
    for p in (prompts[5], prompts[0]):                                  # a hit and a re-encoded miss
        out = enc.encode([p])
        assert out.shape == (1, 512, enc.dim) and torch.equal(out, fresh.encode([p]))
    assert enc.cache_info()["hits"] == 1
    enc.limit_cache(max_bytes=1)                                        # nothing fits: nothing is kept
    assert enc.cache_info()["entries"] == 0 and enc.cache_info()["bytes"] == 0
    assert torch.equal(enc.encode([prompts[2]]), fresh.encode([prompts[2]]))


def test_offload_then_encode(tiny_dir):
    enc = load_text_encoder(tiny_dir / T5_FILE, tiny_dir / TOKENIZER, cache_size=0)
    before = enc.encode(["a dog on the beach"])
    enc.offload()
    assert enc.model_device.type == "cpu"
    after = enc.encode(["a dog on the beach"])
    assert after.device == enc.device
    torch.testing.assert_close(after, before)
    enc.to("cpu")
    torch.testing.assert_close(enc.encode(["a dog on the beach"]), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_on_cuda(tiny_dir):
    enc = load_text_encoder(tiny_dir / T5_FILE, tiny_dir / TOKENIZER, device="cuda", dtype=torch.bfloat16,
                            cache_size=0)
    before = enc.encode(["a dog on the beach"])
    assert before.device.type == "cuda" and before.dtype == torch.bfloat16
    free = torch.cuda.memory_allocated()
    enc.offload()
    assert enc.model_device.type == "cpu" and torch.cuda.memory_allocated() < free
    after = enc.encode(["a dog on the beach"])
    assert after.device.type == "cuda" and after.dtype == torch.bfloat16
    torch.testing.assert_close(after.float(), before.float(), atol=0.1, rtol=0.05)
    enc.to("cuda")
    assert enc.model_device.type == "cuda"


# ------------------------------------------------------------------------------------------ strictness
def _save(tmp_path: Path, sd: dict) -> Path:
    path = tmp_path / T5_FILE
    torch.save(sd, path)
    return path


@pytest.mark.parametrize("edit, culprit", [
    (lambda sd: sd.pop("blocks.1.ffn.fc2.weight"), "blocks.1.ffn.fc2.weight"),
    (lambda sd: sd.pop("blocks.0.pos_embedding.embedding.weight"), "blocks.0.pos_embedding.embedding.weight"),
    (lambda sd: sd.update({"blocks.0.attn.extra.weight": torch.zeros(2)}), "blocks.0.attn.extra.weight"),
    (lambda sd: sd.update({"blocks.1.attn.k.weight": torch.zeros(64, 4096)}), "blocks.1.attn.k.weight"),
    (lambda sd: sd.update({"blocks.2.norm1.weight": torch.ones(4096)}), "blocks.2."),
])
def test_strict_loading(tmp_path, tiny_dir, tiny_sd, edit, culprit):
    sd = dict(tiny_sd)
    edit(sd)
    path = _save(tmp_path, sd)
    with pytest.raises(CheckpointError, match=T5_FILE) as info:
        load_text_encoder(path, tiny_dir / TOKENIZER)
    assert culprit in str(info.value)


def test_wrong_shape_message(tmp_path, tiny_dir, tiny_sd):
    path = _save(tmp_path, {**tiny_sd, "norm.weight": torch.ones(4095)})
    with pytest.raises(CheckpointError, match=r"norm\.weight: file \(4095,\) vs model \(4096,\)"):
        load_text_encoder(path, tiny_dir / TOKENIZER)


def test_truncated_file(tmp_path, tiny_dir):
    data = (tiny_dir / T5_FILE).read_bytes()
    path = tmp_path / T5_FILE
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(path)):
        load_text_encoder(path, tiny_dir / TOKENIZER)


def test_missing_files(tmp_path, tiny_dir):
    with pytest.raises(CheckpointError, match="nowhere"):
        load_text_encoder(tiny_dir / T5_FILE, tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="absent.pth"):
        load_text_encoder(tmp_path / "absent.pth", tiny_dir / TOKENIZER)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty"):
        load_text_encoder(tiny_dir / T5_FILE, tmp_path / "empty")
