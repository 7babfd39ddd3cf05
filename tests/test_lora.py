"""LoRA adapters: every published layout loads strictly and equals merged weights; strength 0 is the base model;
rows with different strengths in one call equal each row alone; live strength changes in the engine."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
from lora_files import LAYOUTS, merged, random_lora, write_lora

from wanstream.core.config import CacheConfig
from wanstream.models.dit import PromptKV
from wanstream.models.kv_cache import CachePolicy, CacheStep
from wanstream.models.lora import LoRAError, LoRASet, LoRASpec, read_lora

F_TOK = 15                      # 48x80 pixels → 3x5 tokens per latent frame
BLOCK = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
         "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"]
ALL_BLOCKS = [f"blocks.{i}.{m}" for i in range(2) for m in BLOCK]
OUTSIDE = ["condition_embedder.text_embedder.linear_1", "condition_embedder.text_embedder.linear_2",
           "condition_embedder.time_embedder.linear_1", "condition_embedder.time_embedder.linear_2",
           "condition_embedder.time_proj", "proj_out"]
# What each layout can express: kohya / musubi LoRAs carry block layers only (here: a subset of them).
LAYERS = {"diffusers": ALL_BLOCKS + OUTSIDE, "peft": ALL_BLOCKS + ["proj_out"], "wan": ALL_BLOCKS + OUTSIDE,
          "wan_down_up": ALL_BLOCKS + OUTSIDE, "kohya": [m for m in ALL_BLOCKS if "attn1.to_v" not in m]}
BIAS = {"diffusers": ("blocks.0.ffn.net.2",), "wan": ("blocks.1.attn2.to_out.0", "proj_out"),
        "wan_down_up": ("blocks.0.attn1.to_q",)}


@pytest.fixture(scope="module")
def dit(kit_dit):
    return copy.deepcopy(kit_dit)       # LoRAs are attached to this copy, never to the shared fixture


@pytest.fixture(scope="module")
def clean(kit_dit):
    return copy.deepcopy(kit_dit)       # never has LoRAs: the base of the merged references


@pytest.fixture
def inputs(kit_context):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 16, 6, 10, generator=g)
    ts = torch.tensor([700, 500, 200])
    return x, ts, kit_context


@pytest.fixture
def attached(dit):
    """Attach LoRA sets to ``dit`` inside a test; always detached afterwards."""
    sets = []

    def attach(specs):
        lora_set = LoRASet.load(specs, dit)
        sets.append(lora_set)
        return lora_set
    yield attach
    for s in sets:
        s.detach()
    assert dit.lora is None


@torch.no_grad()
def forward(dit, x, ts, context, strengths=None):
    """One DiT call (2 latent frames per row, fresh caches); each row's prompt K/V under its own strengths."""
    b = x.shape[0]
    policy = CachePolicy(CacheConfig(capacity=2, sink=0, sink_threshold=-1))
    cache = dit.new_cache(b, 2, F_TOK)
    step = CacheStep.build(policy, [0] * b, [0] * b, 2, F_TOK, "cpu")
    if dit.lora is None or strengths is None:
        return dit(x, ts, dit.embed_prompt(context), cache, step)
    kvs = [dit.lora.embed_prompt(dit, context, s) for s in strengths]
    prompt = PromptKV({i: torch.cat([kv.k[i] for kv in kvs]) for i in kvs[0].k},
                      {i: torch.cat([kv.v[i] for kv in kvs]) for i in kvs[0].v})
    with dit.lora.rows(strengths):
        return dit(x, ts, prompt, cache, step)


def maxdiff(a, b) -> float:
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------ layouts
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_equals_merged_weights_and_zero_is_the_base(dit, clean, inputs, attached, tmp_path, layout):
    alpha = None if layout == "wan" else 8.0
    lora = random_lora(dit, LAYERS[layout], rank=4, seed=1, alpha=alpha, bias=BIAS.get(layout, ()))
    path = write_lora(lora, layout, tmp_path)
    x, ts, ctx = inputs
    base = forward(dit, x, ts, ctx)
    lora_set = attached([LoRASpec(path, 0.7)])
    assert lora_set.names == ("style",) and lora_set.loras[0].layout == {"peft": "diffusers",
                                                                          "wan_down_up": "wan"}.get(layout, layout)
    assert sorted(lora_set.adapters) == sorted(LAYERS[layout])
    out = forward(dit, x, ts, ctx)                                  # default strength 0.7 on every row
    ref = forward(merged(clean, [(lora, 0.7)]), x, ts, ctx)
    assert maxdiff(out, base) > 1e-2                                # the LoRA does change the output ...
    assert maxdiff(out, ref) <= 1e-5                                # ... exactly as merged weights do
    zero = forward(dit, x, ts, ctx, [(0.0,)] * 3)
    assert torch.equal(zero, base)                                  # strength 0: the base model, bit for bit


