"""Bad input never takes the server down: each case gets a clear error for its own session (or is dropped and
counted), and a healthy session streaming at the same time keeps getting frames."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("websockets", reason="the WebSocket transport needs the websockets package")

from server_helpers import H, LiveServer, Streamer, W, WSClient, server_settings, wait_until  # noqa: E402

from wanstream.server.frames import encode_jpeg, pack_raw  # noqa: E402

MAX_FRAME_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def srv(tiny_model, tmp_path_factory):
    settings = server_settings(tmp_path_factory.mktemp("bad"), max_sessions=4, max_frame_bytes=MAX_FRAME_BYTES,
                               max_frame_pixels=1024 * 1024)
    with LiveServer(tiny_model, settings) as s:
        yield s


@pytest.fixture(scope="module")
def healthy(srv, clip):
    streamer = Streamer(srv.ws_url, clip, fps=15)
    streamer.assert_progress(5)
    yield streamer
    streamer.close()


@pytest.fixture
def bad(srv, healthy):
    c = WSClient(srv.ws_url, "raw")
    c.ready()
    yield c
    c.close()
    healthy.assert_progress()                  # every case: the other session is still streaming
    assert srv.http("GET", "/api/health")[1]["status"] == "ok"


def server_stats(srv, client) -> dict:
    """The session's counters over HTTP (not subject to the control-message rate limit)."""
    ready = client.ready()
    own = {"X-Stream-Secret": ready["secret"]}
    return srv.http("GET", f"/api/sessions/{ready['session']}", headers=own)[1]["stats"]


def still_streams(client, clip, n=9):
    """The session that got an error still works: frames in, frames out."""
    have = client.frame_count
    for i in range(n):
        client.send_frame(clip[i % len(clip)], 1000 + i)
        time.sleep(1 / 30)
    client.wait_frames(have + 4)


@pytest.mark.parametrize("text,code", [
    ("{not json", "bad_json"),
    ("[1, 2, 3]", "bad_json"),
    ('"just a string"', "bad_json"),
    ("[" * 100000, "message_too_large"),
    (json.dumps({"type": "params", "params": {"foo": 1}}), "bad_params"),
    (json.dumps({"type": "params", "params": {"steps": 9}}), "bad_params"),
    (json.dumps({"type": "params", "params": {"steps": "2"}}), "bad_params"),
    (json.dumps({"type": "params", "params": {"noise_scale": 1.5}}), "bad_params"),
    (json.dumps({"type": "params", "params": {"seed": -1}}), "bad_params"),
    (json.dumps({"type": "params", "params": {"noise_controller": 1}}), "bad_params"),
    (json.dumps({"type": "params", "params": {"prompt": "x" * 2001}}), "bad_params"),
    (json.dumps({"type": "params", "params": {"prompts": [{"text": "a", "weight": 0}]}}), "bad_params"),
    (json.dumps({"type": "params", "params": [1]}), "bad_params"),
    (json.dumps({"type": "explode"}), "unknown_type"),
])
def test_bad_control_message(srv, bad, clip, text, code):
    bad.send_text(text)
    err = bad.wait_error(code)
    assert err["message"]
    if code == "bad_params" and "foo" in text:
        assert "foo" in err["message"]
    assert bad.of_type("params") == []         # nothing was applied
    still_streams(bad, clip)


def _jpeg(w, h, quality=90, noise=False) -> bytes:
    arr = (np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8) if noise
           else np.full((h, w, 3), 120, np.uint8))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.mark.parametrize("payload,code", [
    (b"definitely not an image", "not_jpeg"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "not_jpeg"),
    (b"\xff\xd8\xff\xe0" + b"\x13" * 500, "bad_jpeg"),
    (_jpeg(64, 64, noise=True)[:900], "bad_jpeg"),
    (b"WSRF" + b"\x00" * 3, "bad_raw"),
    (pack_raw(np.zeros((16, 16, 3), np.uint8))[:-5], "bad_raw"),
    (_jpeg(2048, 1024), "frame_too_large"),                # 2 Mpx > the 1 Mpx cap of this server
    (b"\xff\xd8\xff" + bytes(MAX_FRAME_BYTES + 1), "frame_too_large"),
])
def test_bad_frame(srv, bad, clip, payload, code):
    bad.send_bytes(payload)
    err = bad.wait_error(code)
    assert err["message"]
    wait_until(lambda: server_stats(srv, bad)["bad_frames"] >= 1, 30, "bad frame counted")
    still_streams(bad, clip)


