"""The model loader's part filter (``load_model(..., part=DitPart(...))``): a pipeline stage reads and materialises
only its blocks, with or without the patch embedding and the head, in every layout, strictly; the VAE, text encoder
and TAEHV are each optional. The whole-model signature keeps working."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from wanstream.core.errors import CheckpointError
from wanstream.models.checkpoints import DitPart
from wanstream.models.loader import load_model, num_layers_of

PATCH = ("patch_embedding.",)
HEAD = ("proj_out.", "scale_shift_table")


def _where(bundle) -> dict[str, str]:
    """Device type of each DiT part: 'patch', 'head', 'block i'."""
    tr = bundle.dit.transformer
    out = {"patch": tr.patch_embedding.weight.device.type, "head": tr.proj_out.weight.device.type,
           "time": tr.condition_embedder.time_embedder.linear_1.weight.device.type}
    for i, blk in enumerate(tr.blocks):
        out[f"block {i}"] = blk.attn1.to_q.weight.device.type
    return out


def _bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _check_part_layout(whole, first, last) -> None:
    assert _where(first) == {"patch": "cpu", "head": "meta", "time": "cpu", "block 0": "cpu", "block 1": "meta"}
    assert _where(last) == {"patch": "meta", "head": "cpu", "time": "cpu", "block 0": "meta", "block 1": "cpu"}
    tr = whole.dit.transformer
    head = _bytes(tr.proj_out) + tr.scale_shift_table.numel() * 4
    assert whole.resident_bytes() - first.resident_bytes() == _bytes(tr.blocks[1]) + head
    assert whole.resident_bytes() - last.resident_bytes() == _bytes(tr.blocks[0]) + _bytes(tr.patch_embedding)
    for part in (first, last):          # what it holds equals the whole model's weights
        for name, p in part.dit.named_parameters():
            if not p.is_meta:
                assert torch.equal(p, dict(whole.dit.named_parameters())[name]), name
    assert last.dit.dtype == torch.float32 and last.dit.rope.cos[0].device.type == "cpu"   # (no patch embedding)


@pytest.mark.parametrize("layout", ["causal model.pt", "Wan folder safetensors"])
def test_part_reads_only_its_blocks_with_or_without_patch_embedding_and_head(tiny_model_dir, layout):
    root = tiny_model_dir if layout == "causal model.pt" else next((tiny_model_dir / "wan_models").iterdir())
    assert num_layers_of(root) == 2
    whole = load_model(root, "cpu", text_encoder=False)
    first = load_model(root, "cpu", text_encoder=False, vae=True, part=DitPart(range(0, 1), head=False))
    last = load_model(root, "cpu", text_encoder=False, vae=False, part=DitPart(range(1, 2), patch_embedding=False))
    _check_part_layout(whole, first, last)
    assert first.vae is not None and last.vae is None and last.text_encoder is None and last.taehv is None


def test_part_with_text_encoder_and_taehv(tiny_model_dir):
    mid = load_model(tiny_model_dir, "cpu", vae=False, taehv=True, part=DitPart(range(1, 2), False, False))
    assert mid.text_encoder is not None and mid.taehv is not None and mid.vae is None
    assert _where(mid)["patch"] == _where(mid)["head"] == "meta"


def test_part_loading_is_strict_about_its_own_tensors_only(tiny_model_dir, tmp_path):
    root = tmp_path / "m"
    shutil.copytree(tiny_model_dir, root)
    ckpt = next((root / "ckpts").glob("*/model.pt"))
    sd = torch.load(ckpt, weights_only=True)
    del sd["generator"]["model.head.head.weight"]
    del sd["generator"]["model.blocks.1.ffn.2.bias"]
    torch.save(sd, ckpt)
    part = load_model(root, "cpu", text_encoder=False, vae=False, part=DitPart(range(0, 1), head=False))
    assert _where(part)["block 0"] == "cpu"           # what it does not hold is never read
    with pytest.raises(CheckpointError, match=r"model\.pt.*missing keys: blocks\.1\.ffn\.2\.bias"):
        load_model(root, "cpu", text_encoder=False, vae=False, part=DitPart(range(1, 2), patch_embedding=False,
                                                                              head=False))
    with pytest.raises(CheckpointError, match=r"missing keys: head\.head\.weight"):
        load_model(root, "cpu", text_encoder=False, vae=False, part=DitPart(range(0, 1)))
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.ffn\.2\.bias, head\.head\.weight"):
        load_model(root, "cpu", text_encoder=False)


def test_part_refuses_a_bad_range_and_what_a_part_does_not_run(tiny_model_dir):
    with pytest.raises(ValueError, match=r"block range \[1, 3\) is not inside the model's 2 blocks"):
        load_model(tiny_model_dir, "cpu", text_encoder=False, part=DitPart(range(1, 3)))
    with pytest.raises(ValueError, match="without quantisation or LoRAs"):
        load_model(tiny_model_dir, "cpu", text_encoder=False, quantize="int8", part=DitPart(range(0, 1)))


def test_diffusers_layout_part(tiny_model_dir, tmp_path):
    """A diffusers-layout repo: the part is dropped from the whole model (from_pretrained loads it all)."""
    whole = load_model(tiny_model_dir, "cpu", text_encoder=False)
    repo: Path = tmp_path / "repo"
    whole.dit.transformer.save_pretrained(repo / "transformer")
    whole.vae.vae.save_pretrained(repo / "vae")
    assert num_layers_of(repo) == 2
    first = load_model(repo, "cpu", text_encoder=False, part=DitPart(range(0, 1), head=False))
    last = load_model(repo, "cpu", text_encoder=False, vae=False, part=DitPart(range(1, 2), patch_embedding=False))
    _check_part_layout(whole, first, last)
    assert first.vae is not None and last.vae is None
