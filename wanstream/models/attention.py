"""Self-attention over the KV cache and cross-attention over cached prompt K/V.

Both run on the projection / norm weights of diffusers' ``WanAttention`` modules; only the cache handling is
ours. Queries of the new tokens attend non-causally to every valid cached token of their row, which
already includes the tokens just written (keys are stored after RoPE, values raw).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wanstream.models.attention_backends import attend
from wanstream.models.kv_cache import CacheStep
from wanstream.models.rope import apply_rope


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1))


def self_attention(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache_k: torch.Tensor,
                   cache_v: torch.Tensor, step: CacheStep, cache_km: torch.Tensor,
                   cache_vm: torch.Tensor, key_rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                   prefix: tuple[torch.Tensor, torch.Tensor, list[int]] | None = None) -> torch.Tensor:
    """``x [B, L, dim]`` → attention output ``[B, L, dim]``; writes this call's K/V into the cache rows.

    ``cache_k/v`` are the storage of one block, ``[R, S, heads, head_dim]``, and ``cache_km/vm`` its slot means
    ``[R, capacity, heads*head_dim]``; each run of batch rows with consecutive cache rows (``step.segments``)
    attends to its rows' storage in place (no copy of the cache). With ``key_rope`` (cos/sin ``[B, capacity*F, 1,
    head_dim/2]``: LongLive's infinite mode) keys are written without RoPE and the rows' cache is rotated by each
    slot's position for the attention (a copy). With ``prefix`` (``k/v [B, P, heads, head_dim]`` and, per batch
    row, how many of its tokens it attends: a VACE reference, ``models/vace.py``) the rows that have one attend
    ``[prefix ‖ cache]`` (a copy of their rows' cache); the others attend their cache in place, as without.
    """
    q = apply_rope(_heads(attn.norm_q(attn.to_q(x)), attn.heads), cos, sin)
    k = _heads(attn.norm_k(attn.to_k(x)), attn.heads)
    if key_rope is None:
        k = apply_rope(k, cos, sin)
    v = _heads(attn.to_v(x), attn.heads)
    frames = step.slot_index.shape[1]
    if step.write_means or step.refresh_rows is not None:
        mk, mv = frame_means(k, frames), frame_means(v, frames)
    if step.refresh_rows is not None:
        refresh_sinks(cache_k, cache_v, cache_km, cache_vm, k, v, mk[:, 0], mv[:, 0], step)
    cache_k.index_put_((step.row_index, step.write_index), k)
    cache_v.index_put_((step.row_index, step.write_index), v)
    if step.write_means:
        rows = step.cache_row[:, None].expand_as(step.slot_index)
        cache_km.index_put_((rows, step.slot_index), mk)
        cache_vm.index_put_((rows, step.slot_index), mv)
    outs = []
    for j, (b0, b1, r0) in enumerate(step.segments):
        use_mask = step.attn_mask is not None and (step.masked is None or step.masked[j])
        for p0, p1, n in _prefix_runs(prefix, b0, b1):
            mask = step.attn_mask[p0:p1] if use_mask else None
            keys, values = cache_k[r0 + p0 - b0: r0 + p1 - b0], cache_v[r0 + p0 - b0: r0 + p1 - b0]
            if key_rope is not None:
                keys = apply_rope(keys, key_rope[0][p0:p1], key_rope[1][p0:p1])
            if n:
                keys = torch.cat([prefix[0][p0:p1, :n], keys], dim=1)
                values = torch.cat([prefix[1][p0:p1, :n], values], dim=1)
                if mask is not None:
                    mask = torch.cat([mask.new_ones(*mask.shape[:-1], n), mask], dim=-1)
            outs.append(attend(q[p0:p1], keys, values, mask))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return attn.to_out[0](out.flatten(2).type_as(x))


def _prefix_runs(prefix, b0: int, b1: int) -> list[tuple[int, int, int]]:
    """Batch rows ``b0 .. b1`` split where the prefix length changes: ``(lo, hi, tokens)``."""
    if prefix is None:
        return [(b0, b1, 0)]
    out: list[tuple[int, int, int]] = []
    for b in range(b0, b1):
        n = int(prefix[2][b])
        if out and out[-1][2] == n:
            out[-1] = (out[-1][0], b + 1, n)
        else:
            out.append((b, b + 1, n))
    return out


def frame_means(t: torch.Tensor, frames: int) -> torch.Tensor:
    """Token mean of each frame of ``t [B, frames*F, heads, head_dim]`` in float32: ``[B, frames, heads*head_dim]``."""
    return t.float().unflatten(1, (frames, -1)).mean(2).flatten(2)


def refresh_sinks(cache_k: torch.Tensor, cache_v: torch.Tensor, cache_km: torch.Tensor, cache_vm: torch.Tensor,
                  k: torch.Tensor, v: torch.Tensor, mk: torch.Tensor, mv: torch.Tensor, step: CacheStep) -> None:
    """Adaptive sink refresh, decided and applied on the device (no host read), at the cost of one frame.

    For each eligible row, the similarity of the new frame (``k/v [B, F, heads, head_dim]``, token means
    ``mk/mv [B, heads*head_dim]``) to each sink is the mean of the cosine similarities of the token-mean keys
    and of the token-mean values, read from the sink means kept beside the cache. If the least similar sink is
    below the threshold, that sink is overwritten with the new frame and its means; every other row writes its
    new frame to its own ring slot (which the normal write does anyway), so one indexed write of one frame per
    row does both.
    """
    n_tok = step.token_offsets.shape[0]
    n_sink = step.sink_tokens // n_tok
    sink_k = cache_km[step.cache_row, :n_sink]                            # [B, n_sink, heads*head_dim]
    sink_v = cache_vm[step.cache_row, :n_sink]
    sim_k = F.cosine_similarity(mk[:, None], sink_k, dim=-1)
    sim_v = F.cosine_similarity(mv[:, None], sink_v, dim=-1)
    low, idx = ((sim_k + sim_v) / 2).min(dim=1)
    replace = (low < step.sink_threshold) & step.refresh_rows             # [B]
    target = torch.where(replace, idx, step.slot_index[:, 0])           # the sink, or the frame's own ring slot
    tokens = target[:, None] * n_tok + step.token_offsets
    rows = step.row_index[:, :n_tok]
    cache_k.index_put_((rows, tokens), k)
    cache_v.index_put_((rows, tokens), v)
    cache_km.index_put_((step.cache_row, target), mk)
    cache_vm.index_put_((step.cache_row, target), mv)


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
        out = attend(q, k, v)
    else:
        outs = []
        for b0, b1, s0, n in groups:
            qg = q[b0:b1].reshape(n, -1, *q.shape[2:])                   # [n, rows_per_run * L, H, D]
            outs.append(attend(qg, k[s0: s0 + n], v[s0: s0 + n]).reshape(b1 - b0, -1, *q.shape[2:]))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return attn.to_out[0](out.flatten(2).type_as(x))
