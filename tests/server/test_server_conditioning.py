"""VACE conditioning over HTTP: upload / replace / clear a reference image and switch the control kind on a live
stream (frames keep flowing); bad images get a 4xx naming the problem; bounds and counters in /metrics."""

from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("websockets", reason="the WebSocket transport needs the websockets package")

from server_helpers import LiveServer, WSClient, server_settings, stream_until, wait_until  # noqa: E402


@pytest.fixture(scope="module")
def vace_model(tmp_path_factory):
    from wanstream.models.loader import load_model
    from wanstream.models.random_init import init_random
    root = tmp_path_factory.mktemp("vace_server")
    init_random(root, "tiny", seed=0, log=lambda *_: None, vace=True)
    return load_model(root, device="cpu")


@pytest.fixture(scope="module")
def srv(vace_model, tmp_path_factory):
    with LiveServer(vace_model, server_settings(tmp_path_factory.mktemp("cond"), max_reference_bytes=200_000)) as s:
        yield s


def upload(srv, sid: str, data: bytes, ctype: str, secret: str | None):
    """PUT the reference image bytes with their own Content-Type; ``(status, JSON)``."""
    import json
    import urllib.error
    import urllib.request
    headers = {"Content-Type": ctype, **({"X-Stream-Secret": secret} if secret else {})}
    req = urllib.request.Request(f"{srv.base}/api/sessions/{sid}/reference", data=data, method="PUT", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def png(size=(40, 30), fmt="PNG") -> bytes:
    from PIL import Image
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def test_reference_and_control_on_a_live_stream(srv, clip):
    c = WSClient(srv.ws_url)
    sid, secret = c.ready()["session"], c.ready()["secret"]
    own = {"X-Stream-Secret": secret}
    sent = stream_until(c, clip, 5)
    status, body = upload(srv, sid, png(), "image/png", secret)
    assert status == 200 and body["conditioning"]["reference"], body
    session = srv.manager.get(sid)
    wait_until(lambda: session.stream is not None and getattr(
        session.stream.group.runner.streams[session.stream.id].vace, "reference", None) is not None, 60,
        "the reference reaches the stream")
    sent += stream_until(c, clip, c.frame_count + 8, start=sent)
    status, body = srv.http("POST", f"/api/sessions/{sid}/conditioning", {"control": "edges", "strength": 0.6},
                            headers=own)
    assert status == 200 and body["conditioning"]["control"] == "edges"
    sent += stream_until(c, clip, c.frame_count + 8, start=sent)
    status, jpeg = wait_until(lambda: (lambda r: r if r[0] == 200 else None)(
        srv.http("GET", f"/api/sessions/{sid}/control.jpg", headers=own)), 60, "a control preview")
    assert jpeg[:2] == b"\xff\xd8"
    status, body = srv.http("DELETE", f"/api/sessions/{sid}/reference", headers=own)
    assert status == 200 and not body["conditioning"]["reference"]
    sent += stream_until(c, clip, c.frame_count + 8, start=sent)
    # bad input: 4xx naming the problem, the stream goes on
    for raw, ctype, code, words in [
            (b"definitely not an image", "image/png", 400, "not an image"),
            (png(fmt="GIF"), "image/png", 415, "GIF"),
            (png(), "text/plain", 415, "wrong type"),
            (png(size=(400, 300), fmt="BMP"), "image/bmp", 413, "limited to 200000 bytes")]:
        status, body = upload(srv, sid, raw, ctype, secret)
        assert status == code and words in body["message"], (status, body)
    status, body = srv.http("POST", f"/api/sessions/{sid}/conditioning", {"control": "scribble"}, headers=own)
    assert status == 422 and "control" in body["message"]
    status, body = srv.http("POST", f"/api/sessions/{sid}/conditioning", {"control": "pose"}, headers=own)
    assert status == 409 and "wanstream download pose" in body["message"]
    status, body = srv.http("POST", f"/api/sessions/{sid}/conditioning", {"control": "depth"}, headers=own)
    assert status == 409 and "wanstream download depth-anything" in body["message"]
    status, _ = upload(srv, sid, png(), "image/png", None)
    assert status == 403                                               # not the caller's stream
    stream_until(c, clip, c.frame_count + 4, start=sent)
    assert not c.closed and not c.errors()
    status, text = srv.http("GET", "/metrics")
    for name in ("wanstream_server_references_set_total 1.0", "wanstream_server_references_refused_total 3.0",
                 "wanstream_server_control_switches_total 1.0", "wanstream_sessions_with_control 1.0",
                 "wanstream_sessions_with_reference 0.0", 'wanstream_server_limit{name="max_reference_bytes"}',
                 'wanstream_server_refused_total{reason="body_too_large"} 1.0'):      # the guard's 413
        assert name in text, name
    c.close()
    wait_until(lambda: srv.manager.count == 0, 30, "session freed")


def test_a_model_without_vace_refuses_with_409(tiny_model, tmp_path, clip):
    with LiveServer(tiny_model, server_settings(tmp_path)) as s:
        c = WSClient(s.ws_url)
        sid, secret = c.ready()["session"], c.ready()["secret"]
        status, body = upload(s, sid, png(), "image/png", secret)
        assert status == 409 and "wanstream download vace-1.3b" in body["message"]
        c.close()


def test_serve_reference_and_control_are_the_defaults_of_new_sessions(vace_model, tmp_path, clip):
    from wanstream.cli.main import build_parser
    from wanstream.cli.serve import settings_from_args
    ref = tmp_path / "ref.png"
    ref.write_bytes(png())
    args = build_parser().parse_args(["serve", "--model", str(tmp_path), "--reference", str(ref), "--control",
                                      "edges", "--reference-strength", "0.5", "--max-reference-mb", "1"])
    settings = settings_from_args(args)
    assert [r.shape for r in settings.default_reference] == [(30, 40, 3)] and settings.default_control == "edges"
    assert settings.default_strength == 0.5 and settings.max_reference_bytes == 2**20
    with LiveServer(vace_model, server_settings(tmp_path, default_reference=settings.default_reference,
                                                default_control="edges", default_strength=0.5)) as s:
        c = WSClient(s.ws_url)
        sid = c.ready()["session"]
        session = s.manager.get(sid)
        stream_until(c, clip, 5)
        wait_until(lambda: session.stream is not None and getattr(
            session.stream.group.runner.streams[session.stream.id].vace, "reference", None) is not None, 60,
            "the default reference reaches the stream")
        vace = session.stream.group.runner.streams[session.stream.id].vace
        assert vace.control.kind == "edges" and vace.strength == 0.5
        c.close()


def test_control_kind_and_strength_over_osc(vace_model, tmp_path, clip):
    pytest.importorskip("pythonosc", reason="OSC control needs python-osc")
    from pythonosc.udp_client import SimpleUDPClient
    with LiveServer(vace_model, server_settings(tmp_path, osc_port=0)) as s:
        osc = SimpleUDPClient("127.0.0.1", s.app.state.osc.port)
        c = WSClient(s.ws_url)
        sid, secret = c.ready()["session"], c.ready()["secret"]
        session = s.manager.get(sid)
        osc.send_message(f"/wanstream/{sid}/{secret}/control", "edges")
        osc.send_message(f"/wanstream/{sid}/vace_strength", [secret, 0.4])
        osc.send_message(f"/wanstream/{sid}/{secret}/control", "scribble")       # invalid: dropped, counted
        osc.send_message(f"/wanstream/{sid}/wrong-secret/control", "flow")       # forbidden: nothing changes
        wait_until(lambda: session.conditioning.info()["control"] == "edges" and
                   abs(session.conditioning.info()["strength"] - 0.4) < 1e-6, 30, "OSC conditioning applied")
        stream_until(c, clip, 6)
        wait_until(lambda: session.stream.group.runner.streams[session.stream.id].vace is not None and
                   session.stream.group.runner.streams[session.stream.id].vace.control.kind == "edges", 30,
                   "the control kind reaches the stream")
        text = s.http("GET", "/metrics")[1]
        assert 'wanstream_osc_dropped_total{reason="invalid"} 1.0' in text
        assert 'wanstream_osc_dropped_total{reason="forbidden"} 1.0' in text
        c.close()


def test_presets_carry_the_conditioning_with_the_image_embedded(srv, clip):
    """A stream's preset embeds its reference (JPEG data URI) with strength and control; applied to another stream it
    sets the same; a preset naming a file, a bad data URI or a wrong type is refused naming the field."""
    import base64
    a, b = WSClient(srv.ws_url), WSClient(srv.ws_url)
    try:
        (sa, ka), (sb, kb) = [(c.ready()["session"], c.ready()["secret"]) for c in (a, b)]
        assert upload(srv, sa, png(), "image/png", ka)[0] == 200
        status, _ = srv.http("POST", f"/api/sessions/{sa}/conditioning", {"control": "edges", "strength": 0.5},
                             headers={"X-Stream-Secret": ka})
        assert status == 200
        status, preset = srv.http("GET", f"/api/sessions/{sa}/preset", headers={"X-Stream-Secret": ka})
        cond = preset["conditioning"]
        assert status == 200 and cond["reference"].startswith("data:image/jpeg;base64,")
        assert cond["control"] == "edges" and cond["strength"] == 0.5
        status, body = srv.http("POST", f"/api/sessions/{sb}/preset", preset, headers={"X-Stream-Secret": kb})
        assert status == 200, body
        info = srv.manager.get(sb).conditioning.info()
        assert info["reference"] and info["control"] == "edges" and info["strength"] == 0.5
        gif = "data:image/gif;base64," + base64.b64encode(png(fmt="GIF")).decode()
        for reference, code, words in [("look.png", 422, "embeds its image"),
                                       ("data:image/png;base64,@@@", 400, "not base64"),
                                       (gif, 415, "wrong type"),
                                       ("data:image/png;base64," + base64.b64encode(b"nope").decode(), 400,
                                        "not an image")]:
            bad = {**preset, "conditioning": {**cond, "reference": reference}}
            status, body = srv.http("POST", f"/api/sessions/{sb}/preset", bad, headers={"X-Stream-Secret": kb})
            assert status == code and words in body["message"], (reference[:30], status, body)
        stream_until(a, clip, 4)
        assert not a.errors() and not b.errors()
    finally:
        a.close()
        b.close()
    wait_until(lambda: srv.manager.count == 0, 30, "sessions freed")
