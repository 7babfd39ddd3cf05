"""Multi-rank pipeline on the CPU with gloo (loopback only), driven as the product drives it — through the engine
(``Engine(model, runner_factory=runner_factory(driver))``, :class:`PipelineSession`): the latents that leave the ring
equal the single-process ``LatentStream(lag=W)`` schedule on the same chunks, every frame comes out, block moves /
prompt changes / step changes keep it exact, failures stop every rank with an error naming the culprit, the CLI
path runs."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from wanstream.api.pipeline_session import PipelineSession
from wanstream.core.block_scheduler import BlockScheduler, SchedulerConfig
from wanstream.core.config import CAUSAL_FOLDER, DIT_COMMON, DIT_PRESETS, VAE_PRESETS, WAN_FOLDER, CacheConfig
from wanstream.engine.latent_stream import LatentStream
from wanstream.engine.loop import Engine
from wanstream.engine.noise import SeededNoise
from wanstream.engine.noise_controller import NoiseController
from wanstream.io.video import frames_to_tensor, tensor_to_frames
from wanstream.models.checkpoints import DitPart
from wanstream.models.loader import load_model
from wanstream.models.sampling import FlowMatchSampler
from wanstream.pipeline import PipelineDriver, PipelineError, renoise_seed
from wanstream.pipeline.protocol import Kind, Message, ProtocolError, encode, f2i, i2f, parse_header, parse_table
from wanstream.pipeline.runner import runner_factory

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))     # the scaling model (offline tool)

TOL = 1e-5
TOK = 15                       # 6x10 latent grid → 3x5 tokens
H, W_PIX = 48, 80
SEED = 1
FAST = dict(timeout=20.0, dead_after=3.0, threads=1)


# ------------------------------------------------------------------------------------------ models
def write_model(root: Path, layers: int, seed: int = 0) -> Path:
    """A tiny random model with ``layers`` DiT blocks in the released layout (DiT model.pt + VAE, no T5)."""
    from diffusers import AutoencoderKLWan

    from wanstream.models.checkpoints import diffusers_dit_config, vae_state_dict_original
    from wanstream.models.random_init import random_dit_weights
    wan = root / "wan_models" / WAN_FOLDER["tiny"]
    causal = root / "ckpts" / CAUSAL_FOLDER["tiny"]
    wan.mkdir(parents=True)
    causal.mkdir(parents=True)
    cfg = {**DIT_COMMON, **DIT_PRESETS["tiny"], "num_layers": layers}
    (wan / "config.json").write_text(json.dumps(cfg))
    weights = random_dit_weights(diffusers_dit_config(cfg), seed, torch.float32)
    torch.save({"generator": {f"model.{k}": v for k, v in weights.items()}}, causal / "model.pt")
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(base_dim=VAE_PRESETS["tiny"], z_dim=16)
    torch.save(vae_state_dict_original(vae), wan / "Wan2.1_VAE.pth")
    return root


@pytest.fixture(scope="module")
def model4(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("pp4"), 4)


@pytest.fixture(scope="module")
def model6(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("pp6"), 6)


@pytest.fixture(scope="module")
def bundle4(model4):
    return load_model(model4, device="cpu", text_encoder=False)


@pytest.fixture(scope="module")
def bundle6(model6):
    return load_model(model6, device="cpu", text_encoder=False)


@pytest.fixture(scope="module")
def pipe2(model4):
    """Two gloo ranks (rank 0 = this process); rank 0 (encode) and the last rank (decode) hold the VAE."""
    drv = PipelineDriver.launch(model4, ["cpu", "cpu"], decode="vae", vae=True, **FAST)
    yield drv
    drv.close()
    assert all(p.exitcode == 0 for p in drv.processes)


@pytest.fixture(scope="module")
def pipe3(model6):
    drv = PipelineDriver.launch(model6, ["cpu"] * 3, vae=True, **FAST)     # the engine decodes on rank 0
    yield drv
    drv.close()
    assert all(p.exitcode == 0 for p in drv.processes)


# ------------------------------------------------------------------------------------------ helpers
DECODE = {2: "vae", 3: "none"}     # where pipe2 / pipe3 decode: the last rank / rank 0 (the engine)


def _inputs(n: int, seed: int = 5, frames: int | None = None):
    """Two prompt embeddings and the frames of ``n`` chunks after the first (5 + 4n frames, or ``frames``)."""
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(1, 16, 4096, generator=g)
    ctx2 = torch.randn(1, 16, 4096, generator=g)
    count = 5 + 4 * n if frames is None else frames
    return ctx, ctx2, (torch.rand(count, H, W_PIX, 3, generator=g) * 255).to(torch.uint8).numpy()


def _chunks(frames: np.ndarray) -> list[np.ndarray]:
    """The engine's chunks: 5 frames, then 4 each (the last one padded by repeating its last frame)."""
    chunks = [frames[:5]] + [frames[i:i + 4] for i in range(5, len(frames), 4)]
    last = chunks[-1]
    if len(chunks) > 1 and len(last) < 4:
        chunks[-1] = np.concatenate([last, np.repeat(last[-1:], 4 - len(last), axis=0)])
    return chunks


