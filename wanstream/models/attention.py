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

    ``cache_k/v`` are the storage of one block, ``[R, S, heads, head_dim]``; each run of batch rows with
    consecutive cache rows (``step.segments``) attends to its rows' storage in place (no copy of the cache).
    """
    q = apply_rope(_heads(attn.norm_q(attn.to_q(x)), attn.heads), cos, sin)
    k = apply_rope(_heads(attn.norm_k(attn.to_k(x)), attn.heads), cos, sin)
    v = _heads(attn.to_v(x), attn.heads)
    if step.refresh_rows is not None:
        for b0, b1, r0 in step.segments:
            _refresh_sinks(cache_k[r0: r0 + b1 - b0], cache_v[r0: r0 + b1 - b0], k[b0:b1], v[b0:b1],
                           step.refresh_rows[b0:b1], step)
    cache_k.index_put_((step.row_index, step.write_index), k)
    cache_v.index_put_((step.row_index, step.write_index), v)
    outs = []
    for j, (b0, b1, r0) in enumerate(step.segments):
        keys, values = cache_k[r0: r0 + b1 - b0], cache_v[r0: r0 + b1 - b0]
        use_mask = step.attn_mask is not None and (step.masked is None or step.masked[j])
        mask = step.attn_mask[b0:b1] if use_mask else None
        outs.append(F.scaled_dot_product_attention(q[b0:b1].transpose(1, 2), keys.transpose(1, 2),
                                                   values.transpose(1, 2), attn_mask=mask))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    out = out.transpose(1, 2).flatten(2).type_as(x)
    return attn.to_out[0](out)


def _refresh_sinks(cache_k: torch.Tensor, cache_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   eligible: torch.Tensor, step: CacheStep) -> None:
    """Adaptive sink refresh, decided and applied on the device (no host read), for rows whose cache rows are
    ``cache_k/v`` (a slice of the storage, written in place).

    For each eligible row, the similarity of the new frame to each sink is the mean of the cosine similarities
    of the token-mean keys and of the token-mean values; if the least similar sink is below the threshold it
    is overwritten with the new frame (the frame is also written to its ring slot as usual).
    """
    n_tok = k.shape[1]
    n_sink = step.sink_tokens // n_tok
    sink_k = cache_k[:, : step.sink_tokens].unflatten(1, (n_sink, n_tok))
    sink_v = cache_v[:, : step.sink_tokens].unflatten(1, (n_sink, n_tok))
    sim_k = F.cosine_similarity(k.float().mean(1).flatten(1)[:, None], sink_k.float().mean(2).flatten(2), dim=-1)
    sim_v = F.cosine_similarity(v.float().mean(1).flatten(1)[:, None], sink_v.float().mean(2).flatten(2), dim=-1)
    sim = (sim_k + sim_v) / 2                                               # [B, n_sink]
    low, idx = sim.min(dim=1)
    replace = (low < step.sink_threshold) & eligible                         # [B]
    pick = (torch.arange(n_sink, device=k.device)[None] == idx[:, None]) & replace[:, None]
    pick = pick[:, :, None, None, None]
    sink_k.copy_(torch.where(pick, k[:, None], sink_k))
    sink_v.copy_(torch.where(pick, v[:, None], sink_v))


def prompt_kv(attn, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention K/V of an embedded prompt ``[P, text_len, dim]`` → two ``[P, text_len, heads, hd]``."""
    k = _heads(attn.norm_k(attn.to_k(text)), attn.heads)
    v = _heads(attn.to_v(text), attn.heads)
    return k, v


def cross_attention(attn, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    groups: list[tuple[int, int, int, int]] | None = None) -> torch.Tensor:
    """``x [B, L, dim]`` attends to all prompt positions (padding included, as released).

    Without ``groups`` the K/V batch is 1 (shared) or B (per row). With ``groups`` (from the call's prompt slots)
    ``k/v`` are the prompt slots of a pool; rows ``b_lo..b_hi`` split into ``count`` equal runs, run j attending
    slot ``slot_lo + j``: the run's queries form one sequence, so no K/V is expanded or copied.
    """
    b = x.shape[0]
    q = _heads(attn.norm_q(attn.to_q(x)), attn.heads)
    if groups is None:
        if k.shape[0] != b:
            k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    else:
        outs = []
        for b0, b1, s0, n in groups:
            qg = q[b0:b1].reshape(n, -1, *q.shape[2:])                   # [n, rows_per_run * L, H, D]
            og = F.scaled_dot_product_attention(qg.transpose(1, 2), k[s0: s0 + n].transpose(1, 2),
                                                v[s0: s0 + n].transpose(1, 2))
            outs.append(og.transpose(1, 2).reshape(b1 - b0, -1, og.shape[1], og.shape[3]).transpose(1, 2))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
    out = out.transpose(1, 2).flatten(2).type_as(x)
    return attn.to_out[0](out)