def test_rows_with_different_strengths_equal_each_row_alone(dit, clean, inputs, attached, tmp_path):
    a = random_lora(dit, ALL_BLOCKS + OUTSIDE, rank=4, seed=2, alpha=4.0, bias=("blocks.0.attn1.to_k",))
    b = random_lora(dit, ALL_BLOCKS[:10], rank=2, seed=3)
    lora_set = attached([write_lora(a, "wan", tmp_path, "a"), f"{write_lora(b, 'diffusers', tmp_path, 'b')}:0.5"])
    assert lora_set.names == ("a", "b") and lora_set.defaults == (1.0, 0.5)
    assert lora_set.touches_prompt
    x, ts, ctx = inputs
    rows = [(0.8, 0.0), (0.0, 0.0), (1.2, -0.4)]                   # the middle row uses no LoRA
    batch = forward(dit, x, ts, ctx, rows)
    for i, s in enumerate(rows):
        alone = forward(dit, x[i:i + 1], ts[i:i + 1], ctx, [s])
        assert maxdiff(batch[i:i + 1], alone) <= 1e-5, s
        ref = forward(merged(clean, [(a, s[0]), (b, s[1])]), x[i:i + 1], ts[i:i + 1], ctx)
        assert maxdiff(alone, ref) <= 1e-5, s
    lora_set.detach()
    assert torch.equal(forward(dit, x, ts, ctx)[1], batch[1])      # the LoRA-free row is the base model


def test_strength_vectors_and_specs(dit, attached, tmp_path):
    path = write_lora(random_lora(dit, ALL_BLOCKS[:2], seed=4), "wan", tmp_path, "ink")
    assert LoRASpec.parse(f"{path}:0.25") == LoRASpec(path, 0.25)
    assert LoRASpec.parse(str(path)) == LoRASpec(path, 1.0)
    assert LoRASpec.parse("C:/styles/ink.safetensors").path.name == "ink.safetensors"  # not a strength
    with pytest.raises(ValueError, match="strength"):
        LoRASpec.parse(f"{path}:9")
    lora_set = attached([f"{path}:0.6"])
    assert lora_set.strengths(None) == (0.6,)
    assert lora_set.strengths({"ink": 0.2}) == (0.2,)
    assert lora_set.strengths({}) == (0.6,)
    assert not lora_set.touches_prompt                              # self-attention only
    with pytest.raises(ValueError, match="unknown LoRA 'oil'.*loaded: ink"):
        lora_set.strengths({"oil": 1.0})
    with pytest.raises(ValueError, match="strength"):
        lora_set.strengths({"ink": float("nan")})
    with pytest.raises(RuntimeError, match="already"):
        LoRASet.load([path], dit)
    with pytest.raises(ValueError, match="unique"):
        LoRASet([lora_set.loras[0], lora_set.loras[0]], [1.0, 1.0])