def reference_latents(bundle, frames: np.ndarray, ctx, lag: int, steps: int, seed: int = SEED, prompt_at=None,
                      ctx2=None, steps_at=None) -> dict[int, torch.Tensor]:
    """Single-process ``LatentStream(lag=W)`` on the chunks the engine makes of ``frames`` (the same VAE encode and
    motion-aware noise controller), with the pipeline's two noise sources; a new prompt / step count before chunk
    ``prompt_at + 1`` / ``steps_at + 1``. Clean latents by chunk id."""
    dit = bundle.dit
    ls = LatentStream(dit, FlowMatchSampler(), dit.embed_prompt(ctx), SeededNoise(seed), tokens_per_frame=TOK,
                      steps=steps, cache=CacheConfig(), lag=lag, renoise=SeededNoise(renoise_seed(seed)))
    enc, ctl, prev, out = bundle.vae.new_state(), NoiseController(0.8), None, {}
    for cid, chunk in enumerate(_chunks(frames)):
        x = frames_to_tensor(chunk)
        z = bundle.vae.encode(enc, x[None])
        if cid == 0:
            out[0] = ls.prepare(z, 0.8)
            ctl.reset()
        else:
            if cid - 1 == prompt_at:
                ls.prompt = dit.embed_prompt(ctx2)
            if cid - 1 == steps_at:
                out.update(dict(ls.reconfigure(steps + 1)))
            s, t = ctl(prev[None], x[None])
            out.update(dict(ls.push(z, s, t, cid)))
        prev = x[-1]
    out.update(dict(ls.drain()))
    return out


def run_reference(bundle, lag: int, steps: int, n: int, prompt_at=None, steps_at=None) -> dict[int, torch.Tensor]:
    ctx, ctx2, frames = _inputs(n)
    return reference_latents(bundle, frames, ctx, lag, steps, prompt_at=prompt_at, ctx2=ctx2, steps_at=steps_at)


def recording(factory, done: list):
    """A runner factory whose runners also record every chunk that leaves them (``Done``, in order)."""
    def make(engine, width, height, cache):
        runner = factory(engine, width, height, cache)
        run, pending = runner.run, runner.pending

        def keep(items):
            done.extend(items)
            return items
        runner.run = lambda call: keep(run(call))
        runner.pending = lambda: keep(pending())
        return runner
    return make


def run_pipeline(drv: PipelineDriver, steps: int, n: int, prompt_at=None, steps_at=None, moves=None):
    """The frames of :func:`run_reference` through an engine whose runner is the ring (as ``serve`` and ``v2v`` drive
    it): one chunk per tick, the live changes and block moves before chunk ``i + 1``. Checks that every frame
    comes out once, in order, and every chunk once, in order; returns the clean latents by chunk id."""
    ctx, ctx2, frames = _inputs(n)
    done: list = []
    engine = Engine(drv.model, runner_factory=recording(runner_factory(drv, DECODE[drv.world]), done))
    stream = engine.open(prompt_embeds=ctx, width=W_PIX, height=H, steps=steps, seed=SEED)
    for cid, chunk in enumerate(_chunks(frames)):
        if cid - 1 == prompt_at:
            engine.set_prompt_embedding(stream, ctx2)
        if cid - 1 == steps_at:
            engine.update(stream, steps=steps + 1)
        for src, dst in (moves or {}).get(cid - 1, []):
            drv.move_block(src, dst)
        engine.feed(stream, chunk)
        engine.step()
    engine.finish(stream)
    engine.run_until_idle(max_ticks=100)
    assert stream.error is None, stream.error
    assert [o.index for o in stream.take_outputs()] == list(range(len(frames))), "every frame out once, in order"
    engine.close(stream)
    engine.release_closed()
    out, order = {}, []
    for d in done:
        assert d.row.stream == stream.id and d.row.chunk not in out, f"chunk {d.row.chunk} came out twice"
        out[d.row.chunk] = d.latent
        order.append(d.row.chunk)
    assert order == sorted(order), "chunks must leave in order"
    return out


