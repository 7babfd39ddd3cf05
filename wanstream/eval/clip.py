"""CLIP embeddings of frames and prompts (transformers ``CLIPModel``, its own tokenizer and image processor).

Frames go through the model's ``CLIPImageProcessor`` as tensors (resize the short side to 224, bicubic, centre
crop 224, CLIP mean/std), batched on the model's device. Embeddings come back L2-normalised, float32, on the
CPU, so every CLIP metric is a dot product.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from wanstream.core.errors import CheckpointError
from wanstream.eval.flow import channels_first


class ClipEmbedder:
    def __init__(self, model, tokenizer, processor, model_id: str, source: str, device: torch.device | str = "cpu",
                 batch: int = 32):
        if batch < 1:
            raise ValueError(f"CLIP batch size must be at least 1, got {batch}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer, self.processor = tokenizer, processor
        self.model_id, self.source, self.batch = model_id, source, int(batch)
        self.max_tokens = int(model.config.text_config.max_position_embeddings)

    def describe(self) -> dict:
        return {"id": self.model_id, "source": self.source, "device": str(self.device),
                "image_size": int(self.model.config.vision_config.image_size), "max_tokens": self.max_tokens}

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens of ``prompt`` with start/end tokens (CLIP reads at most :attr:`max_tokens`)."""
        return len(self.tokenizer(prompt)["input_ids"])

    @torch.no_grad()
    def text(self, prompts: list[str]) -> torch.Tensor:
        """``[P, D]`` unit text embeddings (prompts longer than the model's 77 tokens are truncated)."""
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_tokens,
                                return_tensors="pt").to(self.device)
        out = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return _unit(_pooled(out))

    @torch.no_grad()
    def images(self, frames: np.ndarray, progress=None) -> torch.Tensor:
        """``[N, D]`` unit image embeddings of uint8 frames ``[N, H, W, 3]``, :attr:`batch` frames per call."""
        out = []
        for s in range(0, len(frames), self.batch):
            chunk = channels_first(frames[s: s + self.batch], self.device)
            pixels = self.processor(images=chunk, return_tensors="pt", device=self.device)["pixel_values"]
            feats = self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype))
            out.append(_unit(_pooled(feats)))
            if progress is not None:
                progress.update(len(chunk))
        if not out:
            raise ValueError("no frames to embed")
        return torch.cat(out)


def _pooled(out) -> torch.Tensor:
    """transformers 5 returns a model output whose ``pooler_output`` is the projected embedding."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu()


def load_clip(folder: str | Path, model_id: str | None = None, device: torch.device | str = "cpu",
              batch: int = 32) -> ClipEmbedder:
    """Load a CLIP model folder in the transformers layout (local files only, never the network)."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer
    folder = Path(folder)
    try:
        model, info = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32,
                                                output_loading_info=True)
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError, RuntimeError) as exc:    # RuntimeError: size mismatches
        raise CheckpointError(f"{folder}: cannot load a CLIP model ({type(exc).__name__}: {exc})") from exc
    # unexpected keys are tolerated: older exports carry buffers (position_ids) the current class rebuilds
    bad = {k: sorted(v)[:5] for k, v in info.items() if v and k in ("missing_keys", "mismatched_keys")}
    if bad:
        raise CheckpointError(f"{folder}: CLIP weights do not match config.json: {bad}")
    return ClipEmbedder(model, tokenizer, processor, model_id or f"local:{folder}", str(folder), device, batch)
