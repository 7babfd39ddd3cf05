"""Hostile requests of issue 19 (item 8): each root cause that reached a 500, a traceback or a secret in the log
is a test here; each fails without its fix.

1. malformed Host / Origin (brackets, bad IPv6 literals, bad ports): 403, before and whatever the token
2. an over-long or odd recording name: 404
3. a preset LoRA path: over-long → 422; matched by name only (no file is looked at)
4. OSC: deeply nested bundles and type-tag garbage are counted, with no traceback and no log line
5. a WebRTC / WHIP offer without a DTLS fingerprint (or ICE credentials, setup role, parsable SDP): 400, no slot
6. a percent-encoded ``token`` / ``secret`` query parameter never reaches the log in clear; long targets are cut
7. security headers on every answer (a CSP with frame-ancestors 'none', X-Frame-Options ...) and a favicon
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import urllib.error
import urllib.request

import pytest

pytest.importorskip("websockets", reason="the WebSocket transport needs the websockets package")

from server_helpers import LiveServer, WSClient, make_offer, server_settings, wait_until  # noqa: E402

TOKEN = "hostile-tok-" + "x" * 12
ADMIN = "hostile-admin-" + "y" * 12
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def srv(tiny_model, tmp_path_factory):
    settings = server_settings(tmp_path_factory.mktemp("hostile"), token=TOKEN, admin_token=ADMIN, osc_port=0,
                               webrtc_loopback_candidates=True)
    with LiveServer(tiny_model, settings) as s:
        yield s


class Records(logging.Handler):
    """Every record of the given loggers (and the root) while in use: ``text`` is what a log file would hold."""

    def __init__(self, *names: str):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.loggers = [logging.getLogger(n) for n in ("", *names)]

    def emit(self, record):
        if not any(r is record for r in self.records):     # (a record reaches the root handler too)
            self.records.append(record)

    @property
    def text(self) -> str:
        return "\n".join(self.format(r) for r in self.records)

    def __enter__(self):
        self._levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.DEBUG if lg.name != "root" else lg.level)
            lg.addHandler(self)
        return self

    def __exit__(self, *exc):
        for lg, level in zip(self.loggers, self._levels):
            lg.removeHandler(self)
            lg.setLevel(level)


def raw_status(port: int, request: bytes) -> int:
    """The status of one raw HTTP/1.1 request (0 if the server closed without an answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    m = re.match(rb"HTTP/1\.1 (\d{3})", data)
    return int(m.group(1)) if m else 0


# ------------------------------------------------------------------------------------- 1. Host and Origin
BAD_HOSTS = ["[", "[::1", "[zz]:80", "[::1]x", "a]b", "[fe80::1%eth0]", "[1.2.3.4]", "127.0.0.1:99999",
             "127.0.0.1:-1", "127.0.0.1:80:80", "exa mple", "\u00e4.example", "x" * 300]
BAD_ORIGINS = ["http://[", "http://[::1", "http://[zz]", "http://[::1]x", "http://127.0.0.1:99999",
               "http://a b", "http://user@127.0.0.1", "http://127.0.0.1/path", "http://"]


@pytest.mark.parametrize("host", BAD_HOSTS)
def test_malformed_host_is_refused_not_a_500(srv, host):
    """Was: 500 (urlsplit raised "Invalid IPv6 URL") before the token was even looked at."""
    for headers in ({}, AUTH):                  # the same answer with or without the token
        status = raw_status(srv.port, b"GET /api/health HTTP/1.1\r\nHost: " + host.encode("utf-8")
                            + b"\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
                            + b"Connection: close\r\n\r\n")
        assert status in (400, 403), (host, headers, status)


@pytest.mark.parametrize("origin", BAD_ORIGINS)
def test_malformed_origin_is_refused_not_a_500(srv, origin):
    for headers in ({}, AUTH):
        status, body = srv.http("GET", "/api/health", headers={"Origin": origin, **headers})
        assert status == 403 and body["error"] == "bad_origin", (origin, status, body)


def test_good_hosts_and_origins_still_pass(srv):
    for host in (f"127.0.0.1:{srv.port}", f"[::1]:{srv.port}", "localhost", f"LOCALHOST:{srv.port}", "10.0.0.1:"):
        assert srv.http("GET", "/api/health", headers={"Host": host, **AUTH})[0] == 200, host
    origin = f"http://127.0.0.1:{srv.port}"
    assert srv.http("GET", "/api/health", headers={"Origin": origin, **AUTH})[0] == 200
    assert srv.http("GET", "/api/health", headers={"Host": "[::1]", "Origin": "http://[::1]", **AUTH})[0] == 200


# ------------------------------------------------------------------------------------- 2. recording names
@pytest.mark.parametrize("name", ["a" * 5000 + ".mp4", "a" * 200 + ".mp4", "%C3%A9" * 127 + ".mp4",
                                  ".hidden.mp4", "..%2F..%2Fetc%2Fpasswd", "x.mp4%00.txt", "%2e%2e.mp4"])
def test_odd_recording_names_are_404(srv, name):
    """Was: 500 (File name too long) for a name over the file system's limit."""
    status, body = srv.http("GET", f"/api/recordings/{name}", headers={"Authorization": f"Bearer {ADMIN}"})
    assert status == 404, (name[:40], status, body)


# ------------------------------------------------------------------------------------- 3. preset LoRA paths
def test_preset_lora_path_too_long_is_422(srv):
    """Was: 500 (preset validation stat-ed the path: File name too long)."""
    status, body = srv.http("POST", "/api/presets/validate", {"loras": [{"path": "a/" * 3000 + "x"}]}, headers=AUTH)
    assert status == 422 and "loras.0.path" in body["message"], (status, body)
    assert len(body["message"]) < 1000


def test_preset_lora_is_matched_by_name_without_looking_at_files(srv, monkeypatch, tmp_path):
    """Was: a preset's LoRA path was stat-ed (is it a folder?), so the answer told which server folders exist."""
    marker = f"probe-{os.getpid()}"
    (tmp_path / marker).mkdir()
    looked: list[str] = []
    real_stat = os.stat

    def spy(path, *args, **kw):
        if marker in os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else False:
            looked.append(os.fsdecode(path))
        return real_stat(path, *args, **kw)

    monkeypatch.setattr(os, "stat", spy)
    answers = []
    for path in (str(tmp_path / marker), str(tmp_path / marker / "nothing-here"), f"{marker}.safetensors"):
        status, body = srv.http("POST", "/api/presets/validate", {"loras": [{"path": path}]}, headers=AUTH)
        answers.append((status, body["message"].replace(path, "PATH")))
    assert looked == []
    assert {status for status, _ in answers} == {422}
    assert "'nothing-here' is not loaded" in answers[1][1] and f"'{marker}' is not loaded" in answers[2][1]


def test_lora_name_of_is_text_only():
    from wanstream.api.presets import lora_name_of
    assert lora_name_of("styles/ink.safetensors") == "ink"
    assert lora_name_of("styles\\oil.PT") == "oil"
    assert lora_name_of("Wan2.1-Fun-LoRAs/") == "Wan2.1-Fun-LoRAs"          # a folder keeps its whole name
    assert lora_name_of("ink.v2.safetensors") == "ink.v2"


# ------------------------------------------------------------------------------------------------- 4. OSC
def nested_bundles(depth: int) -> bytes:
    data = b"/wanstream/x/steps\x00\x00,i\x00\x00\x00\x00\x00\x02"
    for _ in range(depth):
        data = b"#bundle\x00" + bytes(7) + b"\x01" + len(data).to_bytes(4, "big") + data
    return data


def osc_counts(srv) -> dict[str, float]:
    text = srv.http("GET", "/metrics", headers=AUTH)[1]
    return {r: float(v) for r, v in re.findall(r'wanstream_osc_dropped_total\{reason="(\w+)"\} (\S+)', text)}


def test_osc_garbage_is_counted_without_a_traceback_or_log_line(srv):
    """Was: each datagram of deeply nested bundles logged a ~130 KiB RecursionError traceback; python-osc's own
    warnings about garbage type tags went to the log too."""
    import time
    port = srv.app.state.osc.port
    datagrams = [nested_bundles(3000), nested_bundles(9),                     # too deep (3000: RecursionError)
                 b"/\xff\xfe\x00,s\x00\x00\xff\xff\x00\x00",                  # not UTF-8
                 b"/a\x00\x00,[[[[\x00\x00\x00", b"#bundle\x00" + bytes(8) + b"\xff\xff\xff\xff", b"",
                 b"/wanstream/a/b\x00\x00,Z\x00\x00"]                             # type tag Z: python-osc warned
    assert len(datagrams[0]) < 65000
    before = osc_counts(srv)
    with Records("wanstream", "uvicorn") as logs:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            for d in datagrams:
                udp.sendto(d, ("127.0.0.1", port))
                time.sleep(0.02)
        wait_until(lambda: (c := osc_counts(srv))["malformed"] >= before["malformed"] + 6
                   and c["unknown_stream"] >= before["unknown_stream"] + 1, 30, "garbage counted")
    after = osc_counts(srv)
    assert {k: after[k] - before[k] for k in after} == {**dict.fromkeys(after, 0.0), "malformed": 6.0,
                                                        "unknown_stream": 1.0}
    assert all(r.exc_info is None for r in logs.records), logs.text[:2000]
    assert not [r for r in logs.records if r.levelno >= logging.WARNING], logs.text[:2000]
    assert len(logs.text) < 2000


def test_osc_unforeseen_failure_logs_one_short_line(srv, monkeypatch):
    osc = srv.app.state.osc

    def boom(data, source):
        raise RecursionError("x" * 100000)
    monkeypatch.setattr(osc, "handle_packet", boom)
    with Records("wanstream") as logs:
        osc.call_handlers_for_packet(b"anything", ("127.0.0.1", 9))
    assert len(logs.records) == 1 and logs.records[0].exc_info is None and len(logs.text) < 400, logs.text[:500]


# ------------------------------------------------------------------------------------- 5. SDP without DTLS
def _without(sdp: str, prefix: str) -> str:
    return "\r\n".join(line for line in sdp.splitlines() if not line.startswith(prefix)) + "\r\n"


@pytest.mark.parametrize("prefix,words", [
    ("a=fingerprint", "fingerprint"), ("a=ice-ufrag", "ICE credentials"), ("a=setup", "DTLS role"),
    ("a=rtcp-mux", "RTCP"),
])
def test_offer_without_dtls_or_ice_is_400_before_a_slot(srv, prefix, words):
    """Was: an offer without a=fingerprint was answered (200), held a slot, then raised inside aiortc."""
    pytest.importorskip("aiortc")
    sdp = _without(make_offer(), prefix)
    opened = srv.manager.totals.counters["sessions_opened"]
    before = srv.manager.count
    status, body = srv.http("POST", "/api/webrtc/offer", {"sdp": sdp, "type": "offer"}, headers=AUTH)
    assert status == 400 and words in body["message"] and "SDP" in body["message"], body
    req = urllib.request.Request(srv.base + "/whip/hostile", data=sdp.encode(), method="POST",
                                 headers={**AUTH, "Content-Type": "application/sdp"})
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(req, timeout=30)
    assert answer.value.code == 400 and words in json.loads(answer.value.read())["message"]
    assert srv.manager.count == before and srv.manager.totals.counters["sessions_opened"] == opened


def test_unparsable_offer_is_400(srv):
    pytest.importorskip("aiortc")
    sdp = make_offer().replace("a=rtpmap:", "a=rtpmap:x", 1)
    status, body = srv.http("POST", "/api/webrtc/offer", {"sdp": sdp, "type": "offer"}, headers=AUTH)
    assert status == 400 and "cannot be parsed" in body["message"], body
    assert srv.manager.count == 0


# -------------------------------------------------------------------------------------- 6. secrets in logs
def test_percent_encoded_token_and_secret_are_redacted(srv):
    """Was: ``?%74oken=T`` was accepted as the token and written to the access log in clear."""
    with Records("uvicorn.access", "uvicorn.error") as logs:
        assert srv.http("GET", f"/api/health?%74oken={TOKEN}&x=1")[0] == 200       # accepted ...
        srv.http("GET", f"/api/health?tok%65n={TOKEN}&%73ecret=s3cr3t-value&T%4fKEN=zz", headers=AUTH)
        c = WSClient(srv.ws_url + f"?%74oken={TOKEN}")
        assert c.ready()["session"]
        c.close()
        srv.http("GET", "/api/health?q=" + "z" * 5000, headers=AUTH)
        wait_until(lambda: "zzzz" in logs.text and "WebSocket" in logs.text, 10, "access log lines")
    text = logs.text
    assert TOKEN not in text and "s3cr3t-value" not in text, text              # ... but never logged
    assert "%74oken=***&x=1" in text, text
    assert max(len(line) for line in text.splitlines()) < 600                   # a long target is cut
    wait_until(lambda: srv.manager.count == 0, 30, "session freed")


def test_redact_unit():
    from wanstream.server.connections import redact
    assert redact("/a?%2574oken=abc&b=1") == "/a?%2574oken=***&b=1"            # double encoding too
    assert redact("/a?token=x&secret=y&other=z") == "/a?token=***&secret=***&other=z"
    assert redact("/" + "a" * 1000, 300).endswith("...(1001 chars)")


# ------------------------------------------------------------------------------------ 7. headers, favicon
def fetch(srv, path: str, headers: dict | None = None):
    req = urllib.request.Request(srv.base + path, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_security_headers_on_every_answer(srv):
    for path, headers, status in (("/", {}, 200), ("/static/app.js", {}, 200), ("/api/health", {}, 401),
                                  ("/api/health", AUTH, 200), ("/nowhere", AUTH, 404),
                                  ("/api/health", {"Host": "[", **AUTH}, 403)):
        code, h, _ = fetch(srv, path, headers)
        assert code == status, (path, code)
        csp = h["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert h["X-Frame-Options"] == "DENY" and h["X-Content-Type-Options"] == "nosniff"
        assert h["Referrer-Policy"] == "no-referrer"


def test_favicon_without_token(srv):
    code, h, body = fetch(srv, "/favicon.ico")
    assert code == 200 and h["Content-Type"].startswith("image/svg+xml") and body.startswith(b"<svg")
    assert len(body) < 2048
    for page in ("/", "/static/whep.html"):
        assert b'rel="icon"' in fetch(srv, page)[2] and b"<style" not in fetch(srv, page)[2]
