"""HTTP API, admission, tokens, session lifetime (disconnect, idle), recording, live controls over the wire."""

from __future__ import annotations

import gc
import importlib.util
import time
import weakref

import av
import pytest

pytest.importorskip("websockets", reason="the WebSocket transport needs the websockets package")

from server_helpers import H, LiveServer, Streamer, W, WSClient, make_offer, server_settings, stream_until, wait_until  # noqa: E402


@pytest.fixture(scope="module")
def srv(tiny_model, tmp_path_factory):
    with LiveServer(tiny_model, server_settings(tmp_path_factory.mktemp("api"), max_sessions=2)) as s:
        yield s


def stream_frames(client, clip, n, start=0, fps=30.0):
    """Send ``n`` frames like a camera would (paced), so the newest-frame policy drops none of them."""
    for i in range(start, start + n):
        client.send_frame(clip[i % len(clip)], i)
        time.sleep(1 / fps)


def test_health_sessions_and_metrics(srv, clip):
    status, health = srv.http("GET", "/api/health")
    assert status == 200 and health["status"] == "ok" and health["capacity"] == 2
    assert health["width"] == W and "websocket" in health["transports"]
    c = WSClient(srv.ws_url)
    sid, secret = c.ready()["session"], c.ready()["secret"]
    stream_frames(c, clip, 9)
    c.wait_frames(5)
    status, listing = srv.http("GET", "/api/sessions", headers={"X-Stream-Secret": secret})
    assert status == 200 and listing["count"] == 1 and listing["capacity"] == 2
    assert listing["sessions"][0]["id"] == sid and listing["sessions"][0]["transport"] == "websocket"
    assert "secret" not in listing["sessions"][0]
    status, text = srv.http("GET", "/metrics")
    assert status == 200
    for name in (f'wanstream_stream_output_frames_total{{session="{sid}"}}', "wanstream_active_sessions 1.0",
                 f'wanstream_stream_ttff_seconds{{session="{sid}"}}', "wanstream_stream_dropped_frames_total",
                 "wanstream_stream_queue_depth", "wanstream_stream_deadline_misses_total",
                 'wanstream_stream_latency_seconds{quantile="0.5"', "wanstream_server_frames_out_total",
                 'wanstream_server_latency_seconds{quantile="0.95"}', "wanstream_server_output_fps",
                 "wanstream_server_capacity_sessions 2.0", "wanstream_stream_output_fps"):
        assert name in text or name.replace('{quantile="0.5"', f'{{session="{sid}",quantile="0.5"') in text, name
    c.close()
    wait_until(lambda: srv.manager.count == 0, 30, "session freed")


def test_http_params_share_the_live_schema(srv, clip):
    c = WSClient(srv.ws_url)
    sid = c.ready()["session"]
    own = {"X-Stream-Secret": c.ready()["secret"]}
    status, body = srv.http("POST", f"/api/sessions/{sid}/params",
                            {"prompt": "an ink drawing", "steps": 3, "seed": 9, "noise_scale": 0.6,
                             "noise_controller": False, "transition_chunks": 4}, headers=own)
    assert status == 200 and body["params"]["steps"] == 3 and body["params"]["prompt"] == "an ink drawing"
    for bad in ({"steps": 9}, {"foo": 1}, {"prompt": "x" * 2001}, {"noise_controller": 1}, {"seed": "1"},
                {"noise_scale": 0}, {"prompts": [{"text": "a", "weight": 0}]}):
        status, body = srv.http("POST", f"/api/sessions/{sid}/params", bad, headers=own)
        assert status == 422, (bad, body)
    status, body = srv.http("POST", f"/api/sessions/{sid}/params", raw=b"{not json", headers=own)
    assert status == 422 and "malformed JSON" in body["message"]
    status, body = srv.http("POST", "/api/sessions/nope/params", {"steps": 2})
    assert status == 404 and body["error"] == "not_found"
    status, info = srv.http("GET", f"/api/sessions/{sid}", headers=own)
    assert info["params"]["seed"] == 9 and info["params"]["noise_controller"] is False
    stream_frames(c, clip, 13)                 # the stream starts with the parameters set over HTTP
    c.wait_frames(5)
    c.close()


