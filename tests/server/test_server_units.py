"""Server building blocks without a network: parameter schema, blending, pacing, frame codecs, SDP helpers,
input queue policy, admission control, memory release."""

from __future__ import annotations

import gc
import io
import weakref

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from server_helpers import H, W, server_settings, wait_until

from wanstream.api.params import ParamsUpdate, SessionParams, blend_embeddings
from wanstream.server.frames import FrameError, decode_frame, encode_jpeg, fit_frame, pack_raw, unpack_raw
from wanstream.server.pacing import Pacer
from wanstream.server.sessions import ServerFull, SessionManager


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


# ---------------------------------------------------------------------------------------------- params
@pytest.mark.parametrize("body", [
    {"steps": 0}, {"steps": 5}, {"steps": "2"}, {"steps": 2.5}, {"noise_scale": 0}, {"noise_scale": 1.5},
    {"noise_scale": "0.5"}, {"noise_controller": 1}, {"seed": -1}, {"seed": 2**32}, {"prompt": "x" * 2001},
    {"prompt": 3}, {"transition_chunks": -1}, {"transition_chunks": 65}, {"foo": 1}, {"prompts": []},
    {"prompts": [{"text": "a", "weight": -1}]}, {"prompts": [{"text": "a", "weight": 0}]},
    {"prompts": [{"text": "a", "weight": 1, "extra": 2}]}, {"prompt": "a", "prompts": [{"text": "b"}]},
    {"recording": "yes"}, {"reset": "true"}, {"prompts": [{"text": "a"}] * 9},
])
def test_params_rejects_bad_values(body):
    with pytest.raises(ValidationError):
        ParamsUpdate.model_validate(body)


def test_params_accepts_edges_and_merges():
    u = ParamsUpdate.model_validate({"steps": 4, "noise_scale": 1, "seed": 2**32 - 1, "prompt": "x" * 2000,
                                     "noise_controller": False, "transition_chunks": 64})
    state = SessionParams(prompt="old")
    new, changed = state.merged(u)
    assert new.steps == 4 and new.noise_scale == 1.0 and new.prompt == "x" * 2000 and new.prompts is None
    assert changed == {"steps", "noise_scale", "seed", "prompt", "noise_controller", "transition_chunks"}
    blend = ParamsUpdate.model_validate({"prompts": [{"text": "a", "weight": 1}, {"text": "b", "weight": 3}]})
    new2, changed2 = new.merged(blend)
    assert changed2 == {"prompts"} and [p.weight for p in new2.prompts] == [1.0, 3.0]
    new3, changed3 = new2.merged(ParamsUpdate(prompt="c"))
    assert new3.prompts is None and changed3 == {"prompt", "prompts"}
    same, none = new3.merged(ParamsUpdate(steps=4))
    assert none == set() and same == new3


def test_blend_is_weighted_linear_mix():
    a, b = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    mix = blend_embeddings([a, b], [1.0, 3.0])
    torch.testing.assert_close(mix, 0.25 * a + 0.75 * b)
    assert blend_embeddings([a], [2.0]) is a
    with pytest.raises(ValueError):
        blend_embeddings([a, b], [0.0, 0.0])


# ---------------------------------------------------------------------------------------------- pacing
def test_pacer_spreads_a_chunk_and_follows_the_production_rate():
    p = Pacer(max_frames=8, initial_interval_s=0.05)
    p.push([0, 1, 2, 3], now=0.0)
    released, t = [], 0.0
    for _ in range(200):                       # bounded virtual-time loop
        r = p.pop(t)
        if r.frame is not None:
            released.append((t, r.frame))
        elif r.wait_s is None:
            break
        t = round(t + 0.01, 6)
    assert [f for _, f in released] == [0, 1, 2, 3]
    gaps = np.diff([t for t, _ in released])
    assert (gaps > 0).all()                    # one by one, not a burst
    p.push([4, 5, 6, 7], now=0.4)              # 4 frames every 0.4 s → ~0.1 s per frame
    assert 0.05 < p.interval_s < 0.1


def test_pacer_overflow_drops_oldest_and_markers_keep_order():
    p = Pacer(max_frames=4)
    p.push([0, 1, 2], now=0.0)
    p.push_drop(5)
    p.push([3, 4, 5], now=0.0)                 # 6 frames > 4: frames 0 and 1 dropped
    r = p.pop(0.0)
    assert r.frame == 2 and r.dropped == 2
    r = p.pop(10.0)
    assert r.frame == 3 and r.dropped == 5     # the marker counts before frame 3
    assert p.clear() == 2


