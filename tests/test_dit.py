"""Causal DiT: conformance with the official traces, streaming == frame-causal full forward, RoPE, caches,
block ranges."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from kit import load_kit

from wanstream.core.config import CacheConfig
from wanstream.models.dit import CausalWanDiT
from wanstream.models.kv_cache import CachePolicy, CacheStep
from wanstream.models.rope import RopeTables, apply_rope, axis_dims
from wanstream.models.sampling import FlowMatchSampler

TOL = 1e-4
F_TOK = 15  # conformance: 48x80 pixels → 3x5 tokens


def maxdiff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------------------------- conformance (c)
def test_conformance_dit_teacher_forced(kit_dit, kit_context):
    """Recorded x_t in, our flow / x0 / K-V cache / written slots / attention lengths out (all 12 calls)."""
    c = load_kit("c_dit_stream_n2_sinkoff.pt")
    policy = CachePolicy(CacheConfig(sink_threshold=-1))
    sampler = FlowMatchSampler()
    prompt = kit_dit.embed_prompt(kit_context)
    cache = kit_dit.new_cache(2, c["kv_cache_frames"], F_TOK)
    with torch.no_grad():
        for st in c["prepare"]["steps"]:
            step = CacheStep.build(policy, [0], [0], 2, F_TOK, "cpu")
            flow = kit_dit(st["x_t"], st["timestep"], prompt, cache, step)
            x0 = sampler.to_x0(st["x_t"], flow, st["timestep"])
            assert maxdiff(flow, st["flow_pred"]) <= TOL
            assert maxdiff(x0, st["x0"]) <= TOL
        snap = c["prepare"]["cache"]
        assert maxdiff(cache.k[0][:1], snap["k_block0"]) <= TOL
        assert maxdiff(cache.v[0][:1], snap["v_block0"]) <= TOL
        cache.copy_row(0, slice(1, None))
        for call in c["calls"]:
            f = call["latent_frame"]
            frames = [f, max(f - 1, 2)]  # row 1 at j = 0 re-runs frame 2's slot (official start-up leftover)
            starts = [s // F_TOK for s in call["starts"].tolist()]
            before = cache.k[0].clone()
            step = CacheStep.build(policy, frames, starts, 1, F_TOK, "cpu")
            flow = kit_dit(call["x_t"], call["timestep"], prompt, cache, step)
            x0 = sampler.to_x0(call["x_t"], flow, call["timestep"])
            assert maxdiff(flow, call["flow_pred"]) <= TOL, call["j"]
            assert maxdiff(x0, call["x0"]) <= TOL, call["j"]
            rec = call["cache"]
            for row in range(2):
                changed = [s for s in range(6) if not torch.equal(before[row, s * F_TOK:(s + 1) * F_TOK],
                                                                  cache.k[0][row, s * F_TOK:(s + 1) * F_TOK])]
                assert changed == rec["written_slots"][0][row], (call["j"], row)
                assert [policy.slot(fr) for fr in frames][row] == rec["written_slots"][0][row][0]
                assert policy.valid_after(frames[row]) * F_TOK == rec["local_end"][0][row]
            if "k_block0" in rec:
                assert maxdiff(cache.k[0], rec["k_block0"]) <= TOL
                assert maxdiff(cache.v[0], rec["v_block0"]) <= TOL


# ------------------------------------------------------------------------- reference: diffusers forward
class _FrameCausalProcessor(WanAttnProcessor):
    """diffusers' own processor with a frame-causal mask on self-attention (the reference)."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)


def _tiny_transformer(layers=2, seed=0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=128, num_layers=layers, ffn_dim=384,
                                  text_dim=4096, freq_dim=256)
    with torch.no_grad():  # random head and modulation so outputs are non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.fixture(scope="module")
def ref_model():
    return _tiny_transformer()


