"""``serve --pipeline 2 --device cpu``: the live server's engine on a pipeline of two CPU ranks.

* Two WebSocket sessions stream at once (their chunks batched by the engine's scheduler, the calls run by the
  pipeline), one changes its prompt, the other its steps mid-stream; each one's raw output frames equal the same input run alone on one device with the pipeline's
  schedule (``lag`` = 2 batches in flight, the last rank's re-noising source) — up to one level of a pixel, the
  rounding of batched matmuls (the ≤ 1 level rule of test_server_isolation.py). Shutdown stops the ranks cleanly.
* A killed rank ends the streams (also one waiting for input) with an error naming it, ``/api/health`` says "degraded", new streams are refused,
  and no rank process is left behind.
* What the pipeline does not run (--lora, --taehv) is refused at start-up, before anything loads.

Frames travel losslessly (``format=raw``); the client sends one chunk at a time and waits until the server handed
it to the model, so the chunk boundaries match the reference run. A generous latency target keeps the deadline
scheduler from dropping or re-scheduling frames on a slow machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request

import numpy as np
import pytest

pytest.importorskip("websockets", reason="the WebSocket transport needs the websockets package")

from server_helpers import (  # noqa: E402
    H,
    LiveServer,
    W,
    WSClient,
    clip_chunks,
    run_threads,
    server_settings,
    stream_in_lockstep,
    stream_until,
    wait_until,
)

from wanstream.api.session import StreamSession  # noqa: E402
from wanstream.engine.loop import Engine  # noqa: E402
from wanstream.engine.runner import Runner  # noqa: E402
from wanstream.models.kv_cache import CachePolicy, KVPool  # noqa: E402
from wanstream.pipeline import PipelineDriver  # noqa: E402
from wanstream.pipeline.runner import runner_factory  # noqa: E402

RANKS = 2
N_CHUNKS = 6
FAST = dict(timeout=60.0, dead_after=3.0, threads=1)


def launch(model_dir) -> PipelineDriver:
    return PipelineDriver.launch(model_dir, ["cpu"] * RANKS, decode="vae", vae=True, text_encoder=True, **FAST)


def pipeline_settings(tmp_path, **kw):
    return server_settings(tmp_path, output_queue_frames=64, target_latency_s=600.0, **kw)


def chunks_of(clip):
    return clip_chunks(clip, N_CHUNKS)


def lagged_runners(lag: int):
    """The single-device runner running the pipeline's schedule (``lag`` stream batches in flight)."""
    def factory(engine, width, height, cache):
        m, dit = engine.model, engine.model.dit
        tpf = m.tokens_per_frame(height, width)
        pool = KVPool(range(dit.num_layers), cache.capacity, tpf, dit.heads, dit.head_dim, dit.dtype, m.device,
                      text_len=dit.text_len)
        runner = Runner(dit, m.sampler, pool, CachePolicy(cache), tpf)
        runner.lag = lag
        return runner
    return factory


def reference(model, clip, prompt, seed, change_at, change):
    """One device, alone, with the pipeline's schedule (its own noise sources are the pipeline's), the live change
    before chunk ``change_at``:
    outputs (index → image) and which indices are out after each chunk."""
    s = StreamSession(model, prompt=prompt, width=W, height=H, steps=2, noise_scale=0.8, seed=seed,
                      engine=Engine(model, runner_factory=lagged_runners(RANKS)))
    images, after = {}, []
    for k, (start, frames) in enumerate(chunks_of(clip)):
        if k == change_at:
            s.update(**change)
        out = s.push(frames, timestamps=[float(start + i) for i in range(len(frames))])
        for o in out:
            images[o.index] = o.image
        after.append(set(images))
    return images, after


def calls_by_streams(drv: PipelineDriver) -> list[set]:
    """Record the streams of every call the pipeline runs."""
    seen, execute = [], drv.execute

    def spy(call):
        seen.append({r.stream for r in call.rows})
        return execute(call)
    drv.execute = spy
    return seen