def test_live_controls_reset_blend_transition(srv, clip):
    c = WSClient(srv.ws_url)
    c.ready()
    stream_frames(c, clip, 13)
    c.wait_frames(5)
    reply = c.params(prompts=[{"text": "a", "weight": 1.0}, {"text": "b", "weight": 2.0}], transition_chunks=3)
    assert reply["type"] == "params" and reply["params"]["transition_chunks"] == 3
    assert [p["weight"] for p in reply["params"]["prompts"]] == [1.0, 2.0]
    stream_frames(c, clip, 12, 13)
    have = c.frame_count
    reply = c.params(reset=True, steps=1, noise_scale=0.5)
    assert reply["params"]["steps"] == 1
    stream_frames(c, clip, 9, 25)               # re-prepares: 5 frames, then 4
    c.wait_frames(have + 5)
    assert c.errors() == []
    assert all(img.shape == (H, W, 3) for _, img in c.frames)
    c.close()


def test_server_full_keeps_existing_sessions_streaming(srv, clip):
    a, b = Streamer(srv.ws_url, clip), Streamer(srv.ws_url, clip)
    try:
        c = WSClient(srv.ws_url)
        err = c.wait_error("server_full")
        assert "full" in err["message"]
        wait_until(lambda: c.closed, 10, "refused socket closed")
        assert c.close_code == 1013
        if importlib.util.find_spec("aiortc") is not None:
            status, body = srv.http("POST", "/api/webrtc/offer", {"sdp": make_offer(), "type": "offer"})
            assert status == 503 and body["code"] == "server_full"
        assert srv.manager.count == 2
        a.assert_progress()
        b.assert_progress()
    finally:
        a.close()
        b.close()
    wait_until(lambda: srv.manager.count == 0, 30, "sessions freed")


def test_disconnect_frees_the_session_and_its_memory(srv, clip):
    c = WSClient(srv.ws_url)
    c.ready()
    stream_frames(c, clip, 9)
    c.wait_frames(5)
    session = srv.manager.list()[0]
    stream = weakref.ref(session.stream)
    c.ws.socket.close()                         # abrupt: no close handshake
    wait_until(lambda: srv.manager.count == 0, 30, "session freed after the disconnect")
    wait_until(lambda: session.stream is None, 30, "stream released")
    # freed once a model tick that began before the disconnect (and may still name the stream) has ended
    wait_until(lambda: gc.collect() >= 0 and stream() is None, 30, "stream freed")
    assert f'session="{session.id}"' not in srv.http("GET", "/metrics")[1]


def test_idle_session_is_closed(tiny_model, tmp_path, clip):
    with LiveServer(tiny_model, server_settings(tmp_path, idle_timeout_s=1.0)) as s:
        c = WSClient(s.ws_url)
        c.ready()
        stream_frames(c, clip, 5)
        wait_until(lambda: c.of_type("closed"), 30, "idle notice")
        assert c.of_type("closed")[0]["reason"] == "idle"
        wait_until(lambda: c.closed, 10, "socket closed")
        assert s.manager.count == 0


def test_recording_is_complete_after_an_abrupt_disconnect(srv, clip):
    c = WSClient(srv.ws_url)
    own = {"X-Stream-Secret": c.ready()["secret"]}
    assert c.params(recording=True)["params"]["recording"] is True
    stream_until(c, clip, 12)
    c.ws.socket.close()                         # the client vanishes mid-recording
    wait_until(lambda: srv.manager.count == 0, 30, "session freed")
    wait_until(lambda: not srv.manager.recordings.running(), 30, "recording finished")
    status, listing = srv.http("GET", "/api/recordings", headers=own)
    rec = listing["recordings"][-1]
    assert status == 200 and rec["complete"] and rec["frames"] >= 12
    path = srv.settings.record_dir / rec["file"]
    with av.open(str(path)) as container:
        frames = [f for f in container.decode(video=0)]
    assert len(frames) == rec["frames"] and frames[0].width == W and frames[0].height == H
    status, data = srv.http("GET", f"/api/recordings/{rec['file']}", headers=own)
    assert status == 200 and data[4:8] == b"ftyp" and len(data) == path.stat().st_size
    assert srv.http("GET", "/api/recordings/..%2Fsecret.mp4")[0] == 404