def _frame_causal_reference(model, latents, t_frames, context, tokens_per_frame, first=1):
    """Full forward over all frames at once with a chunk-causal mask (the first ``first`` frames form one
    chunk, then one frame per chunk) and per-token timesteps."""
    b, n = latents.shape[:2]
    chunk = torch.arange(n).clamp(min=first - 1)
    frame_id = chunk.repeat_interleave(tokens_per_frame)
    mask = (frame_id[None, :] <= frame_id[:, None])[None, None]
    for blk in model.blocks:
        blk.attn1.set_processor(_FrameCausalProcessor(mask))
    try:
        ctx = torch.nn.functional.pad(context, (0, 0, 0, 512 - context.shape[1]))
        out = model(latents.transpose(1, 2), t_frames.repeat_interleave(tokens_per_frame, 1), ctx,
                    return_dict=False)[0]
    finally:
        for blk in model.blocks:
            blk.attn1.set_processor(WanAttnProcessor())
    return out.transpose(1, 2)


def _stream(dit, latents, t_frames, context, tokens_per_frame, first=1, rope_offset=0, capacity=None):
    """KV-cached streaming: ``first`` frames in the first call, then one frame per call."""
    n = latents.shape[1]
    cap = capacity or n
    policy = CachePolicy(CacheConfig(capacity=cap, sink=0, sink_threshold=-1))
    cache = dit.new_cache(latents.shape[0], cap, tokens_per_frame)
    prompt = dit.embed_prompt(context)
    outs, f = [], 0
    for size in [first] + [1] * (n - first):
        b = latents.shape[0]
        step = CacheStep.build(policy, [f] * b, [f + rope_offset] * b, size, tokens_per_frame, "cpu")
        outs.append(dit(latents[:, f:f + size], t_frames[:, f:f + size], prompt, cache, step))
        f += size
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("first", [1, 2])
def test_streaming_equals_frame_causal_full_forward(ref_model, first):
    torch.manual_seed(1)
    dit = CausalWanDiT(ref_model)
    latents = torch.randn(2, 4, 16, 4, 6)          # 2 rows, 4 latent frames, 2x3 tokens per frame
    t = torch.tensor([[700, 650, 600, 500], [300, 400, 200, 100]])
    ctx = torch.randn(1, 7, 4096)
    with torch.no_grad():
        ref = _frame_causal_reference(ref_model, latents, t, ctx.expand(2, -1, -1), 6, first)
        got = _stream(dit, latents, t, ctx, 6, first=first)
    assert ref.abs().max() > 0.1
    assert maxdiff(got, ref) <= TOL


def test_rope_offset_is_relative(ref_model):
    """Shifting every temporal position by the same offset leaves the output unchanged (RoPE is relative);
    a cache without the temporal offset (negative control) changes it."""
    torch.manual_seed(2)
    dit = CausalWanDiT(ref_model)
    latents, t, ctx = torch.randn(1, 3, 16, 4, 6), torch.tensor([[700, 600, 500]]), torch.randn(1, 5, 4096)
    with torch.no_grad():
        base = _stream(dit, latents, t, ctx, 6)
        shifted = _stream(dit, latents, t, ctx, 6, rope_offset=37)
        policy = CachePolicy(CacheConfig(capacity=3, sink=0, sink_threshold=-1))
        cache, prompt, outs = dit.new_cache(1, 3, 6), dit.embed_prompt(ctx), []
        for f in range(3):  # every frame at temporal position 0
            step = CacheStep.build(policy, [f], [0], 1, 6, "cpu")
            outs.append(dit(latents[:, f:f + 1], t[:, f:f + 1], prompt, cache, step))
        no_offset = torch.cat(outs, 1)
    assert maxdiff(shifted, base) <= TOL
    assert maxdiff(no_offset[:, 1:], base[:, 1:]) > 1e-3