# ---------------------------------------------------------------------------------------------- frames
def _jpeg(w, h, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_decode_resizes_and_crops_any_size():
    for w, h in [(64, 64), (320, 240), (17, 90), (1, 1)]:
        frame, _ = decode_frame(_jpeg(w, h), W, H, 4096 * 4096)
        assert frame.shape == (H, W, 3) and frame.dtype == np.uint8
        assert abs(int(frame[H // 2, W // 2, 0]) - 200) < 12
    wide = np.zeros((10, 40, 3), np.uint8)
    wide[:, 15:25] = 255                       # centre stripe survives the centre crop
    assert fit_frame(wide, 16, 16)[8, 8, 0] > 200


def test_a_session_frames_other_aspects_by_its_fit():
    """The session's ``fit`` frames uploads like files: crop fills, pad adds black bars, stretch keeps everything."""
    wide = np.full((16, 32, 3), 255, np.uint8)
    wide[:, :4] = 0                            # a dark left edge: cut by crop, kept by pad and stretch
    msg = pack_raw(wide, 7)
    crop, index = decode_frame(msg, 16, 16, 1 << 20, "crop")
    pad, _ = decode_frame(msg, 16, 16, 1 << 20, "pad")
    stretch, _ = decode_frame(msg, 16, 16, 1 << 20, "stretch")
    assert index == 7 and crop.shape == pad.shape == stretch.shape == (16, 16, 3)
    assert crop.min() > 200                                       # the edge is cropped away
    assert pad[0].max() < 30 and pad[-1].max() < 30 and pad[8, 8].min() > 200   # letterbox bars
    assert stretch[8, 0].max() < 60 and stretch[0, 8].min() > 200                # edge squeezed, no bars
    p, changed = SessionParams(prompt="x").merged(ParamsUpdate(fit="pad"))
    assert p.fit == "pad" and changed == {"fit"}
    with pytest.raises(ValidationError, match="fit"):
        ParamsUpdate(fit="zoom")


@pytest.mark.parametrize("data,code", [
    (b"hello", "not_jpeg"), (b"", "not_jpeg"), (b"\x89PNG\r\n\x1a\n" + b"0" * 50, "not_jpeg"),
    (b"\xff\xd8\xff" + b"\x00" * 64, "bad_jpeg"), (b"WSRF\x01", "bad_raw"),
    (pack_raw(np.zeros((8, 8, 3), np.uint8))[:-1], "bad_raw"),
])
def test_decode_refuses_garbage(data, code):
    with pytest.raises(FrameError) as info:
        decode_frame(data, W, H, 4096 * 4096)
    assert info.value.code == code


def test_decode_caps_pixels_and_truncated_jpeg():
    with pytest.raises(FrameError) as info:
        decode_frame(_jpeg(300, 300), W, H, max_pixels=100 * 100)
    assert info.value.code == "frame_too_large"
    data = encode_jpeg(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    with pytest.raises(FrameError):
        decode_frame(data[: len(data) // 2], W, H, 4096 * 4096)


def test_raw_roundtrip_is_lossless():
    img = np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8)
    back, idx = unpack_raw(pack_raw(img, 77))
    assert idx == 77 and np.array_equal(back, img)
    frame, _ = decode_frame(pack_raw(img, 3), W, H, 1 << 20)
    assert np.array_equal(frame, img)


# ---------------------------------------------------------------------------------------------- SDP helpers
OFFER = "\r\n".join([
    "v=0", "o=- 1 2 IN IP4 127.0.0.1", "s=-", "t=0 0", "m=video 9 UDP/TLS/RTP/SAVPF 96 102",
    "a=rtpmap:96 VP8/90000", "a=rtpmap:102 H264/90000",
    "a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
    "a=candidate:1 1 udp 2122260223 192.0.2.2 50000 typ host",
    "a=candidate:2 1 udp 2122260223 127.0.0.1 50001 typ host",
    "a=candidate:3 1 tcp 1518280447 127.0.0.1 9 typ host tcptype active",
    "a=candidate:4 1 udp 2122260223 5f0c.local 50002 typ host", ""])


def test_sdp_bitrate_hints_and_loopback_filter():
    pytest.importorskip("aiortc", reason="the WebRTC transport needs aiortc")
    from wanstream.server.webrtc import add_bitrate_hints, keep_loopback_candidates
    hinted = add_bitrate_hints(OFFER, 1500)
    assert "a=fmtp:96 x-google-min-bitrate=1500;x-google-start-bitrate=1500;x-google-max-bitrate=3000" in hinted
    assert "profile-level-id=42e01f;x-google-min-bitrate=1500" in hinted
    kept = [line for line in keep_loopback_candidates(OFFER).splitlines() if line.startswith("a=candidate")]
    assert kept == ["a=candidate:2 1 udp 2122260223 127.0.0.1 50001 typ host"]


# ---------------------------------------------------------------------------------------------- sessions
def test_input_queue_keeps_the_newest_chunk_and_discards_on_prompt_change(tiny_model, tmp_path, clip):
    clock = Clock()
    mgr = SessionManager(tiny_model, server_settings(tmp_path), clock=clock)
    s = mgr.open("test")
    for i in range(12):
        clock.t = i / 30
        s.submit(clip[i], t=clock.t)
    assert s.buffer.arrivals() == [i / 30 for i in range(7, 12)]      # one chunk (5 frames), the newest ones
    assert s.stats.summary()["frames_dropped"] == 7
    frames, info = s.buffer.take()                                   # the model takes it
    assert info.arrivals == [i / 30 for i in range(7, 12)] and s.stats.summary()["frames_to_model"] == 5
    for i in range(12, 15):
        s.submit(clip[i], t=i / 30)
    s.apply(ParamsUpdate(prompt="something else"))   # the 3 queued frames predate the change: dropped
    summary = s.stats.summary()
    assert summary["queued"] == 0 and summary["frames_dropped"] == 10
    for i in range(15, 19):
        s.submit(clip[i], t=i / 30)
    # the frames after the change wait for the new prompt: held until the worker hands it to the stream
    assert s.chunk_len == 4 and len(s.buffer) == 4 and s.buffer.held and not s.buffer.ready()
    assert s._dirty == {"prompt"} and s._prompt_gen == 2
    s.close()
    assert mgr.count == 0
    mgr.shutdown()


def test_the_worker_runs_every_session_in_one_engine_tick(tiny_model, tmp_path, clip):
    """Two sessions with a chunk ready: one worker turn is one engine tick with one DiT call for both."""
    mgr = SessionManager(tiny_model, server_settings(tmp_path))
    a, b = mgr.open("test"), mgr.open("test")
    wait_until(lambda: a._encoded is not None and b._encoded is not None, 60, "prompts encoded")
    for i in range(5):
        a.submit(clip[i])
        b.submit(clip[i + 3])
    calls = mgr.engine.dit_calls
    while mgr.worker.run_once():                     # bounded: the work runs out
        pass
    assert a.stream is not None and b.stream is not None
    assert a.stream.stats.chunks == b.stream.stats.chunks == 1
    # the first chunks of both streams: prepare (2 levels) as calls of 2 rows each, not 4 calls
    assert mgr.engine.dit_calls - calls == 2 and mgr.engine.rows_run == 4
    for i in range(5, 9):
        a.submit(clip[i])
        b.submit(clip[i + 3])
    while mgr.worker.run_once():
        pass
    assert mgr.engine.dit_calls - calls == 3                   # steady chunk: ONE call for both streams
    a.close()
    b.close()
    mgr.shutdown()


def test_admission_control_and_vram_estimate(tiny_model, tmp_path):
    mgr = SessionManager(tiny_model, server_settings(tmp_path, max_sessions=2))
    a, b = mgr.open("test"), mgr.open("test")
    with pytest.raises(ServerFull, match="Server is full"):
        mgr.open("test")
    assert mgr.count == 2 and not a.closed and not b.closed
    b.close()
    mgr.open("test")
    gpu = SessionManager(tiny_model, server_settings(tmp_path, max_sessions=8), free_memory=lambda: 2**20)
    with pytest.raises(ServerFull, match="GPU memory"):
        gpu.open("test")
    roomy = SessionManager(tiny_model, server_settings(tmp_path, max_sessions=8), free_memory=lambda: 2**40)
    roomy.open("test")
    assert roomy.totals.counters["sessions_opened"] == 1 and gpu.totals.counters["sessions_rejected"] == 1


def test_closing_a_session_releases_its_stream(tiny_model, tmp_path, clip):
    mgr = SessionManager(tiny_model, server_settings(tmp_path))
    s = mgr.open("test")
    wait_until(lambda: s._encoded is not None, 60, "prompt encoded")
    for i in range(9):
        s.submit(clip[i])
    while mgr.worker.run_once():
        pass
    assert s.stream is not None
    ref = weakref.ref(s.stream)
    s.close("disconnected")
    mgr.engine.release_closed()                 # what the worker does on its next turn
    gc.collect()
    assert ref() is None and s.stream is None and mgr.count == 0
    assert mgr.engine.streams == {} and list(mgr.engine.groups.values())[0].runner.pool.used_rows == 0
    assert mgr.metrics.render().count(s.id.encode()) == 0


# ---------------------------------------------------------------------------------------------- command line
def test_serve_command_line():
    import argparse

    from wanstream.cli.serve import add_serve_parser, run_serve, settings_from_args
    parser = argparse.ArgumentParser(prog="wanstream")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", "--model", "m"])
    settings = settings_from_args(args)
    assert (settings.host, settings.port, settings.max_sessions, settings.token) == ("127.0.0.1", 7860, 4, None)
    assert (settings.width, settings.height, settings.steps) == (512, 512, 2) and args.func is run_serve
    args = parser.parse_args(["serve", "--model", "m", "--host", "0.0.0.0", "--port", "8000", "--max-sessions", "2",
                              "--token", "t", "--resolution", "64x48", "--steps", "4", "--record-dir", "r",
                              "--ice-server", "stun:127.0.0.1:3478", "--taehv"])
    s = settings_from_args(args)
    assert (s.host, s.port, s.max_sessions, s.token, s.width, s.height, s.steps) == \
        ("0.0.0.0", 8000, 2, "t", 64, 48, 4)
    assert s.ice_servers == ["stun:127.0.0.1:3478"] and s.decoder == "taehv" and not s.loopback_only
    assert s.encoder == "vae"                                   # --taehv alone: the decode end
    s = settings_from_args(parser.parse_args(["serve", "--model", "m", "--taehv", "both"]))
    assert (s.encoder, s.decoder) == ("taehv", "taehv")
    for bad in (["--steps", "5"], ["--steps", "x"], ["--resolution", "500x500"], ["--max-sessions", "0"],
                ["--port", "70000"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", "--model", "m", *bad])


def test_the_worker_returns_freed_heap_when_idle(tiny_model, tmp_path, clip, monkeypatch):
    """After work, the model worker gives freed heap pages back to the OS once it is idle."""
    from wanstream.server import worker as worker_mod
    trims = []
    monkeypatch.setattr(worker_mod, "return_freed_heap", lambda: trims.append(1))
    monkeypatch.setattr(worker_mod, "IDLE_TRIM_S", 0.05)
    mgr = SessionManager(tiny_model, server_settings(tmp_path, heap_trim_s=3600.0))
    mgr.start()
    s = mgr.open("test")
    for i in range(5):
        s.submit(clip[i])
    wait_until(lambda: s.stream is not None and s.stream.stats.chunks >= 1, 120, "a chunk ran")
    wait_until(lambda: mgr.worker.heap_trims >= 1, 30, "an idle trim")
    n = len(trims)
    assert n == mgr.worker.heap_trims >= 1
    s.close()
    mgr.shutdown()


def test_a_closed_session_leaves_no_tensor_to_the_cycle_collector(tiny_model, tmp_path, clip):
    """Sessions sit in reference cycles (callbacks); their big state (prompt embedding, frames) must be freed at
    close, not whenever a full GC pass happens to run (seen: RSS +200 MiB in a one-minute soak)."""
    mgr = SessionManager(tiny_model, server_settings(tmp_path))
    s = mgr.open("test")
    s.apply(ParamsUpdate(prompts=[{"text": "ink", "weight": 1.0}, {"text": "oil", "weight": 2.0}]))
    wait_until(lambda: s._encoded is not None and s._encoded[0] == s._prompt_gen, 60, "prompt encoded")
    for i in range(9):
        s.submit(clip[i])
    while mgr.worker.run_once():
        pass
    assert s.stream is not None
    gc.collect()
    gc.disable()
    try:
        s.close("disconnected")
        mgr.engine.release_closed()
        del s
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        leaked = [o for o in gc.garbage if isinstance(o, (torch.Tensor, np.ndarray))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert leaked == []
    mgr.shutdown()
