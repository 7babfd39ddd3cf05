"""Self-Forcing and LongLive on the engine: backbones as data, their released layouts, and text-to-video against the
golden traces recorded from the official code (``tests/data/conformance/backbones``): every DiT call, cache counters
and attended keys, final latents and decoded video, teacher-forced and free-running from the recorded noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kit import BACKBONE_GOLDENS, Recorder, backbone_context, backbone_model_root, load_backbone_kit, run_golden

from wanstream.core.backbones import BACKBONES, LONGLIVE, SDV2, SELF_FORCING, backbone
from wanstream.core.errors import CheckpointError
from wanstream.engine.loop import Engine
from wanstream.engine.noise import ReplayNoise
from wanstream.models.kv_cache import CachePolicy
from wanstream.models.loader import load_model
from wanstream.models.sampling import FlowMatchSampler

TOL = 1e-4
W, H, TPF = 80, 48, 15


@pytest.fixture(scope="module")
def golden_models(tmp_path_factory):
    """Each backbone's kit model loaded through ``load_model`` from its released layout."""
    out = {}
    for name in BACKBONE_GOLDENS:
        root = backbone_model_root(name, tmp_path_factory.mktemp(name))
        out[name] = load_model(root, device="cpu", text_encoder=False)
    return out


# ============================================================================================ data
def test_backbones_are_data():
    assert set(BACKBONES) == {"streamdiffusionv2", "self-forcing", "longlive", "longlive-infinite"}
    assert backbone(None) is SDV2 and backbone("longlive") is LONGLIVE
    with pytest.raises(ValueError, match="unknown backbone 'wan'"):
        backbone("wan")
    assert SDV2.step_list(2) == [700, 500] and SDV2.step_list(2, "t2v") == [1000, 750, 0]
    assert not SELF_FORCING.stream_batch and SELF_FORCING.context_pass and SELF_FORCING.cache("t2v").capacity == 21
    assert (LONGLIVE.cache("t2v").capacity, LONGLIVE.cache("t2v").sink) == (12, 3)
    assert LONGLIVE.chunk_rule("v2v").first_frames == 9 and LONGLIVE.chunk_rule("v2v").frames == 12


@pytest.mark.parametrize("name", ["self-forcing", "longlive"])
def test_warped_float_timesteps_equal_the_official_scheduler(name):
    """``cat(t_grid, [0])[1000 - steps]`` of the shift-5 grid, as float32 values (the trace's list)."""
    bb = BACKBONES[name]
    grid = FlowMatchSampler(bb.shift).grid_timesteps
    official = torch.cat([grid, torch.zeros(1)])[1000 - torch.tensor(bb.t2v_steps)]
    assert bb.step_list(4, "t2v") == official.tolist()
    assert bb.step_list(4, "t2v") == load_backbone_kit(BACKBONE_GOLDENS[name])["denoising_step_list"].tolist()
    assert bb.step_list(2, "t2v") == official[:2].tolist()


# ============================================================================================ loading
def test_layouts_load_strictly(golden_models, tmp_path):
    sf, ll = golden_models["self-forcing"], golden_models["longlive"]
    assert sf.backbone is SELF_FORCING and ll.backbone is LONGLIVE
    assert sf.sampler.shift == 5.0 and sf.dit.lora is None
    assert ll.dit.lora.names == ("longlive",) and len(ll.dit.lora.adapters) == 20
    # Self-Forcing loads generator_ema (its head differs from generator's)
    ema = load_backbone_kit("selfforcing_generator_head.pt")
    assert not torch.equal(sf.dit.transformer.proj_out.weight, ema["model.head.head.weight"])
    # a Self-Forcing file without generator_ema: the error names the key and what is there
    root = backbone_model_root("self-forcing", tmp_path / "sf")
    path = root / SELF_FORCING.checkpoint.generator
    torch.save({"generator": torch.load(path)["generator"]}, path)
    with pytest.raises(CheckpointError, match="'generator_ema'.*found: 'generator'"):
        load_model(root, device="cpu", text_encoder=False)
    # a LongLive root without its LoRA
    root = backbone_model_root("longlive", tmp_path / "ll")
    (root / LONGLIVE.checkpoint.lora).unlink()
    with pytest.raises(CheckpointError, match="needs its LoRA"):
        load_model(root, device="cpu", text_encoder=False)


def test_several_generators_need_a_backbone(tmp_path):
    root = backbone_model_root("self-forcing", tmp_path)
    backbone_model_root("longlive", tmp_path)
    with pytest.raises(CheckpointError, match="several backbones.*--backbone"):
        load_model(root, device="cpu", text_encoder=False)
    assert load_model(root, device="cpu", text_encoder=False, backbone="longlive").backbone is LONGLIVE