def assert_same(got: dict, ref: dict) -> None:
    assert sorted(got) == sorted(ref), f"chunks {sorted(got)} vs reference {sorted(ref)}"
    worst = max((got[c] - ref[c]).abs().max().item() for c in ref)
    assert worst <= TOL, worst


# ------------------------------------------------------------------------------------------ protocol
def test_protocol_round_trip_and_checks():
    msg = Message(Kind.STEP, call=7, meta=[1, -2, f2i(0.25)],
                  payloads=[torch.zeros(2, 3, dtype=torch.bfloat16), torch.arange(4)])
    header, table = encode(msg, seq=3, sender=1)
    h = parse_header(header, src=1, expected_seq=3)
    assert (h.kind, h.call, h.n_meta, h.n_payloads) == (Kind.STEP, 7, 3, 2)
    meta, specs = parse_table(h, table)
    assert meta[:2] == [1, -2] and i2f(meta[2]) == 0.25
    assert specs == [(torch.bfloat16, (2, 3)), (torch.int64, (4,))]
    with pytest.raises(ProtocolError, match="sequence 3, expected 4"):
        parse_header(header, src=1, expected_seq=4)
    with pytest.raises(ProtocolError, match="claims sender"):
        parse_header(header, src=2, expected_seq=3)
    bad = header.clone()
    bad[0] = 1
    with pytest.raises(ProtocolError, match="bad magic"):
        parse_header(bad, src=1, expected_seq=3)


def test_message_metadata_round_trip():
    """OPEN's shared settings and a STEP's rows and timings survive the int table exactly."""
    from wanstream.core.schedule import Row
    from wanstream.pipeline.protocol import DECODE_VAE, PipeConfig, StepMeta
    cfg = PipeConfig(TOK, CacheConfig(capacity=9, sink=2, sink_threshold=0.37), DECODE_VAE)
    assert len(cfg.to_meta()) == PipeConfig.INTS and PipeConfig.from_meta(cfg.to_meta()) == cfg
    rows = [Row(3, None, 0, 1, 4, 2, False, False, 700, 500), Row(5, None, 1, 0, 9, 7, True, False, 500, 0)]
    m = StepMeta(2, rows, (1, 3, 5), copy_row0=True, keep=1, finished=1, decoded=True, timings=[(10, 20, 3)])
    back = StepMeta.from_meta(m.to_meta())
    assert back == m
    with pytest.raises(ProtocolError, match="does not match its counts"):
        StepMeta.from_meta(m.to_meta()[:-1])


def test_stage_loads_only_its_blocks(model6):
    full = load_model(model6, "cpu", torch.float32, text_encoder=False, vae=False, part=DitPart(range(0, 6)))
    part = load_model(model6, "cpu", torch.float32, text_encoder=False, vae=False, part=DitPart(range(2, 4)))
    blocks = part.dit.transformer.blocks
    assert [blocks[i].attn1.to_q.weight.device.type for i in range(6)] == ["meta", "meta", "cpu", "cpu", "meta",
                                                                           "meta"]
    per_block = sum(p.numel() * 4 for p in full.dit.transformer.blocks[0].parameters())
    assert full.resident_bytes() - part.resident_bytes() == 4 * per_block
    assert part.vae is None and part.text_encoder is None


# ------------------------------------------------------------------------------------------ equality
def test_two_ranks_equal_single_process(pipe2, bundle4):
    got = run_pipeline(pipe2, steps=2, n=9)
    assert_same(got, run_reference(bundle4, lag=2, steps=2, n=9))
    assert len(got) == 1 + 9     # every chunk in → one chunk out


@pytest.mark.parametrize("steps", [1, 3])
def test_three_ranks_equal_single_process(pipe3, bundle6, steps):
    assert_same(run_pipeline(pipe3, steps=steps, n=8), run_reference(bundle6, lag=3, steps=steps, n=8))


def test_forced_rebalance_mid_stream_keeps_output(pipe3, bundle6):
    """Blocks move in every direction (towards rank 0 and away from it, involving the last rank) while three
    calls are in flight; nothing is lost or duplicated and the latents equal a run without moves."""
    moves = {2: [(0, 1)], 3: [(1, 0), (2, 1)], 5: [(1, 2)], 6: [(1, 0)], 8: [(0, 1)]}
    before, moved = pipe3.split, len(pipe3.moves)
    with_moves = run_pipeline(pipe3, steps=2, n=10, moves=moves)
    assert pipe3.split == before and len(pipe3.moves) - moved == 6
    without = run_pipeline(pipe3, steps=2, n=10)
    assert_same(with_moves, without)
    assert_same(with_moves, run_reference(bundle6, lag=3, steps=2, n=10))