def check_engine_batches_streams_on_the_pipeline(drv: PipelineDriver, clip, clip_b) -> None:
    """Two engine streams with a chunk each: their rows share the pipeline's calls. Then stream a takes b's seed and
    both are reset: from there both are fresh streams of the same seed and prompt, so their frames agree (RESET
    clears each stream's rows, re-noise source and decoder on every rank). Closing them frees the ranks' rows (the
    next stream starts a fresh state)."""
    engine = Engine(drv.model, runner_factory=runner_factory(drv))
    emb = drv.model.prompt_embedding("a watercolor painting")
    a, b = (engine.open(prompt_embeds=emb, width=W, height=H, seed=s) for s in (3, 4))
    seen = calls_by_streams(drv)
    for frames in ((clip[:5], clip_b[:5]), (clip[5:9], clip_b[5:9])):
        engine.feed(a, frames[0])
        engine.feed(b, frames[1])
        engine.step()
    assert {a.id, b.id} in seen, seen
    assert a.take_outputs() and b.take_outputs()
    engine.update(a, seed=4)
    engine.reset(a)
    engine.reset(b)
    engine.feed(a, clip[10:15])
    engine.feed(b, clip[10:15])
    engine.step()
    out_a, out_b = a.take_outputs(), b.take_outputs()
    assert len(out_a) == len(out_b) == 5 and a.error is None and b.error is None
    for x, y in zip(out_a, out_b):
        assert np.abs(x.image.astype(int) - y.image.astype(int)).max() <= 1
    engine.close(a)
    engine.close(b)
    engine.release_closed()
    del drv.execute


def test_pipeline_server_streams_equal_single_device_and_stops_its_ranks(tiny_model_dir, tiny_model, tmp_path,
                                                                        clip, clip_b):
    emb = tiny_model.prompt_embedding("a neon city at night")
    cases = {"a": (clip, "a watercolor painting", 3, 2), "b": (clip_b, "a pencil sketch", 4, 3)}
    changes = {"a": (dict(prompt_embeds=emb), dict(prompt="a neon city at night")),   # PROMPT of one stream
               "b": (dict(steps=3), dict(steps=3))}                                  # drain + RECONFIG
    refs = {k: reference(tiny_model, *c, changes[k][0]) for k, c in cases.items()}
    assert not np.array_equal(refs["a"][0][0], refs["b"][0][0])
    drv = launch(tiny_model_dir)
    check_engine_batches_streams_on_the_pipeline(drv, clip, clip_b)
    results = {k: {} for k in cases}
    with LiveServer(drv.model, pipeline_settings(tmp_path), pipeline=drv) as srv:
        status, health = srv.http("GET", "/api/health")
        assert status == 200 and health["status"] == "ok", health
        assert health["pipeline"]["ranks"] == RANKS
        # the outputs the reference had two chunks before the end (the pipeline's last calls are still in flight)
        threads = [threading.Thread(target=stream_in_lockstep,
                                    args=(srv.ws_url, chunks_of(c[0]), *c[1:], changes[k][1], results[k]),
                                    kwargs={"expect_end": refs[k][1][N_CHUNKS - 3]})
                   for k, c in cases.items()]
        run_threads(threads)
        wait_until(lambda: srv.manager.count == 0, 30, "sessions closed")
    assert drv.closed and drv.error is None
    assert [p.exitcode for p in drv.processes] == [0] * (RANKS - 1), "the ranks did not stop cleanly"
    for key in cases:
        assert "exc" not in results[key], results[key].get("exc")
        images, _ = refs[key]
        got = dict(results[key]["frames"])
        assert got and set(got) <= set(images), f"session {key}: unexpected output indices"
        for index, image in got.items():
            diff = np.abs(image.astype(int) - images[index].astype(int)).max()
            assert diff <= 1, f"session {key}: frame {index} differs from the single-device run by {diff} levels"
        assert results[key]["errors"] == []


