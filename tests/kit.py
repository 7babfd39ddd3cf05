"""The conformance kit (golden traces recorded from the official implementation)."""

from __future__ import annotations

from pathlib import Path

import torch

HERE = Path(__file__).parent
SHARED_KIT = HERE.parent.parent / "shared" / "conformance"
VENDORED_KIT = HERE / "data" / "conformance"


def kit_dir() -> Path:
    """The conformance kit: ../shared/conformance when present, else the vendored copy."""
    return SHARED_KIT if (SHARED_KIT / "README.md").is_file() else VENDORED_KIT


def load_kit(name: str):
    return torch.load(kit_dir() / name, weights_only=False)


def stream_batch_golden_errors(make_stream, device="cpu", dtype=torch.float32) -> dict[str, float]:
    """Drive a stream through the free-running stream-batch golden ``c_dit_stream_n2_sinkoff.pt``: only the clean
    latents, s, t and the recorded noise go in. ``make_stream(noise)`` builds the ``LatentStream`` (2 steps, sink
    refresh off) with the given noise source. Returns the largest abs difference per compared quantity (prepare x0,
    slot-0 latent, finished latent, block-0 K / V cache); structural mismatches (RoPE, chunk ids, noise count) raise."""
    from wanstream.engine.noise import ReplayNoise
    c = load_kit("c_dit_stream_n2_sinkoff.pt")
    noise = ReplayNoise([e["value"].to(device) for e in c["noise_log"]])
    ls = make_stream(noise)
    err: dict[str, float] = {}

    def diff(name, got, want):
        err[name] = max(err.get(name, 0.0), (got.float().cpu() - want).abs().max().item())

    diff("prepare_x0", ls.prepare(c["prepare"]["z"].to(device, dtype), c["prepare"]["s"]), c["prepare"]["x0"])
    for call in c["calls"]:
        j = call["j"]
        out = ls.push(call["z"].to(device, dtype), call["s"], torch.tensor(call["current_step"], device=device), j)
        after = call["hidden_after"]
        diff("slot0_latent", ls.slots[0].latent, after[0:1])
        assert ls.slots[0].rope * 15 == call["starts"][0]
        if j == 0:
            assert out == []
        else:
            (cid, latent), = out
            assert cid == j - 1
            diff("finished_latent", latent, after[1:2])
        if "k_block0" in call["cache"]:
            diff("k_block0", ls.cache.k[0], call["cache"]["k_block0"])
            diff("v_block0", ls.cache.v[0], call["cache"]["v_block0"])
    assert noise.used == len(c["noise_log"])
    return err


def reference_refresh_sinks(cache_k, cache_v, k, v, eligible, step) -> None:
    """The adaptive sink refresh as it was before the sink means were kept: the whole sink region of the rows
    ``cache_k/v`` is read in fp32 to compare, then rewritten with ``where``. The reference of the refresh decisions
    (``tests/test_fastpath.py``) and of the cost measurement (``scripts/dit_fastpath_compare.py``)."""
    import torch.nn.functional as F
    n_tok = k.shape[1]
    n_sink = step.sink_tokens // n_tok
    sink_k = cache_k[:, : step.sink_tokens].unflatten(1, (n_sink, n_tok))
    sink_v = cache_v[:, : step.sink_tokens].unflatten(1, (n_sink, n_tok))
    sim_k = F.cosine_similarity(k.float().mean(1).flatten(1)[:, None], sink_k.float().mean(2).flatten(2), dim=-1)
    sim_v = F.cosine_similarity(v.float().mean(1).flatten(1)[:, None], sink_v.float().mean(2).flatten(2), dim=-1)
    low, idx = ((sim_k + sim_v) / 2).min(dim=1)
    replace = (low < step.sink_threshold) & eligible
    pick = (torch.arange(n_sink, device=k.device)[None] == idx[:, None]) & replace[:, None]
    pick = pick[:, :, None, None, None]
    sink_k.copy_(torch.where(pick, k[:, None], sink_k))
    sink_v.copy_(torch.where(pick, v[:, None], sink_v))


# ------------------------------------------------------------------------------------- other backbones
BACKBONE_GOLDENS = {"longlive": "longlive_t2v_lora_15f.pt", "self-forcing": "selfforcing_t2v_9f.pt"}


def backbone_kit_dir() -> Path:
    return kit_dir() / "backbones"


def load_backbone_kit(name: str):
    """A file of the backbone kit: the shared kit's when it has it, else the vendored copy (the vendored kit also
    holds pieces the shared one does not, e.g. the generator heads the 12.5 MB checkpoints are rebuilt from)."""
    path = backbone_kit_dir() / name
    if not path.is_file():
        path = VENDORED_KIT / "backbones" / name
    return torch.load(path, weights_only=False)


def backbone_context(label: str) -> torch.Tensor:
    """The kit's stand-ins for UMT5 output: A (seed 777, 7 rows) and B (seed 778, 11 rows)."""
    seed, rows = {"A": (777, 7), "B": (778, 11)}[label]
    return torch.randn(1, rows, 4096, generator=torch.Generator().manual_seed(seed))