def test_moves_keep_at_least_one_block_per_rank(pipe3):
    """With a stream open on every rank (its cache rows and prompt K/V move with the blocks)."""
    ctx, _, frames = _inputs(0)
    engine = Engine(pipe3.model, runner_factory=runner_factory(pipe3, DECODE[3]))
    stream = engine.open(prompt_embeds=ctx, width=W_PIX, height=H, seed=SEED)
    engine.feed(stream, frames)
    engine.step()
    assert stream.take_outputs() and stream.error is None
    pipe3.move_block(0, 1)
    with pytest.raises(ValueError, match="at least one"):
        pipe3.move_block(0, 1)
    with pytest.raises(ValueError, match="neighbouring"):
        pipe3.move_block(2, 0)
    pipe3.move_block(1, 0)
    assert pipe3.split == [(0, 2), (2, 4), (4, 6)]
    engine.close(stream)
    engine.release_closed()


def test_prompt_change_mid_stream_reaches_every_stage(pipe3, bundle6):
    got = run_pipeline(pipe3, steps=2, n=8, prompt_at=4)
    ref = run_reference(bundle6, lag=3, steps=2, n=8, prompt_at=4)
    assert_same(got, ref)
    unchanged = run_reference(bundle6, lag=3, steps=2, n=8)
    assert max((ref[c] - unchanged[c]).abs().max().item() for c in ref) > 1e-3   # the change mattered


def test_step_change_mid_stream(pipe2, bundle4):
    assert_same(run_pipeline(pipe2, steps=2, n=8, steps_at=4), run_reference(bundle4, lag=2, steps=2, n=8,
                                                                             steps_at=4))


def _restore_split(drv: PipelineDriver, target) -> None:
    """Move boundary blocks until the split is ``target`` again (module-scoped pipelines are shared)."""
    for _ in range(50):
        if drv.split == target:
            return
        for j in range(len(target) - 1):
            have, want = drv.split[j][1], target[j][1]
            try:
                if have > want:
                    drv.move_block(j, j + 1)
                elif have < want:
                    drv.move_block(j + 1, j)
            except ValueError:
                continue
    assert drv.split == target


def test_continuous_scheduler_on_measured_times_keeps_output(pipe3, bundle6):
    """The scheduler decides from real per-stage timings every 2 chunks; whatever it moves, output is exact."""
    even = pipe3.split
    pipe3.scheduler = BlockScheduler(pipe3.split, SchedulerConfig(every=2, margin=0.0, hysteresis=0.0,
                                                                  min_samples=1))
    try:
        got = run_pipeline(pipe3, steps=2, n=12)
        decisions = pipe3.scheduler.decisions
    finally:
        pipe3.scheduler = None
        _restore_split(pipe3, even)
    assert decisions, "the scheduler never decided"
    assert all(len(d.totals) == 3 and min(d.totals) > 0 for d in decisions)
    assert_same(got, run_reference(bundle6, lag=3, steps=2, n=12))


# ------------------------------------------------------------------------------------------ pixels
def _reference_pixels(bundle, frames: np.ndarray, ctx, lag: int, steps: int, seed: int) -> np.ndarray:
    latents = reference_latents(bundle, frames, ctx, lag, steps, seed)
    dec = bundle.vae.new_state()
    imgs = [tensor_to_frames(bundle.vae.decode(dec, latents[c])[0]) for c in sorted(latents)]
    return np.concatenate(imgs)[: len(frames)]


def test_pixels_n_frames_in_n_frames_out(pipe2, bundle4):
    """Frames → encode (rank 0) → pipeline → decode (last rank) → frames back on rank 0: 23 in, 23 out, in
    order, equal to the single-process schedule decoded the same way."""
    ctx, _, frames = _inputs(0, seed=3, frames=23)
    session = PipelineSession(driver=pipe2, prompt_embeds=ctx, width=W_PIX, height=H, steps=2, seed=7)
    outs = []
    for i in range(0, len(frames), 3):
        outs += session.push(frames[i:i + 3])
    outs += session.flush()
    session.close()
    assert [o.index for o in outs] == list(range(23))
    got = np.stack([o.image for o in outs])
    ref = _reference_pixels(bundle4, frames, ctx, lag=2, steps=2, seed=7)
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1


