"""Tiny random evaluation models in the real on-disk layouts, so tests go through the real loaders.

* CLIP: ``CLIPModel.save_pretrained`` (config.json + model.safetensors), a byte-level CLIP BPE tokenizer (no
  merges) and a ``CLIPImageProcessor`` at 64 px, the files of ``openai/clip-vit-base-patch32``.
* RAFT: torchvision's ``raft_small(weights=None)`` state dict under torchvision's own file name.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2's table)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_random_clip(folder: Path, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for c in _byte_chars():
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    bos, eos = len(vocab), len(vocab) + 1
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = bos, eos
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos),
        vision_config=dict(image_size=64, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


def write_random_raft(folder: Path, seed: int = 0) -> Path:
    """raft_small random weights as ``raft_small_C_T_V2-01064c6d.pth`` (the arch is read from the name)."""
    from torchvision.models.optical_flow import raft_small

    from wanstream.eval.models import raft_file_name
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    path = folder / raft_file_name("small")
    torch.save(raft_small(weights=None).state_dict(), path)
    return path