# ------------------------------------------------------------------------------------------ strictness
def _save(path, sd, metadata=None):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("keys, message", [
    ({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": (4, 256),
      "diffusion_model.blocks.0.self_attn.q.lora_B.weight": (256, 4),
      "diffusion_model.blocks.0.self_attn.qq.lora_A.weight": (4, 256)},
     "match no layer.*diffusion_model.blocks.0.self_attn.qq.lora_A.weight"),
    ({"diffusion_model.blocks.0.cross_attn.k_img.lora_A.weight": (4, 256),
      "diffusion_model.blocks.0.cross_attn.k_img.lora_B.weight": (256, 4)},
     "match no layer.*k_img"),                                      # an image-to-video LoRA
    ({"diffusion_model.blocks.0.self_attn.q.diff": (256, 256)}, r"full-weight deltas \(.diff\).*self_attn.q.diff"),
    ({"diffusion_model.blocks.0.norm3.diff": (256,)}, "norm-weight deltas.*norm3.diff"),
    ({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": (4, 256)}, "other half.*self_attn.q.lora_A.weight"),
    ({"diffusion_model.blocks.5.self_attn.q.lora_A.weight": (4, 256),
      "diffusion_model.blocks.5.self_attn.q.lora_B.weight": (256, 4)},
     "no linear layer of the model.*blocks.5.attn1.to_q.lora_A.weight"),   # a 30-block LoRA on a 2-block model
    ({"lora_unet_blocks_0_self_attn_q.lora_down.weight": (4, 256),
      "lora_unet_blocks_0_self_attn_q.lora_up.weight": (256, 4),
      "lora_unet_blocks_0_attn_x.lora_down.weight": (4, 256)}, "match no layer.*lora_unet_blocks_0_attn_x"),
    ({"transformer.blocks.0.attn1.to_q.lora_A.weight": (4, 256),
      "transformer.blocks.0.attn1.to_q.lora_B.weight": (256, 4),
      "transformer.blocks.0.norm2.lora_A.weight": (4, 256),
      "transformer.blocks.0.norm2.lora_B.weight": (256, 4)}, "no linear layer.*blocks.0.norm2.lora_A.weight"),
    ({"transformer.blocks.0.attn1.to_q.lora_A.weight": (4, 128),
      "transformer.blocks.0.attn1.to_q.lora_B.weight": (256, 4)},
     r"shape mismatches.*blocks.0.attn1.to_q.lora_A.weight \(4, 128\)"),
    ({"transformer.blocks.0.attn1.to_q.lora_A.weight": (4, 256),
      "transformer.blocks.0.attn1.to_q.lora_B.weight": (256, 2)}, "rank of lora_A 4 vs lora_B 2"),
    ({"transformer.blocks.0.attn1.to_q.lora_magnitude_vector": (256,)}, "not LoRA weights.*lora_magnitude_vector"),
])
def test_bad_files_name_the_file_and_keys(dit, tmp_path, keys, message):
    path = _save(tmp_path / "bad.safetensors", {k: torch.ones(s) for k, s in keys.items()})
    with pytest.raises(LoRAError, match=message) as info:
        read_lora(path, dit)
    assert str(path) in str(info.value)
    assert dit.lora is None


def test_zero_norm_deltas_are_ignored_and_missing_files_are_named(dit, tmp_path):
    sd = {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.ones(4, 256),
          "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.ones(256, 4),
          "diffusion_model.blocks.0.norm3.diff": torch.zeros(256)}
    weights = read_lora(_save(tmp_path / "z.safetensors", sd), dit)
    assert list(weights.layers) == ["blocks.0.attn1.to_q"]
    with pytest.raises(LoRAError, match="nope.safetensors: LoRA file not found"):
        read_lora(tmp_path / "nope.safetensors", dit)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoRAError, match="no LoRA file in this folder"):
        read_lora(tmp_path / "empty", dit)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoRAError, match="junk.safetensors: cannot read"):
        read_lora(tmp_path / "junk.safetensors", dit)
    meta = {"lora_adapter_metadata": '{"transformer.use_dora": true, "transformer.lora_alpha": 4}'}
    dora = _save(tmp_path / "dora.safetensors", {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, 256),
                                                 "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.ones(256, 4)},
                 meta)
    with pytest.raises(LoRAError, match="DoRA"):
        read_lora(dora, dit)


# ------------------------------------------------------------------------------------------ engine
@pytest.fixture(scope="module")
def lora_model(tiny_model, tiny_model_dir, tmp_path_factory):
    """A tiny model loaded with a LoRA on self- and cross-attention K/V (so prompt K/V depend on it)."""
    from wanstream.models.loader import load_model
    lora = random_lora(tiny_model.dit, ["blocks.0.attn1.to_q", "blocks.0.attn2.to_k", "blocks.1.ffn.net.2"],
                       seed=5, alpha=8.0, std=0.3)
    path = write_lora(lora, "kohya", tmp_path_factory.mktemp("lora"), "ink")
    with pytest.raises(LoRAError, match="ink"):
        load_model(tiny_model_dir, device="cpu", text_encoder=False, lora=[path.with_name("ink2.safetensors")])
    return load_model(tiny_model_dir, device="cpu", text_encoder=False, lora=[f"{path}:0.0"])


def _session(model, engine=None, **kw):
    from wanstream.api.session import StreamSession
    g = torch.Generator().manual_seed(0)
    return StreamSession(model, prompt_embeds=torch.randn(1, 8, 4096, generator=g) * 0.1, width=64, height=64,
                         steps=2, seed=1, engine=engine, **kw)


def _frames(n):
    from wanstream.io.video import make_motion_clip
    return make_motion_clip(n, 64, 64, seed=2)


@contextlib.contextmanager
def recording(lora_set):
    """Record the per-row strengths of every call made under ``lora_set.rows``."""
    calls, rows = [], lora_set.rows

    @contextlib.contextmanager
    def spy(per_row):
        calls.append(list(per_row))
        with rows(per_row):
            yield
    lora_set.rows = spy
    try:
        yield calls
    finally:
        del lora_set.rows


