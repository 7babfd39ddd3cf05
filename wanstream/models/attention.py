"""Self-attention over the KV cache and cross-attention over cached prompt K/V.

Both run on the projection / norm weights of diffusers' ``WanAttention`` modules; only the cache handling is
ours. Queries of the new tokens attend non-causally to every valid cached token of their row, which
already includes the tokens just written (keys are stored after RoPE, values raw).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kv_cache import CacheStep
from .rope import apply_rope


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1))


def self_attention(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache_k: torch.Tensor,
                   cache_v: torch.Tensor, step: CacheStep) -> torch.Tensor:
    """``x [B, L, dim]`` → attention output ``[B, L, dim]``; writes this call's K/V into the cache rows.

    ``cache_k/v`` are the storage of one block, ``[R, S, heads, head_dim]``; batch rows use ``step.rows``.
    """
    q = apply_rope(_heads(attn.norm_q(attn.to_q(x)), attn.heads), cos, sin)
    k = apply_rope(_heads(attn.norm_k(attn.to_k(x)), attn.heads), cos, sin)
    v = _heads(attn.to_v(x), attn.heads)
    if step.refresh_rows is not None:
        _refresh_sinks(cache_k, cache_v, k, v, step)
    cache_k.index_put_((step.row_index, step.write_index), k)
    cache_v.index_put_((step.row_index, step.write_index), v)
    keys, values = cache_k[step.rows], cache_v[step.rows]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=step.attn_mask)
    out = out.transpose(1, 2).flatten(2).type_as(x)
    return attn.to_out[0](out)


def _refresh_sinks(cache_k: torch.Tensor, cache_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   step: CacheStep) -> None:
    """Adaptive sink refresh, decided and applied on the device (no host read).

    For each eligible row, the similarity of the new frame to each sink is the mean of the cosine similarities
    of the token-mean keys and of the token-mean values; if the least similar sink is below the threshold it
    is overwritten with the new frame (the frame is also written to its ring slot as usual).
    """
    n_tok = k.shape[1]
    n_sink = step.sink_tokens // n_tok
    sink_k = cache_k[step.rows, : step.sink_tokens].unflatten(1, (n_sink, n_tok))
    sink_v = cache_v[step.rows, : step.sink_tokens].unflatten(1, (n_sink, n_tok))
    sim_k = F.cosine_similarity(k.float().mean(1).flatten(1)[:, None], sink_k.float().mean(2).flatten(2), dim=-1)
    sim_v = F.cosine_similarity(v.float().mean(1).flatten(1)[:, None], sink_v.float().mean(2).flatten(2), dim=-1)
    sim = (sim_k + sim_v) / 2                                               # [B, n_sink]
    low, idx = sim.min(dim=1)
    replace = (low < step.sink_threshold) & step.refresh_rows                # [B]
    pick = (torch.arange(n_sink, device=k.device)[None] == idx[:, None]) & replace[:, None]
    pick = pick[:, :, None, None, None]
    sink_k.copy_(torch.where(pick, k[:, None], sink_k))
    sink_v.copy_(torch.where(pick, v[:, None], sink_v))


def prompt_kv(attn, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention K/V of an embedded prompt ``[P, text_len, dim]`` → two ``[P, text_len, heads, hd]``."""
    k = _heads(attn.norm_k(attn.to_k(text)), attn.heads)
    v = _heads(attn.to_v(text), attn.heads)
    return k, v


def cross_attention(attn, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``x [B, L, dim]`` attends to all prompt positions (padding included, as released); K/V batch 1 or B."""
    b = x.shape[0]
    q = _heads(attn.norm_q(attn.to_q(x)), attn.heads)
    if k.shape[0] != b:
        k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    out = out.transpose(1, 2).flatten(2).type_as(x)
    return attn.to_out[0](out)