# ------------------------------------------------------------------------------------------ failures
def _stream_until_failed(drv: PipelineDriver, before: int, after=lambda: None, ticks: int = 1000):
    """An engine stream on the ring: ``before`` chunks, then ``after()``, then chunks until the stream fails
    (bounded). Returns the stream."""
    ctx, _, frames = _inputs(before + ticks)
    engine = Engine(drv.model, runner_factory=runner_factory(drv, "none"))
    stream = engine.open(prompt_embeds=ctx, width=W_PIX, height=H, seed=SEED)
    for k, chunk in enumerate(_chunks(frames)):
        if k == before:
            after()
        engine.feed(stream, chunk)
        engine.step()
        if stream.error is not None:
            return stream
    raise AssertionError(f"the stream did not fail within {ticks} chunks")


def _culprit(drv: PipelineDriver) -> int:
    """The rank rank 0 named when it stopped the pipeline."""
    return int(drv.health.store.get("err/0").decode().split("|", 1)[0])


def test_killed_rank_stops_every_rank_with_an_error_naming_it(model6):
    drv = PipelineDriver.launch(model6, ["cpu"] * 3, vae=True, timeout=10.0, dead_after=2.0, threads=1)
    killed = []

    def kill_rank_1():
        os.kill(drv.processes[0].pid, signal.SIGKILL)
        killed.append(time.monotonic())
    try:
        stream = _stream_until_failed(drv, 3, kill_rank_1)
        assert time.monotonic() - killed[0] < 10.0          # within the dead-rank timeout, not the progress one
        assert "rank 1 stopped responding" in stream.error, stream.error
        assert "rank 1 stopped responding" in drv.error and _culprit(drv) == 1
        for p in drv.processes:
            p.join(10.0)
        assert drv.processes[0].exitcode == -signal.SIGKILL
        assert drv.processes[1].exitcode == 1                 # rank 2 stopped by itself, with an error
        err2 = drv.health.store.get("err/2").decode()
        assert err2.startswith("1|") and "rank 1 stopped responding" in err2
        assert drv.closed
    finally:
        drv._abort(PipelineError("test cleanup", 0))


def test_hung_rank_is_named_after_the_timeout(model4):
    drv = PipelineDriver.launch(model4, ["cpu", "cpu"], vae=True, timeout=3.0, dead_after=2.0, threads=1,
                                fault="hang:1:4")
    try:
        stream = _stream_until_failed(drv, 0, ticks=6)
        for message in (stream.error, drv.error):
            assert re.search(r"rank 1 made no progress .*computing call 4", message), message
        assert _culprit(drv) == 1
        for p in drv.processes:
            p.join(10.0)
            assert not p.is_alive()
    finally:
        drv._abort(PipelineError("test cleanup", 0))


CTRL_C_SCRIPT = """
import sys, numpy as np, torch
from wanstream.api.pipeline_session import PipelineSession
if __name__ == "__main__":
    torch.set_num_threads(1)
    with PipelineSession(sys.argv[1], devices=["cpu"] * 3, prompt_embeds=torch.randn(1, 16, 4096), width=80,
                         height=48, rebalance=False, timeout=20.0, dead_after=3.0, threads=1) as session:
        print("PIDS", *[p.pid for p in session.driver.processes], flush=True)
        frames = np.random.default_rng(0).integers(0, 256, (4, 48, 80, 3), dtype=np.uint8)
        for i in range(10 ** 6):
            session.push(frames)
"""