def test_streams_with_different_strengths_share_calls_and_match_alone(lora_model):
    from wanstream.engine.loop import Engine
    frames = _frames(13)

    def run(strengths):
        engine = Engine(lora_model)
        sessions = [_session(lora_model, engine, lora={"ink": s}) for s in strengths]
        with recording(lora_model.dit.lora) as calls:
            for i in range(0, len(frames), 4):
                for s in sessions:
                    engine.feed(s.stream, frames[i:i + 4])
                engine.run_until_idle()
            outs = [np.stack([f.image for f in s.flush()]) for s in sessions]
        return outs, calls

    (on, off), calls = run([1.0, 0.0])
    assert [(1.0,), (1.0,), (0.0,), (0.0,)] in calls                # one DiT call, two strengths
    (on_alone,), _ = run([1.0])
    (off_alone,), _ = run([0.0])
    assert len(on) == len(off) == 13
    assert np.abs(on.astype(int) - on_alone).max() <= 1
    assert np.abs(off.astype(int) - off_alone).max() <= 1
    assert np.abs(on.astype(int) - off).mean() > 1                  # the LoRA does change the stream


def test_live_strength_change_applies_from_the_next_chunk(lora_model):
    lora_set = lora_model.dit.lora
    frames = _frames(21)
    changed, steady = _session(lora_model), _session(lora_model)
    out_changed, out_steady = [], []
    with recording(lora_set) as calls:
        for i, n in enumerate([5, 4, 4, 4, 4]):
            lo = sum([5, 4, 4, 4, 4][:i])
            out_steady += steady.push(frames[lo:lo + n])
            if i == 3:
                pool = changed.engine.groups[next(iter(changed.engine.groups))].runner.pool
                slot = pool.leases[changed.stream.id].slot
                k_before = pool.pk[0][slot].clone()
                calls.clear()
                changed.update(lora={"ink": 1.5})
                assert calls == [[(1.5,)]]                          # the prompt K/V only: no DiT call ran
                expect = lora_set.embed_prompt(lora_model.dit, changed.stream.embedding, (1.5,)).k[0]
                assert torch.equal(pool.pk[0][slot], expect[0])     # prompt K/V recomputed for the strength
                assert not torch.equal(k_before, expect[0])
                calls.clear()
            out_changed += changed.push(frames[lo:lo + n])
            if i == 3:
                assert len(calls) == 1 and calls[0] == [(1.5,), (1.5,)]   # both rows of the next call
    out_changed += changed.flush()
    out_steady += steady.flush()
    assert changed.settings.lora == (1.5,) and steady.settings.lora is None
    first_after = 5 + 4               # chunks 0 and 1 were out before the change; chunk 2 ran its last level after
    a = np.stack([f.image for f in out_changed]).astype(int)
    b = np.stack([f.image for f in out_steady]).astype(int)
    assert np.array_equal(a[:first_after], b[:first_after])
    assert all(not np.array_equal(a[i:i + 4], b[i:i + 4]) for i in range(first_after, len(a), 4))   # every later chunk


def test_engine_refuses_loras_it_does_not_have(lora_model, tiny_model):
    from wanstream.engine.loop import Engine
    with pytest.raises(ValueError, match="unknown LoRA 'oil'"):
        _session(lora_model, lora={"oil": 1.0})
    with pytest.raises(ValueError, match="no LoRA is loaded"):
        _session(tiny_model, lora={"ink": 1.0})
    session = _session(lora_model)
    with pytest.raises(ValueError, match="strength"):
        session.update(lora={"ink": 100.0})
    assert Engine(tiny_model).lora_strengths(None) is None and Engine(tiny_model).lora_strengths({}) is None


def test_t2v_with_a_lora_at_zero_is_the_base_file(tiny_model, tiny_model_dir, tmp_path):
    from wanstream.cli.main import main
    path = write_lora(random_lora(tiny_model.dit, ALL_BLOCKS[:4], seed=6, std=0.3), "kohya", tmp_path, "ink")
    common = ["t2v", "--prompt", "a fox", "--frames", "5", "--model", str(tiny_model_dir), "--resolution", "64x48",
              "--steps", "1", "--device", "cpu"]
    files = {}
    for name, extra in (("base", []), ("zero", ["--lora", f"{path}:0"]), ("on", ["--lora", str(path)])):
        assert main([*common, "-o", str(tmp_path / f"{name}.mp4"), *extra]) == 0
        files[name] = (tmp_path / f"{name}.mp4").read_bytes()
    assert files["zero"] == files["base"] and files["on"] != files["base"]