def test_token_is_required_everywhere(tiny_model, tmp_path):
    with LiveServer(tiny_model, server_settings(tmp_path, token="s3cret")) as s:
        for path in ("/api/health", "/api/sessions", "/metrics", "/api/recordings"):
            assert s.http("GET", path)[0] == 401, path
            assert s.http("GET", path, headers={"Authorization": "Bearer wrong"})[0] == 401, path
            assert s.http("GET", path, headers={"Authorization": "Bearer s3cret"})[0] == 200, path
            assert s.http("GET", f"{path}?token=s3cret")[0] == 200, path
            assert s.http("GET", path, headers={"X-Token": "s3cret"})[0] == 200, path
        assert s.http("POST", "/api/sessions/x/params", {"steps": 2})[0] == 401
        assert s.http("POST", "/api/webrtc/offer", {"sdp": "v=0", "type": "offer"})[0] == 401
        assert s.http("GET", "/")[0] == 200          # the page itself; it passes ?token= on to every call
        c = WSClient(s.ws_url)
        assert c.wait_error("unauthorized")
        wait_until(lambda: c.closed, 10, "socket closed")
        assert c.close_code == 4401 and s.manager.count == 0
        ok = WSClient(s.ws_url + "?token=s3cret")
        assert ok.ready()["session"]
        ok.close()
        wait_until(lambda: s.manager.count == 0, 30, "session freed")
        ok = WSClient(s.ws_url, headers={"Authorization": "Bearer s3cret"})
        assert ok.ready()["session"]
        ok.close()


def _fail_for_seed(vae, name: str, seed: int, manager):
    """Make the VAE's ``name`` call (``encode`` or ``decode_many``) fail for the stream whose seed is ``seed``."""
    original = getattr(vae, name)

    def broken(state_or_states, *args, **kwargs):
        states = state_or_states if isinstance(state_or_states, list) else [state_or_states]
        for sess in manager.list():
            st = sess.stream
            if st is not None and st.settings.seed == seed and any(x is st.enc_state or x is st.dec_state
                                                                   for x in states):
                raise RuntimeError("simulated out of memory")
        return original(state_or_states, *args, **kwargs)
    setattr(vae, name, broken)


@pytest.mark.parametrize("where", ["encode", "decode_many"])
def test_a_model_failure_ends_only_that_session(tiny_model, tmp_path, clip, where):
    """A fault in one stream's model work (its encode) or its VAE decode ends that session with a clear error;
    another session keeps streaming through the same engine and the server stays healthy."""
    with LiveServer(tiny_model, server_settings(tmp_path)) as s:
        _fail_for_seed(tiny_model.vae, where, 13, s.manager)
        healthy = Streamer(s.ws_url, clip)
        try:
            c = WSClient(s.ws_url)
            c.ready()
            c.params(seed=13)
            stream_frames(c, clip, 5)           # the first chunk fails (encode, or decode of its output)
            err = c.wait_error("model_error")
            assert "simulated out of memory" in err["message"] and where.split("_")[0] in err["message"]
            wait_until(lambda: c.closed, 30, "failed session closed")
            assert c.close_code == 1011
            healthy.assert_progress()
            assert s.http("GET", "/api/health")[1]["status"] == "ok"
            assert "wanstream_server_worker_errors_total 1.0" in s.http("GET", "/metrics")[1]
        finally:
            healthy.close()
            delattr(tiny_model.vae, where)


def test_a_stuck_model_call_is_reported_on_health(tiny_model, tmp_path, clip):
    """A model tick that runs past ``stuck_after_s`` (a hung call) makes /api/health say "stuck"."""
    import threading
    release = threading.Event()
    with LiveServer(tiny_model, server_settings(tmp_path, stuck_after_s=0.5)) as s:
        original = s.manager.engine.step

        def hung(*args, **kwargs):
            release.wait(20)                    # bounded: the test releases it
            return original(*args, **kwargs)
        s.manager.engine.step = hung
        try:
            c = WSClient(s.ws_url)
            c.ready()
            stream_frames(c, clip, 5)
            health = wait_until(lambda: (h := s.http("GET", "/api/health")[1])["status"] == "stuck" and h, 30,
                                "health says stuck")
            assert health["worker"]["running_for_s"] >= 0.5           # past stuck_after_s (shown rounded to 1 ms)
        finally:
            release.set()
            s.manager.engine.step = original
        wait_until(lambda: s.http("GET", "/api/health")[1]["status"] == "ok", 30, "healthy again")
        c.close()
