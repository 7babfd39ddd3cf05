"""VACE beside the causal DiT: equal to diffusers' WanVACETransformer3DModel on one chunk, per-row hints (a row
without conditioning equals the plain model, batched equals alone), the reference prefix over a long run with RoPE
refresh, and strict loading of the released layout."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import WanTransformer3DModel, WanVACETransformer3DModel
from safetensors.torch import load_file, save_file

from wanstream.core.config import CacheConfig
from wanstream.core.errors import CheckpointError
from wanstream.models.dit import CausalWanDiT
from wanstream.models.kv_cache import CachePolicy, CacheStep
from wanstream.models.vace import (
    VACE_WEIGHTS,
    VaceBranch,
    VaceCall,
    VaceConfig,
    context_latents,
    encode_reference,
    load_branch,
)

TOK = 6          # 4x6 latents → 2x3 tokens per frame
LAYERS = [0, 2]


def maxdiff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def pair():
    """A tiny random diffusers VACE model and our causal DiT + VACE branch holding the same weights."""
    torch.manual_seed(0)
    ref = WanVACETransformer3DModel(num_attention_heads=2, attention_head_dim=64, num_layers=3, ffn_dim=192,
                                    text_dim=4096, freq_dim=256, vace_layers=LAYERS, vace_in_channels=96)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ref.eval()
    sd = ref.state_dict()
    base = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=64, num_layers=3, ffn_dim=192,
                                 text_dim=4096, freq_dim=256).eval()
    base.load_state_dict({k: v for k, v in sd.items() if not k.startswith("vace_")})
    dit = CausalWanDiT(base)
    branch = VaceBranch(VaceConfig(tuple(LAYERS)), 128, 2, 192).eval()
    branch.load_state_dict({k: v for k, v in sd.items() if k.startswith("vace_")})
    dit.vace = branch
    return ref, dit


def _step(frames, starts, n, capacity=8, sink=0):
    return CacheStep.build(CachePolicy(CacheConfig(capacity=capacity, sink=sink, sink_threshold=-1)), frames, starts,
                           n, TOK, "cpu")


def test_one_chunk_equals_diffusers_vace(pair):
    """No cache, one chunk of 3 frames (full attention inside the call), one timestep per row, per-layer scales."""
    ref, dit = pair
    torch.manual_seed(1)
    x, c, ctx = torch.randn(2, 3, 16, 4, 6), torch.randn(2, 3, 96, 4, 6), torch.randn(2, 7, 4096)
    t = torch.tensor([700, 300])
    with torch.no_grad():
        want = ref(x.transpose(1, 2), t, torch.nn.functional.pad(ctx, (0, 0, 0, 505)), control_hidden_states=
                   c.transpose(1, 2), control_hidden_states_scale=torch.tensor([0.7, 0.7]), return_dict=False)[0]
        outs = []
        for b in range(2):     # our prompt K/V is per call; one row per call here
            cache = dit.new_cache(1, 3, TOK)
            outs.append(dit(x[b:b + 1], t[b:b + 1], dit.embed_prompt(ctx[b:b + 1]), cache, _step([0], [0], 3, 3),
                            vace=VaceCall(c[b:b + 1], torch.tensor([0.7]))))
        got = torch.cat(outs)
        plain = ref(x.transpose(1, 2), t, torch.nn.functional.pad(ctx, (0, 0, 0, 505)), control_hidden_states=
                    c.transpose(1, 2), control_hidden_states_scale=torch.zeros(2), return_dict=False)[0]
    assert maxdiff(want, plain) > 1e-3                    # the hints matter
    assert maxdiff(got, want.transpose(1, 2)) <= 1e-4


def _run(dit, x, c, scale, prompt, calls=3, ref=None):
    """Frame-by-frame streaming over ``calls`` frames; ``scale[b]`` per row, ``ref`` a Reference per row or None."""
    b = x.shape[0]
    cache = dit.new_cache(b, 8, TOK)
    outs = []
    for f in range(calls):
        call = VaceCall(c[:, f:f + 1] if c is not None else None, scale)
        if ref is not None:
            rows = [0 if r is None else r.tokens for r in ref]
            any_ref = next(r for r in ref if r is not None)
            call.prefix_k = {i: torch.cat([(r or any_ref).k[i] for r in ref]) for i in any_ref.k}
            call.prefix_v = {i: torch.cat([(r or any_ref).v[i] for r in ref]) for i in any_ref.v}
            call.prefix_rows = rows
        outs.append(dit(x[:, f:f + 1], torch.full((b, 1), 500), prompt, cache, _step([f] * b, [f] * b, 1), vace=call))
    return torch.cat(outs, 1)


def test_unconditioned_row_equals_plain_and_batched_equals_alone(pair):
    _, dit = pair
    torch.manual_seed(2)
    x, c = torch.randn(2, 3, 16, 4, 6), torch.randn(2, 3, 96, 4, 6)
    prompt = dit.embed_prompt(torch.randn(1, 5, 4096))
    with torch.no_grad():
        ref = encode_reference(dit, torch.randn(1, 1, 16, 4, 6), prompt)
        plain = _run(dit, x[1:], None, None, prompt)
        alone = _run(dit, x[:1], c[:1], torch.tensor([1.0]), prompt, ref=[ref])
        both = _run(dit, x, c, torch.tensor([1.0, 0.0]), prompt, ref=[ref, None])
        hint_only = _run(dit, x[:1], c[:1], torch.tensor([1.0]), prompt)
        ref_only = _run(dit, x[:1], None, None, prompt, ref=[ref])
        nothing = _run(dit, x[:1], None, None, prompt)
    assert maxdiff(both[1:], plain) <= 1e-5                    # a row without conditioning: the plain model
    assert maxdiff(both[:1], alone) <= 1e-5                    # the conditioned row: itself alone
    for other in (hint_only, ref_only):                        # both parts matter
        assert maxdiff(alone, other) > 1e-3 and maxdiff(other, nothing) > 1e-3


def test_prefixes_of_different_lengths_batched_equal_each_alone(pair):
    """Rows with 2, 1 and no reference images in one call (the prefix zero-padded, each row attending its own
    tokens only) equal each row alone; the second image matters."""
    from types import SimpleNamespace

    from wanstream.engine.conditioning import StreamVace, vace_call
    _, dit = pair
    torch.manual_seed(4)
    prompt = dit.embed_prompt(torch.randn(1, 5, 4096))
    base = torch.randn(1, 1, 16, 4, 6)
    with torch.no_grad():
        two = encode_reference(dit, torch.randn(1, 2, 16, 4, 6), prompt)
        one = encode_reference(dit, torch.randn(1, 1, 16, 4, 6), prompt)
        streams = {n: SimpleNamespace(vace=StreamVace(base, 0.8, ref)) for n, ref in (("a", two), ("b", one))}
        streams["c"] = SimpleNamespace(vace=None)
        x = torch.randn(3, 1, 16, 4, 6)

        def run(names):
            rows = [SimpleNamespace(stream=n, chunk=0) for n in names]
            call = vace_call(streams, rows, 1, "cpu", torch.float32)
            b = len(names)
            idx = [["a", "b", "c"].index(n) for n in names]
            cache = dit.new_cache(b, 4, TOK)
            return dit(x[idx], torch.full((b, 1), 500), prompt, cache, _step([0] * b, [0] * b, 1, 4), vace=call)
        together = run(["a", "b", "c"])
        alone = [run([n]) for n in "abc"]
        streams["a"].vace.reference = one
        first_only = run(["a"])
    assert two.tokens == 2 * TOK and one.tokens == TOK
    for i in range(3):
        assert maxdiff(together[i], alone[i][0]) <= 1e-5, i
    assert maxdiff(alone[0], first_only) > 1e-3


def test_reference_prefix_survives_a_long_run_with_rope_refresh(pair):
    """60 calls through a 4-frame cache (1 sink + ring) with RoPE positions wrapping 10 → 2: the prefix is attended
    every call (removing it changes the output of the last call), never written, and equal to what it was."""
    _, dit = pair
    torch.manual_seed(3)
    prompt = dit.embed_prompt(torch.randn(1, 5, 4096))
    policy = CachePolicy(CacheConfig(capacity=4, sink=1, sink_threshold=-1))
    with torch.no_grad():
        ref = encode_reference(dit, torch.randn(1, 1, 16, 4, 6), prompt)
        before = {i: t.clone() for i, t in ref.k.items()}
        cache = dit.new_cache(1, 4, TOK)
        plain_cache = dit.new_cache(1, 4, TOK)
        pos = 0
        for f in range(60):
            x = torch.randn(1, 1, 16, 4, 6)
            c = torch.randn(1, 1, 96, 4, 6)
            step = CacheStep.build(policy, [f], [pos], 1, TOK, "cpu")
            call = VaceCall(c, torch.tensor([1.0]), ref.k, ref.v, [ref.tokens])
            out = dit(x, torch.full((1, 1), 400), prompt, cache, step, vace=call)
            plain = dit(x, torch.full((1, 1), 400), prompt, plain_cache, step, vace=VaceCall(c, torch.tensor([1.0])))
            assert torch.isfinite(out).all()
            pos = 2 if pos + 1 >= 10 else pos + 1
        assert maxdiff(out, plain) > 1e-3
    assert all(torch.equal(before[i], ref.k[i]) for i in ref.k)


# ------------------------------------------------------------------------------------------------ loading
@pytest.fixture(scope="module")
def vace_root(tmp_path_factory):
    from wanstream.models.random_init import init_random
    root = tmp_path_factory.mktemp("vace_model")
    init_random(root, "tiny", seed=0, log=lambda *_: None, vace=True)
    return root


def test_init_random_writes_the_released_layout_and_loads(vace_root):
    from wanstream.models.loader import load_model
    folder = vace_root / "wan_models" / "Wan2.1-VACE-tiny"
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "vace" and cfg["vace_layers"] == [0, 1] and cfg["vace_in_dim"] == 96
    keys = load_file(str(folder / VACE_WEIGHTS)).keys()
    assert "vace_blocks.0.before_proj.weight" in keys and "vace_blocks.1.after_proj.bias" in keys
    assert "blocks.0.self_attn.q.weight" in keys                       # the release ships the whole model
    bundle = load_model(vace_root, device="cpu", text_encoder=False)
    assert bundle.dit.vace is not None and list(bundle.dit.cache_layers) == [0, 1, 2, 3]
    plain = load_model(vace_root, device="cpu", text_encoder=False, vace=False)
    assert plain.dit.vace is None


@pytest.mark.parametrize("edit,named", [
    (lambda sd: sd.pop("vace_blocks.1.after_proj.weight"), "missing keys: vace_blocks.1.after_proj.weight"),
    (lambda sd: sd.__setitem__("vace_blocks.2.after_proj.bias", torch.zeros(256)),
     "unexpected keys: vace_blocks.2.after_proj.bias"),
    (lambda sd: sd.__setitem__("lora_A.weight", torch.zeros(2)), "unexpected keys: lora_A.weight"),
    (lambda sd: sd.__setitem__("vace_patch_embedding.bias", torch.zeros(3)), "vace_patch_embedding.bias: file (3,)"),
])
def test_strict_loading_names_bad_keys(vace_root, tmp_path, edit, named):
    import shutil

    from wanstream.models.checkpoints import diffusers_dit_config, read_wan_config
    src = vace_root / "wan_models" / "Wan2.1-VACE-tiny"
    folder = tmp_path / "Wan2.1-VACE-tiny"
    shutil.copytree(src, folder)
    sd = load_file(str(folder / VACE_WEIGHTS))
    edit(sd)
    save_file(sd, str(folder / VACE_WEIGHTS))
    wan_cfg = read_wan_config(vace_root / "wan_models" / "Wan2.1-T2V-tiny")
    with pytest.raises(CheckpointError, match=named.replace("(", r"\(").replace(")", r"\)")):
        load_branch(folder, diffusers_dit_config(wan_cfg), wan_cfg)


def test_a_vace_model_of_another_size_is_refused(vace_root, tmp_path):
    import shutil

    from wanstream.models.checkpoints import diffusers_dit_config, read_wan_config
    folder = tmp_path / "v"
    shutil.copytree(vace_root / "wan_models" / "Wan2.1-VACE-tiny", folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "dim": 512}))
    wan_cfg = read_wan_config(vace_root / "wan_models" / "Wan2.1-T2V-tiny")
    with pytest.raises(CheckpointError, match="dim = 512 cannot sit beside a DiT with dim = 256"):
        load_branch(folder, diffusers_dit_config(wan_cfg), wan_cfg)


def test_context_latents_layout():
    z = torch.randn(1, 2, 16, 4, 6)
    c = context_latents(torch.zeros_like(z), z, 1.0)
    assert c.shape == (1, 2, 96, 4, 6) and torch.equal(c[:, :, 16:32], z) and (c[:, :, 32:] == 1).all()