def test_wrong_size_frames_are_resized(srv, bad):
    frames = [_jpeg(200, 100), _jpeg(33, 77), pack_raw(np.full((48, 32, 3), 90, np.uint8)),
              pack_raw(np.full((128, 128, 3), 30, np.uint8)), encode_jpeg(np.full((480, 640, 3), 200, np.uint8))]
    for i in range(15):
        bad.send_bytes(frames[i % len(frames)])
        time.sleep(1 / 30)
    bad.wait_frames(5)
    assert all(img.shape == (H, W, 3) for _, img in bad.frames)
    assert bad.errors() == []


def test_flood_of_control_messages_is_dropped_and_counted(srv, bad, clip):
    for i in range(600):                       # bounded burst
        bad.send_json({"type": "params", "params": {"seed": i}})
    bad.wait_error("rate_limited")
    wait_until(lambda: server_stats(srv, bad)["dropped_messages"] > 0, 30, "dropped messages counted")
    assert len(bad.errors()) <= 20             # error replies are rate limited too
    still_streams(bad, clip)


def test_flood_of_frames_is_dropped_and_counted(srv, bad, clip):
    for i in range(800):                       # bounded burst, as fast as the socket takes them
        bad.send_frame(clip[i % len(clip)], i)
    wait_until(lambda: server_stats(srv, bad)["frames_in"] == 800, 60, "flood received")
    stats = server_stats(srv, bad)
    assert stats["frames_dropped"] > 700 and stats["queued"] <= 5
    still_streams(bad, clip)


def test_flood_of_garbage_frames(srv, bad, clip):
    for _ in range(300):
        bad.send_bytes(b"garbage" * 10)
    wait_until(lambda: server_stats(srv, bad)["frames_in"] == 300, 60, "garbage received")
    assert len(bad.errors("not_jpeg")) <= 10   # a few clear errors, not 300
    still_streams(bad, clip)


@pytest.mark.parametrize("body,status", [
    ({"sdp": "this is not SDP", "type": "offer"}, 400),
    ({"sdp": "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n", "type": "offer"}, 400),  # no video track
    ({"sdp": "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 VP8/90000\r\n", "type": "offer"}, 400),
    ({"sdp": "x" * 70000, "type": "offer"}, 422),
    ({"sdp": "v=0", "type": "answer"}, 422),
    ({"sdp": 5, "type": "offer"}, 422),
    ({"type": "offer"}, 422),
])
def test_malformed_sdp_offer(srv, healthy, body, status):
    pytest.importorskip("aiortc", reason="the WebRTC transport needs aiortc")
    before = srv.manager.count
    code, reply = srv.http("POST", "/api/webrtc/offer", body)
    assert code == status, reply
    if status == 400:
        assert "SDP" in reply["message"] or "video" in reply["message"]
    wait_until(lambda: srv.manager.count == before, 30, "no session left behind")
    healthy.assert_progress()
    code, _ = srv.http("POST", "/api/webrtc/offer", raw=b"{broken json")
    assert code == 422


def test_message_over_the_websocket_size_limit_closes_only_that_socket(srv, healthy):
    c = WSClient(srv.ws_url, "raw")
    c.ready()
    try:
        c.send_bytes(b"\xff\xd8\xff" + bytes(17 * 2**20))     # over uvicorn's 16 MiB message limit
    except Exception:  # noqa: BLE001 - the server may close while we are still sending
        pass
    wait_until(lambda: c.closed, 30, "oversized socket closed")
    assert c.close_code == 1009                                 # "message too big"
    wait_until(lambda: c.ready()["session"] not in [s.id for s in srv.manager.list()], 30, "session freed")
    healthy.assert_progress()
    c.close()