def backbone_model_root(backbone: str, root: Path) -> Path:
    """A model root in ``backbone``'s released layout made of the kit's tiny weights: the Wan folder (config and
    VAE; the DiT comes from the generator) and the generator (+ LoRA) file — copied from the shared kit, or rebuilt
    from ``model.pt`` and the vendored pieces."""
    import json
    import shutil

    from wanstream.core.backbones import backbone as get_backbone
    ck = get_backbone(backbone).checkpoint
    wan = root / "wan_models" / "Wan2.1-T2V-tiny"
    wan.mkdir(parents=True, exist_ok=True)
    (wan / "config.json").write_text(json.dumps(json.loads((kit_dir() / "tiny_config.json").read_text())["dit"]))
    shutil.copyfile(kit_dir() / "Wan2.1_VAE_tiny.pth", wan / "Wan2.1_VAE.pth")
    gen = root / ck.generator
    gen.parent.mkdir(parents=True, exist_ok=True)
    shared = SHARED_KIT / "backbones"
    released = {"longlive": "longlive_base_tiny.pt", "self-forcing": "self_forcing_dmd_tiny.pt"}[backbone]
    if (shared / released).is_file():
        shutil.copyfile(shared / released, gen)
    else:
        ema = load_kit("model.pt")["generator"]
        if backbone == "self-forcing":
            head = load_backbone_kit("selfforcing_generator_head.pt")
            torch.save({"generator": {**ema, **head}, "generator_ema": ema}, gen)
        else:
            torch.save({"generator": ema}, gen)
    if ck.lora is not None:
        shutil.copyfile(backbone_kit_dir() / "longlive_lora_tiny.pt", root / ck.lora)
    return root


class Recorder:
    """Every DiT call of a runner: its input, timesteps, attended key count, flow; the chunks that came back clean;
    ``force`` replaces the inputs with a trace's (teacher-forced)."""

    def __init__(self, runner, force=None):
        self.calls, self.finished, self.force = [], [], force
        self._dit, self._run = runner._dit, runner.run
        runner._dit, runner.run = self.dit, self.run
        self.capacity = runner.policy.capacity
        self.tpf = runner.tokens_per_frame

    def dit(self, x, ts, step):
        if self.force is not None:
            x = self.force[len(self.calls)]["x_t"].to(x)
        flow = self._dit(x, ts, step)
        keys = int(step.attn_mask[0].sum()) if step.attn_mask is not None else self.capacity * self.tpf
        self.calls.append(dict(x=x.clone(), t=ts.clone(), flow=flow.clone(), keys=keys))
        return flow

    def run(self, call):
        done = self._run(call)
        self.finished += done
        return done


def run_golden(model, g, force=False):
    """Text-to-video of a backbone trace's frames through the engine, its noise replayed: the first draws of each
    block are the trace's initial noise of that block, the re-noise draws the trace's own. Returns the engine
    stream, the :class:`Recorder` and the runner's stream."""
    from wanstream.engine.loop import Engine
    from wanstream.engine.noise import ReplayNoise
    engine = Engine(model)
    frames = g["video"].shape[1]
    h, w = g["pixel_hw"]
    s = engine.open(prompt_embeds=backbone_context("A"), width=w, height=h, steps=4, mode="t2v", frames=frames)
    dev = model.device
    noise = g["noise_log"][0]["value"].to(dev, model.dtype)
    rs = s.group.runner.streams[s.id]
    rs.noise = ReplayNoise([noise[:, f: f + 3] for f in range(0, noise.shape[1], 3)])
    rs.renoise_source = ReplayNoise([e["value"].to(dev, model.dtype) for e in g["noise_log"][1:]])
    rec = Recorder(s.group.runner, g["calls"] if force else None)
    engine.run_until_idle()
    return s, rec, rs


def backbone_golden_errors(name: str, root: Path, device="cpu", dtype=torch.float32) -> dict[str, float]:
    """A backbone's public golden free-running through the engine on ``device`` / ``dtype``: the largest abs
    difference of the calls' flow and x0, the final latents and the decoded video (``root``: a scratch folder)."""
    from wanstream.models.loader import load_model
    g = load_backbone_kit(BACKBONE_GOLDENS[name])
    model = load_model(backbone_model_root(name, root), device=device, dtype=dtype, text_encoder=False)
    _, rec, _ = run_golden(model, g)
    err = {"flow": 0.0, "x0": 0.0}
    for got, want in zip(rec.calls, g["calls"]):
        x0 = model.sampler.to_x0(got["x"], got["flow"], got["t"])
        err["flow"] = max(err["flow"], (got["flow"].float().cpu() - want["flow_pred"]).abs().max().item())
        err["x0"] = max(err["x0"], (x0.float().cpu() - want["x0"]).abs().max().item())
    latents = torch.cat([d.latent for d in sorted(rec.finished, key=lambda d: d.row.chunk)], dim=1)
    err["latents"] = (latents.float().cpu() - g["latents"]).abs().max().item()
    state = model.vae.new_state()
    video = torch.cat([model.vae.decode(state, latents[:, f: f + 3]) for f in range(0, latents.shape[1], 3)], 1)
    err["video"] = ((video.float().cpu().clamp(-1, 1) * 0.5 + 0.5) - g["video"]).abs().max().item()
    if len(rec.calls) != len(g["calls"]):
        err["calls"] = float("inf")
    return err


def tap_latents(engine, sink: dict) -> None:
    """Record every finished chunk's latent, by stream id and chunk id, in ``sink`` (wraps the engine's decode,
    which receives them)."""
    original = engine.codec.decode

    def tap(finished):
        for sid, items in finished.items():
            for _, d in items:
                sink.setdefault(sid, {})[d.row.chunk] = d.latent.clone()
        return original(finished)
    engine.codec.decode = tap


def resume_elsewhere(engine, parked, other):
    """Move a parked stream of ``engine`` to the engine ``other`` as a blob (its state and its input queue, as a
    migration does) and resume it there; returns the resumed stream."""
    from wanstream.core.chunking import ChunkBuffer
    from wanstream.engine.blob import dumps, loads
    head, images = parked.buffer.snapshot()
    data = dumps(parked, engine.clock(), {"buffer": head}, images)
    parked, extra, images = loads(data, len(data), other.clock())
    buffer = ChunkBuffer()
    buffer.restore(extra["buffer"], images, extra["_shift"])
    return other.resume(parked, buffer)