def test_killed_rank_ends_the_streams_and_health_says_degraded(tiny_model_dir, tmp_path, clip):
    drv = launch(tiny_model_dir)
    try:
        with LiveServer(drv.model, pipeline_settings(tmp_path), pipeline=drv) as srv:
            idle = WSClient(srv.ws_url, "raw")              # connected, sends nothing
            idle.ready()
            c = WSClient(srv.ws_url, "raw", keep_frames=False)
            c.ready()
            stream_until(c, clip, 3)
            drv.processes[0].kill()                      # rank 1
            stop = threading.Event()

            def keep_sending():
                for i in range(2000):
                    if stop.is_set() or c.closed:
                        return
                    try:
                        c.send_frame(clip[i % len(clip)], 1000 + i)
                    except Exception:  # noqa: BLE001 - the server closed the stream
                        return
                    stop.wait(1 / 15)
            sender = threading.Thread(target=keep_sending, daemon=True)
            sender.start()
            err = c.wait_error("model_error", 60)
            stop.set()
            sender.join(10)
            assert "rank 1" in err["message"], err
            assert "rank 1" in idle.wait_error("model_error", 30)["message"]
            status, health = srv.http("GET", "/api/health")
            # liveness fails (503): a probe restarts the server; the body says why
            assert status == 503 and health["status"] == "degraded" and "rank 1" in health["error"], health
            late = WSClient(srv.ws_url, "raw")
            refused = late.wait_error("server_full", 30)
            assert "pipeline failed" in refused["message"], refused
            late.close()
            idle.close()
            c.close()
            wait_until(lambda: srv.manager.count == 0, 30, "sessions closed")
            assert srv.manager.worker.alive, "the model worker died with the pipeline"
    finally:
        if not drv.closed:
            drv._abort(RuntimeError("test cleanup"))
    assert drv.closed
    assert all(not p.is_alive() for p in drv.processes), "a rank process was left behind"


@pytest.mark.parametrize("flag", [["--lora", "style.safetensors"], ["--taehv"]])
def test_serve_refuses_what_the_pipeline_does_not_run(tmp_path, capsys, flag):
    from wanstream.cli.serve import main
    code = main(["--model", str(tmp_path / "missing"), "--pipeline", "2", "--device", "cpu", *flag])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{flag[0]} cannot be combined with --pipeline / --gpus" in err, err


def _rank_processes(pid: int) -> set[int]:
    """The spawned rank processes among ``pid``'s children (not multiprocessing's resource tracker)."""
    out = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in map(int, f.read().split()):
                with open(f"/proc/{child}/cmdline", "rb") as c:
                    if b"spawn_main" in c.read() and _running(child):
                        out.add(child)
    return out


def _running(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads child processes from /proc (Linux)")
def test_cli_serve_pipeline_starts_reports_and_stops_its_ranks_on_sigterm(tiny_model_dir, tmp_path):
    """``python -m wanstream.server --pipeline 2 --device cpu``: health names the ranks; SIGTERM ends the server
    and its rank process (no process left behind)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "wanstream.server", "--model", str(tiny_model_dir), "--port",
                             str(port), "--resolution", f"{W}x{H}", "--pipeline", "2", "--device", "cpu",
                             "--no-rebalance", "--record-dir", str(tmp_path / "rec")],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        def health():
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}: {open(log.name).read()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5) as r:
                    return json.loads(r.read())
            except OSError:
                return None
        got = wait_until(health, 180, "the server's health", interval=0.3)
        assert got["status"] == "ok" and got["pipeline"]["ranks"] == 2, got
        ranks = _rank_processes(proc.pid)
        assert len(ranks) == 1, f"expected one rank process, found {ranks}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) in (0, -signal.SIGTERM), open(log.name).read()   # (uvicorn re-raises the signal)
        assert "Application shutdown complete" in open(log.name).read()
        assert not any(map(_running, ranks)), "a rank process was left behind"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