def test_rope_matches_complex_reference():
    """Interleaved-pair rotation with the 44/42/42 split equals Wan's complex float64 formulation."""
    assert axis_dims(128) == (44, 42, 42)
    assert axis_dims(64) == (24, 20, 20)
    tables = RopeTables(128)
    starts = torch.tensor([0, 9])
    cos, sin = tables.for_grid(starts, 2, 3, 5)
    x = torch.randn(2, 30, 2, 128)
    got = apply_rope(x, cos, sin)

    def freqs(dim):
        return torch.outer(torch.arange(1024).double(), 1.0 / 10000 ** (torch.arange(0, dim, 2).double() / dim))
    ft, fh, fw = freqs(44), freqs(42), freqs(42)
    ref = []
    for b, s in enumerate(starts.tolist()):
        ang = torch.cat([ft[s:s + 2, None, None].expand(2, 3, 5, -1), fh[None, :3, None].expand(2, 3, 5, -1),
                         fw[None, None, :5].expand(2, 3, 5, -1)], -1).reshape(30, 1, 64)
        xc = torch.view_as_complex(x[b].double().reshape(30, 2, 64, 2))
        ref.append(torch.view_as_real(xc * torch.polar(torch.ones_like(ang), ang)).flatten(-2))
    assert maxdiff(got, torch.stack(ref)) <= 1e-5


def test_cross_attention_cache_reuse_is_identical(ref_model):
    torch.manual_seed(3)
    dit = CausalWanDiT(ref_model)
    latents, t, ctx = torch.randn(1, 3, 16, 4, 6), torch.tensor([[700, 600, 500]]), torch.randn(1, 5, 4096)
    policy = CachePolicy(CacheConfig(capacity=3, sink=0, sink_threshold=-1))
    with torch.no_grad():
        once = _stream(dit, latents, t, ctx, 6)
        cache, outs = dit.new_cache(1, 3, 6), []
        for f in range(3):  # recompute the prompt K/V at every call
            step = CacheStep.build(policy, [f], [f], 1, 6, "cpu")
            outs.append(dit(latents[:, f:f + 1], t[:, f:f + 1], dit.embed_prompt(ctx), cache, step))
    assert torch.equal(torch.cat(outs, 1), once)


def test_block_ranges_chained_equal_whole():
    torch.manual_seed(4)
    dit = CausalWanDiT(_tiny_transformer(layers=3, seed=5))
    latents, t, ctx = torch.randn(2, 1, 16, 4, 6), torch.tensor([700, 500]), torch.randn(1, 5, 4096)
    policy = CachePolicy(CacheConfig(capacity=3, sink=0, sink_threshold=-1))
    prompt = dit.embed_prompt(ctx)
    with torch.no_grad():
        whole_cache, staged_cache = dit.new_cache(2, 3, 6), dit.new_cache(2, 3, 6)
        step = CacheStep.build(policy, [0, 0], [0, 0], 1, 6, "cpu")
        whole = dit(latents, t, prompt, whole_cache, step)
        h = dit(latents, t, prompt, staged_cache, step, blocks=(0, 1))
        assert h.shape == (2, 6, 256)
        h = dit(h, t, prompt, staged_cache, step, blocks=(1, 2), grid=(1, 2, 3))
        staged = dit(h, t, prompt, staged_cache, step, blocks=(2, 3), grid=(1, 2, 3))
        with pytest.raises(ValueError, match="grid"):
            dit(h, t, prompt, staged_cache, step, blocks=(1, 3))
        with pytest.raises(ValueError, match="block range"):
            dit(latents, t, prompt, staged_cache, step, blocks=(0, 4))
    assert torch.equal(staged, whole)
    for i in range(3):
        assert torch.equal(staged_cache.k[i], whole_cache.k[i])


def test_stage_cache_holds_only_its_blocks(kit_dit):
    cache = kit_dit.new_cache(2, 6, F_TOK, layers=range(1, 2))
    assert cache.layers == [1]
    assert cache.nbytes() == 2 * 2 * 90 * 2 * 128 * 4 + 2 * 2 * 6 * 256 * 4   # K/V + fp32 slot means