def test_ctrl_c_on_rank_0_stops_every_rank(model6, tmp_path):
    import subprocess
    script = tmp_path / "stream.py"
    script.write_text(CTRL_C_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(model6)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        pids = []
        for line in proc.stdout:                       # bounded by the process lifetime
            if line.startswith("PIDS"):
                pids = [int(x) for x in line.split()[1:]]
                break
        assert len(pids) == 2
        time.sleep(1.0)                                # streaming now
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "KeyboardInterrupt" in out
    assert out.count("rank 0 was interrupted (Ctrl-C)") == 2          # both workers said why they stopped
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_buffer_pool_reuses_and_bounds():
    import threading

    from wanstream.pipeline.transport import BufferPool
    pool = BufferPool(torch.device("cpu"), depth=2)
    stop = threading.Event()
    a, _ = pool.acquire((2, 3), torch.float32, stop)
    b, _ = pool.acquire((2, 3), torch.float32, stop)
    pool.release(a)
    c, _ = pool.acquire((2, 3), torch.float32, stop)
    assert c is a and pool.allocated == 2 and pool.reused == 1
    stop.set()
    with pytest.raises(PipelineError, match="closed"):
        pool.acquire((2, 3), torch.float32, stop)      # depth reached, nothing released: no third buffer


# ------------------------------------------------------------------------------------------ CLI
def test_cli_v2v_pipeline_two_cpu_ranks(model4, tmp_path, monkeypatch, capsys):
    """``wanstream v2v --pipeline 2 --device cpu``: the same flags as single-device, every frame written.
    (The text encoder is replaced by a fixed embedding: the test model has no T5 weights.)"""
    import argparse

    from wanstream.cli.pipeline import add_pipeline_args, pipeline_requested, run_v2v_pipeline
    from wanstream.io.video import probe_video, write_motion_clip
    fake = types.ModuleType("wanstream.models.text_encoder")

    class _Encoder:
        def encode(self, prompts):
            return torch.ones(1, 8, 4096) * 0.01 * len(prompts[0])
    fake.load_text_encoder = lambda *a, **k: _Encoder()
    monkeypatch.setitem(sys.modules, "wanstream.models.text_encoder", fake)
    clip = write_motion_clip(tmp_path / "in.mp4", 11, W_PIX, H, 16.0)
    p = argparse.ArgumentParser()
    p.add_argument("input", type=Path, nargs="+")
    p.add_argument("-o", "--output", type=Path)
    p.add_argument("--model", type=Path)
    p.add_argument("--device", default=None)
    p.add_argument("--prompt")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", default=None)
    p.add_argument("--no-batch", action="store_true")
    p.add_argument("--noise-scale", type=float, default=0.8)
    p.add_argument("--no-noise-controller", action="store_true")
    p.add_argument("--taehv", action="store_true")
    add_pipeline_args(p)
    args = p.parse_args([str(clip), "-o", str(tmp_path / "out.mp4"), "--model", str(model4), "--prompt", "ink",
                         "--pipeline", "2", "--device", "cpu", "--split", "3,1"])
    assert pipeline_requested(args)
    threads = torch.get_num_threads()
    try:
        assert run_v2v_pipeline(args) == 0
    finally:
        torch.set_num_threads(threads)
    assert probe_video(tmp_path / "out.mp4").frames == 11
    out = capsys.readouterr().out
    assert "frames 11" in out and "rank 0: [0, 3) | rank 1: [3, 4)" in out


# ------------------------------------------------------------------------------------------ scaling model
def test_scaling_model_predictions_and_table():
    from scaling import PAPER_FPS, Link, markdown, paper_profiles, predict
    profiles = paper_profiles()
    link = Link(overhead_ms=4)
    for p in profiles:
        for steps in range(1, 5):
            one = predict(p, 1, steps, link)
            assert one.fps == pytest.approx(PAPER_FPS[p.model][p.resolution][1][steps - 1], rel=1e-3)  # the input
            fps = [predict(p, w, steps, link).fps for w in (1, 2, 3, 4)]
            assert all(b >= a * 0.999 for a, b in zip(fps, fps[1:]))
            preds = [predict(p, w, steps, link) for w in (1, 2, 3, 4)]
            assert all(sum(pr.split) == p.layers and min(pr.split) >= 1 for pr in preds)
            assert max(preds[-1].rank_mem_gb) < max(preds[0].rank_mem_gb)    # no rank holds the whole model
    text = markdown(profiles, link, command="python scripts/scaling_model.py --overhead-ms 4")
    assert "**predicted**" in text and "64.52" in text and "58.28" in text and "--overhead-ms 4" in text


def test_scaling_measure_profile_and_pipeline_on_cpu(model4):
    from scaling import Link, measure_pipeline, measure_profile, predict
    prof = measure_profile(model4, "cpu", W_PIX, H, repeats=1, name="tiny")
    assert prof.layers == 4 and prof.encode_ms > 0 and prof.decode_ms > 0 and all(prof.dit(n) > 0 for n in (1, 4))
    assert predict(prof, 2, 2, Link()).fps > 0
    threads = torch.get_num_threads()
    try:
        m = measure_pipeline(model4, ["cpu", "cpu"], 2, W_PIX, H, frames=13, threads=1)
    finally:
        torch.set_num_threads(threads)
    assert m.frames == 13 and m.fps > 0 and len(m.rank_mem_gb) == 2 and min(m.rank_mem_gb) > 0