@pytest.mark.parametrize("name", ["self-forcing", "longlive"])
def test_init_random_writes_each_layout(tmp_path, name):
    from wanstream.models.random_init import init_random
    init_random(tmp_path, "tiny", backbone=name, log=lambda *_: None)
    m = load_model(tmp_path, device="cpu", text_encoder=False)
    assert m.backbone.name == name
    assert (m.dit.lora is not None) == (name == "longlive")


# ============================================================================================ goldens
@pytest.mark.parametrize("name", list(BACKBONE_GOLDENS))
@pytest.mark.parametrize("force", [True, False], ids=["teacher-forced", "free-running"])
def test_t2v_golden_through_the_engine(golden_models, name, force):
    model, g = golden_models[name], load_backbone_kit(BACKBONE_GOLDENS[name])
    s, rec, rs = run_golden(model, g, force)
    assert len(rec.calls) == len(g["calls"]) == 5 * g["num_blocks"]
    assert rs.noise.used == g["num_blocks"] and rs.renoise_source.used == len(g["noise_log"]) - 1
    policy = CachePolicy(model.backbone.cache("t2v"))
    err = {}
    for got, want in zip(rec.calls, g["calls"]):
        assert got["t"].tolist() == [want["timestep"][0, 0].item()]                       # float timesteps
        err["x_t"] = max(err.get("x_t", 0), (got["x"] - want["x_t"]).abs().max().item())
        err["flow"] = max(err.get("flow", 0), (got["flow"] - want["flow_pred"]).abs().max().item())
        x0 = model.sampler.to_x0(got["x"], got["flow"], got["t"])
        err["x0"] = max(err.get("x0", 0), (x0 - want["x0"]).abs().max().item())
        # attended keys and the cache counters the official code reports (tokens)
        q, k = want["attn_q_k_len"][0]
        assert (3 * TPF, got["keys"]) == (q, k)
        f0 = want["start_frame"]
        assert policy.valid_after(f0, 3) * TPF == want["cache_after"]["local_end"][0]
        assert (f0 + 3) * TPF <= want["cache_after"]["global_end"][0]
        if name == "longlive":                      # a roll-and-insert evicts the frames our ring overwrites
            up = want["cache_updates"][0]
            evicted = policy.evicted(f0, 3, want["cache_before"]["global_end"][0] // TPF)
            assert len(evicted) * TPF == up.get("num_evicted_tokens", 0)
            assert (up["action"] == "roll_and_insert") == bool(evicted)
    assert max(err.values()) <= TOL, err
    latents = torch.cat([d.latent for d in sorted(rec.finished, key=lambda d: d.row.chunk)], dim=1)
    assert (latents - g["latents"]).abs().max().item() <= TOL
    # decoded video: our streaming decode of the blocks against the official one-shot decode (float), and the
    # engine's uint8 frames within one level of it
    state = model.vae.new_state()
    video = torch.cat([model.vae.decode(state, latents[:, f: f + 3]) for f in range(0, latents.shape[1], 3)], 1)
    video = video.clamp(-1, 1) * 0.5 + 0.5
    assert (video - g["video"]).abs().max().item() <= TOL
    frames = s.take_outputs()
    assert [f.index for f in frames] == list(range(g["video"].shape[1]))
    ours = torch.stack([torch.from_numpy(f.image) for f in frames]).permute(0, 3, 1, 2).float()
    assert (ours - g["video"][0] * 255).abs().max().item() <= 1.0 + 1e-3


# ============================================================================================ re-cache
class OfficialLongLive:
    """LongLive's cache rules as the spec states them (``spec/backbones.md`` §7–8), over our DiT: a
    chronological window with physical roll-left eviction, the recompute rule (no counter advance, the sink
    protected), and the prompt-switch re-cache over ``min(12, cur)`` clean frames (bidirectional, new prompt, t = 0,
    ``global_sink`` true: writes kept out of the sink once not at frame 0; false: K/V zeroed, the whole window
    written from slot 0). Writes the official code does not keep go to scratch slots no query sees."""

    def __init__(self, dit, prompt, cap=12, sink=3, infinite=False):
        self.dit, self.prompt, self.cap, self.sink, self.infinite = dit, prompt, cap * TPF, sink * TPF, infinite
        self.cache = dit.new_cache(1, 2 * cap, TPF)           # [0, cap): the window; [cap, 2 cap): scratch
        self.global_end = self.local_end = 0

    def call(self, x, t, f0, recache=False, keep_sink=True):
        from wanstream.models.kv_cache import CacheStep
        n = x.shape[1]
        cs, N = f0 * TPF, n * TPF
        end = cs + N
        k, v = self.cache.k, self.cache.v
        if recache and not keep_sink:
            for store in (k, v):
                for t_ in store.values():
                    t_.zero_()
        local_end = self.local_end + end - self.global_end
        if end > self.global_end and N + self.local_end > self.cap:           # roll-left
            evict = N + self.local_end - self.cap
            roll = self.local_end - evict - self.sink
            for store in (k, v):
                for t_ in store.values():
                    t_[:, self.sink: self.sink + roll] = t_[:, self.sink + evict: self.sink + evict + roll].clone()
            local_end -= evict
        local_start = local_end - N
        write_start = local_start
        if end <= self.global_end and cs > 0 and not (recache and not keep_sink):
            write_start = max(local_start, self.sink)                          # the recompute rule
        target = [local_start + j if local_start + j >= write_start else self.cap + j for j in range(N)]
        tokens = torch.arange(2 * self.cap)
        # infinite mode (causal_model_infinity.py): keys stored without RoPE, the window rotated by slot index,
        # the new frames at their slots' positions
        start = local_start // TPF if self.infinite else f0
        keys = torch.arange(2 * self.cap // TPF)[None] if self.infinite else None
        step = CacheStep(torch.tensor([target]), torch.zeros(1, N, dtype=torch.long),
                         (tokens < local_end)[None, None, None], None, torch.tensor([start]), [(0, 1, 0)], self.sink,
                         -1.0, torch.zeros(1, dtype=torch.long), torch.zeros(1, n, dtype=torch.long),
                         torch.arange(TPF), False, key_positions=keys)
        flow = self.dit(x, t.expand(1, n), self.prompt, self.cache, step)
        self.global_end, self.local_end = max(self.global_end, end), local_end
        return flow


def official_longlive_t2v(model, g_noise, renoise, blocks, switch_at, prompt_b, keep_sink, recache=True,
                          infinite=False):
    """LongLive interactive inference (blocks of 3, 4 warped steps, context pass, one switch at block
    ``switch_at`` with re-cache) over :class:`OfficialLongLive`; returns the latents."""
    dit, sampler = model.dit, model.sampler
    steps = torch.tensor(LONGLIVE.step_list(4, "t2v"))
    off = OfficialLongLive(dit, dit.lora.embed_prompt(dit, backbone_context("A")), infinite=infinite)
    draws = iter(renoise)
    out = []
    for b in range(blocks):
        f0 = 3 * b
        if b == switch_at:
            off.prompt = dit.lora.embed_prompt(dit, prompt_b)
            n = min(12, f0)
            if recache:
                off.call(torch.cat(out, 1)[:, f0 - n: f0], torch.zeros(1), f0 - n, recache=True, keep_sink=keep_sink)
        x = g_noise[:, f0: f0 + 3]
        for i, t in enumerate(steps):
            flow = off.call(x, t.reshape(1), f0)
            x0 = sampler.to_x0(x, flow, t.expand(1, 3))
            if i < 3:
                x = sampler.add_noise(x0, next(draws).reshape(x0.shape), steps[i + 1].reshape(1))
        off.call(x0, torch.zeros(1), f0)
        out.append(x0)
    return torch.cat(out, 1)


@pytest.mark.parametrize("switch_at,keep_sink", [(6, True), (2, True), (6, False)],
                         ids=["window-full", "before-the-roll", "global-sink-off"])
def test_longlive_prompt_switch_recache_equals_the_official_rules(golden_models, switch_at, keep_sink):
    """A LongLive stream switching prompt with a KV re-cache, through the engine (ring cache, the re-cache of the
    non-sink window after the tick's outputs), equals the official algorithm (roll-left window, 12 query frames,
    sink protection) to ≤ 1e-4 over 8 blocks (the window rolls from block 4 on)."""
    model, blocks = golden_models["longlive"], 8
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(1, 3 * blocks, 16, 6, 10, generator=g)
    renoise = [torch.randn(1, 3, 16, 6, 10, generator=g) for _ in range(3 * blocks)]
    prompt_b = backbone_context("B")
    want = official_longlive_t2v(model, noise, renoise, blocks, switch_at, prompt_b, keep_sink)
    engine = Engine(model)
    s = engine.open(prompt_embeds=backbone_context("A"), width=W, height=H, steps=4, mode="t2v",
                    frames=9 + 12 * (blocks - 1))
    rs = s.group.runner.streams[s.id]
    rs.noise = ReplayNoise([noise[:, f: f + 3] for f in range(0, 3 * blocks, 3)])
    rs.renoise_source = ReplayNoise(renoise)
    rec = Recorder(s.group.runner)
    for _ in range(switch_at):
        engine.step()
    engine.set_prompt_embedding(s, prompt_b, recache=True, keep_sink=keep_sink)
    engine.run_until_idle()
    got = torch.cat([d.latent for d in sorted(rec.finished, key=lambda d: d.row.chunk)], dim=1)
    assert s.stats.recaches == 1
    assert s.stats.recache_frames == (9 if switch_at * 3 > 12 and keep_sink else min(12, 3 * switch_at))
    assert len(rec.calls) == 5 * blocks + 1
    assert (got - want).abs().max().item() <= TOL
    # the re-cache matters: a plain switch (new prompt, old K/V) gives other frames
    plain = official_longlive_t2v(model, noise, renoise, blocks, switch_at, prompt_b, keep_sink, recache=False)
    assert (got[:, 3 * switch_at:] - plain[:, 3 * switch_at:]).abs().max() > 1e-3


def test_recache_plan_per_backbone():
    """What a re-cache re-encodes, as host rows: StreamDiffusionV2 drains its stream batch, then one row per cache
    row at that level's timestep over the ring frames; LongLive one clean row over the non-sink window (the whole
    window written so far before it is full); Self-Forcing its whole 21-frame window."""
    from wanstream.core.schedule import StreamSchedule
    s = StreamSchedule("a", 3, backbone=SDV2)
    s.prepare("p", 2)
    for c in range(6):
        s.push(c, 1)
    drain, stage = s.recache()
    assert len(drain) == 2 and s.in_flight == 0
    assert [(r.cache_row, r.t, r.frame, r.rope) for r in stage.rows] == [(0, 700, 5, 5), (1, 500, 5, 5), (2, 400, 5, 5)]
    assert stage.frames == 3 and all(r.recache and r.context and r.enters and not r.resink for r in stage.rows)
    ll = StreamSchedule("b", 4, mode="t2v", backbone=LONGLIVE)
    for c in range(2):
        ll.push(c, 3)
    _, stage = ll.recache()
    assert (stage.frames, stage.rows[0].frame, stage.rows[0].t) == (6, 0, 0.0)
    for c in range(2, 6):
        ll.push(c, 3)
    _, stage = ll.recache()
    assert (stage.frames, stage.rows[0].frame, stage.rows[0].rope) == (9, 9, 9)
    _, stage = ll.recache(keep_sink=False)
    assert (stage.frames, stage.rows[0].frame, stage.rows[0].resink) == (12, 6, True)
    sf = StreamSchedule("c", 4, mode="t2v", backbone=SELF_FORCING)
    for c in range(9):
        sf.push(c, 3)
    _, stage = sf.recache()
    assert (stage.frames, stage.rows[0].frame) == (21, 6)
    assert StreamSchedule("d", 2, backbone=LONGLIVE).recache() == ([], None)


# ============================================================================================ long runs
def _seeded_t2v(model, frames, cache=None, seed=3):
    engine = Engine(model)
    s = engine.open(prompt_embeds=backbone_context("A"), width=W, height=H, steps=4, mode="t2v", frames=frames,
                    seed=seed, cache=cache)
    rec = Recorder(s.group.runner)
    engine.run_until_idle()
    assert not s.error, s.error
    out = s.take_outputs()
    assert [o.index for o in out] == list(range(frames))
    return torch.cat([d.latent for d in sorted(rec.finished, key=lambda d: d.row.chunk)], dim=1), rec


def test_rope_rebase_keeps_every_relative_position(golden_models):
    """Past the RoPE table a LongLive / Self-Forcing stream turns its cached keys back instead of failing or
    jumping: with the table cut to 30 positions (a rebase every few blocks) the stream equals the uncut one."""
    from dataclasses import replace
    model = golden_models["longlive"]
    frames = 9 + 12 * 15                                       # 16 blocks, 48 latent frames
    want, _ = _seeded_t2v(model, frames)
    short = replace(LONGLIVE.t2v_cache, rope_wrap_at=30, rope_wrap_to=12)
    got, rec = _seeded_t2v(model, frames, cache=short)
    assert (got - want).abs().max().item() <= TOL
    wrapped, _ = _seeded_t2v(model, frames, cache=replace(short, rope_rebase=False))     # a plain wrap jumps
    assert (wrapped - want).abs().max().item() > 1e-3


@pytest.mark.parametrize("name", ["longlive-infinite", pytest.param("longlive", marks=pytest.mark.slow),
                                  pytest.param("self-forcing", marks=pytest.mark.slow)])
def test_a_run_ten_times_longer_than_the_window(backbone_models, name):
    """No stream fails after N minutes: 10× the cache window of latent frames (LongLive 120, Self-Forcing 210),
    the RoPE table cut short so positions pass its end several times (rebase / window slots), a re-cache
    midway; every frame comes out, finite."""
    from dataclasses import replace
    model = backbone_models[name.removesuffix("-infinite")]
    bb = BACKBONES[name]
    cache = replace(bb.t2v_cache, rope_wrap_at=40)
    latents = 10 * cache.capacity
    frames = 1 + 4 * (latents - 1)
    engine = Engine(model)
    s = engine.open(prompt_embeds=backbone_context("A"), width=W, height=H, steps=2, mode="t2v", frames=frames,
                    cache=cache)
    for _ in range(latents // 6):
        engine.step()
    engine.set_prompt_embedding(s, backbone_context("B"), recache=True)
    engine.run_until_idle()
    out = s.take_outputs()
    assert not s.error and [o.index for o in out] == list(range(frames))
    assert s.stats.recaches == 1 and s.stats.chunks == latents // 3
    assert all(np.isfinite(o.image).all() for o in out)


@pytest.mark.parametrize("switch_at", [None, 6])
def test_longlive_infinite_mode_equals_the_official_rules(golden_models, switch_at):
    """LongLive's infinite mode (keys without RoPE, the window rotated by slot order) over our ring equals the
    official chronological window: 8 blocks (the window rolls from block 4), with and without a re-cache; and it
    equals the standard mode until the first roll."""
    from wanstream.core.backbones import LONGLIVE_INFINITE
    model, blocks = golden_models["longlive"], 8
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(1, 3 * blocks, 16, 6, 10, generator=g)
    renoise = [torch.randn(1, 3, 16, 6, 10, generator=g) for _ in range(3 * blocks)]
    at = switch_at if switch_at is not None else blocks + 1
    want = official_longlive_t2v(model, noise, renoise, blocks, at, backbone_context("B"), True,
                                 recache=switch_at is not None, infinite=True)
    standard = official_longlive_t2v(model, noise, renoise, blocks, at, backbone_context("B"), True,
                                     recache=switch_at is not None)
    engine = Engine(model)
    s = engine.open(prompt_embeds=backbone_context("A"), width=W, height=H, steps=4, mode="t2v",
                    frames=9 + 12 * (blocks - 1), cache=LONGLIVE_INFINITE.t2v_cache)
    rs = s.group.runner.streams[s.id]
    rs.noise = ReplayNoise([noise[:, f: f + 3] for f in range(0, 3 * blocks, 3)])
    rs.renoise_source = ReplayNoise(renoise)
    rec = Recorder(s.group.runner)
    if switch_at is not None:
        for _ in range(switch_at):
            engine.step()
        engine.set_prompt_embedding(s, backbone_context("B"), recache=True)
    engine.run_until_idle()
    got = torch.cat([d.latent for d in sorted(rec.finished, key=lambda d: d.row.chunk)], dim=1)
    assert (got - want).abs().max().item() <= TOL
    assert (got[:, :12] - standard[:, :12]).abs().max().item() <= TOL           # the same until the roll
    assert (got[:, 12:] - standard[:, 12:]).abs().max().item() > 1e-3           # then the positions differ


def test_admission_counts_a_backbones_rows_and_frames_per_tick():
    """Admission predicts per-stream FPS from the rows a stream adds to a tick (LongLive 2 steps: 2 levels + the
    context pass = 3 rows) and the frames a tick gives it (12 per LongLive chunk, 4 for StreamDiffusionV2)."""
    from wanstream.core.chunking import ChunkBuffer
    from wanstream.core.config import StreamSettings
    from wanstream.core.planner import Planner
    for bb, rows, frames in ((LONGLIVE, 3, 12), (SDV2, 2, 4)):
        planner = Planner(backbone=bb)
        planner.add("a", StreamSettings(steps=2, cache=bb.cache("v2v")), ChunkBuffer())
        assert planner.streams["a"].schedule.rows_per_tick == rows
        planner.latency.observe(2 * rows, 0.5)                  # two streams' rows: 0.5 s a tick
        ok, why = planner.admit(2, [frames / 0.5 - 1])
        assert ok, why
        ok, why = planner.admit(2, [frames / 0.5 + 1])
        assert not ok and f"{frames / 0.5:.1f} frames/s" in why
