#!/usr/bin/env python
"""Fuzz the live server with hostile requests, class by class; then a verdict.

Starts ``python -m wanstream.server`` (the code of ``wanstream serve``) with a token, an admin token and OSC on,
on free 127.0.0.1 ports with a tiny random model (or ``--model``), and sends every case of every class below
(``--rounds`` times). Requests carry the access token unless the class is about it: the attacker is any user of
the page. Per class it counts requests, the answers (4xx, 5xx, other) and the bytes the server's log grew by.

Classes: ``host`` / ``origin`` (malformed headers, bad IPv6 literals), ``smuggling`` (conflicting or broken
framing headers: refused; lenient forms h11 reads safely, such as an obs-fold header, may be answered 200 — the
server is no proxy), ``request_line`` (odd methods, versions, targets), ``auth`` (token forms), ``json`` (huge,
deep, invalid, non-UTF-8 bodies), ``names`` (unicode, over-long, traversal in recording / session / stream
names), ``presets`` (over-long LoRA paths, traversal, too many LoRAs), ``sdp`` (offers without a fingerprint,
ICE credentials or setup role, garbage, over WebRTC and WHIP), ``secrets_in_query`` (percent-encoded
``token`` / ``secret``: accepted, never logged), ``websocket`` (invalid handshakes and messages),
``osc`` (nested bundles, type-tag garbage, truncated datagrams), ``live`` (malformed mappings and note slots,
another stream's modulation, learn without MIDI, pushes to files or destinations not allowed, bad quantise).

Verdict (exit 0 only if all hold): no 5xx; every answer as expected (a 4xx for every hostile HTTP request, an
error message for a bad WebSocket message, every bad OSC datagram counted as dropped); no traceback or ERROR
line in the log; at most ``--max-log-bytes`` of log per request in every class and no log line over 1 KiB; no
token or stream secret in the log; the server healthy at the end with no session left.

    python scripts/fuzz.py                       # what CI runs (tests/server/test_fuzz.py)
    python scripts/fuzz.py --rounds 5 --json fuzz.json

Only loopback traffic; every request has a timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from soak import ADMIN, Server, http_call  # noqa: E402

TOKEN = "fuzz-token-" + os.urandom(8).hex()
MAX_LINE = 1024

# A structurally complete offer (ICE, DTLS, RTCP mux, one VP8 video section); each SDP case breaks it one way.
BASE_SDP = "\r\n".join([
    "v=0", "o=- 4611731400430051336 2 IN IP4 127.0.0.1", "s=-", "t=0 0", "a=group:BUNDLE 0",
    "m=video 9 UDP/TLS/RTP/SAVPF 96", "c=IN IP4 0.0.0.0", "a=mid:0", "a=sendrecv", "a=rtcp-mux",
    "a=ice-ufrag:fUzZ", "a=ice-pwd:fuzzfuzzfuzzfuzzfuzzfuzz",
    "a=fingerprint:sha-256 " + ":".join(["AB"] * 32), "a=setup:actpass", "a=rtpmap:96 VP8/90000", ""])


def without(prefix: str) -> str:
    return "\r\n".join(line for line in BASE_SDP.split("\r\n") if not line.startswith(prefix))


# ------------------------------------------------------------------------------------------------ HTTP
def raw_request(port: int, data: bytes, timeout: float = 15.0) -> int:
    """Send raw bytes as one request; the answer's status, or 0 when the server closed without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
        head = b""
        with contextlib.suppress(OSError):
            while b"\r\n" not in head and len(head) < 65536:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                head += chunk
    m = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    return int(m.group(1)) if m else 0


def request(method: str, target: str, body: bytes = b"", headers: dict | None = None, token: bool = True,
            host: str | bytes = "127.0.0.1") -> bytes:
    """A well-formed HTTP/1.1 request (with the token unless told otherwise) as bytes."""
    lines = [f"{method} {target} HTTP/1.1".encode("utf-8", "surrogateescape"),
             b"Host: " + (host if isinstance(host, bytes) else host.encode("utf-8")), b"Connection: close"]
    if token:
        lines.append(f"Authorization: Bearer {TOKEN}".encode())
    for k, v in (headers or {}).items():
        lines.append(f"{k}: ".encode() + (v if isinstance(v, bytes) else str(v).encode("utf-8")))
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}".encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


JSON = {"Content-Type": "application/json"}
SDP = {"Content-Type": "application/sdp"}


def http_cases(ctx: dict) -> dict[str, list[tuple[str, bytes, tuple[int, ...]]]]:
    """Per class: (case name, raw request, accepted statuses). ``ctx``: a live session's id and secret."""
    sid, secret = ctx["session"], ctx["secret"]
    own = {"X-Stream-Secret": secret, **JSON}
    bad4 = tuple(range(400, 500))
    c: dict[str, list] = {}
    c["host"] = [(f"host {h[:20]!r}", request("GET", "/api/health", host=h), (400, 403)) for h in (
        "[", "[::1", "[zz]:80", "[::1]x", "a]b", "[fe80::1%eth0]", "[1.2.3.4]", "127.0.0.1:99999", "127.0.0.1:-1",
        "127.0.0.1:80:80", "exa mple", "x" * 300, "attacker.example", "127.0.0.1.nip.io", ":80", "[]", "[:]",
        "1.2.3.4@evil", "evil/../", "%31%32%37.0.0.1")] + [
        ("host utf-8", request("GET", "/api/health", host="\u00e4.example".encode()), (400, 403)),
        ("host latin-1 bytes", request("GET", "/api/health", host=b"\xff\xfe"), (400, 403)),
        ("host two headers", request("GET", "/api/health", headers={"Host": "evil.example"}), (400, 403)),
        ("host missing", b"GET /api/health HTTP/1.1\r\nConnection: close\r\n\r\n", (400, 403))]
    c["origin"] = [(f"origin {o[:24]!r}", request("GET", "/api/health", headers={"Origin": o}), (400, 403))
                   for o in ("http://[", "http://[::1", "http://[zz]", "http://[::1]x", "http://127.0.0.1:99999",
                             "http://a b", "http://user@127.0.0.1", "http://127.0.0.1/path", "http://", "null",
                             "file://", "http://attacker.example", "https://127.0.0.1", "javascript:alert(1)",
                             "http://127.0.0.1:1", "x" * 2000, "http://\u00e4")] + [
        ("origin on a websocket", request("GET", "/api/ws", headers={
            "Origin": "http://[", "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}), (400, 403))]
    offer = b'{"sdp": "v=0", "type": "offer"}'
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()

    def head(first: bytes, *lines: bytes, body: bytes = b"") -> bytes:
        """A request line, Host, the token and ``lines`` as given (framing headers included), then ``body``."""
        return first + b"\r\nHost: 127.0.0.1\r\n" + auth + b"".join(ln + b"\r\n" for ln in lines) + b"\r\n" + body

    post = b"POST /api/webrtc/offer HTTP/1.1"
    get = b"GET /api/health HTTP/1.1"
    # ambiguous or broken framing: refused (4xx); lenient parsing h11 does safely (it is no proxy): 200 allowed
    c["smuggling"] = [
        ("CL and TE", head(post, b"Content-Length: 4", b"Transfer-Encoding: chunked",
                           body=b"0\r\n\r\nGET /api/health HTTP/1.1\r\n\r\n"), bad4),
        ("two content lengths", head(post, b"Content-Length: 3", b"Content-Length: 40", body=offer), bad4),
        ("negative content length", head(post, b"Content-Length: -1", body=offer), bad4),
        ("hex content length", head(post, b"Content-Length: 0x10", body=offer), bad4),
        ("content length with a space", head(post, b"Content-Length: 1 0", body=offer), bad4),
        ("TE identity", head(post, b"Transfer-Encoding: identity"), bad4),
        ("TE xchunked", head(post, b"Transfer-Encoding: xchunked"), bad4),
        ("TE chunked twice", head(post, b"Transfer-Encoding: chunked, chunked", body=b"0\r\n\r\n"), bad4),
        ("bad chunk size", head(post, b"Transfer-Encoding: chunked", body=b"zz\r\n" + offer + b"\r\n0\r\n\r\n"),
         bad4),
        ("chunk size overflow", head(post, b"Transfer-Encoding: chunked", body=b"f" * 40 + b"\r\nx\r\n0\r\n\r\n"),
         bad4),
        ("NUL in a header", head(get, b"X-A: a\x00b"), bad4),
        ("space before colon", head(get, b"X-A : 1"), bad4),
        ("two Host headers", head(get, b"Host: evil.example"), bad4),
        ("header name with space", head(get, b"X A: 1"), bad4),
        ("header of 1 MiB", head(get, b"X-Big: " + b"a" * (1 << 20)), bad4 + (0,)),
        ("announced body never sent", head(post, b"Content-Length: 999999999", body=b"{"), (413,)),
        ("obs-fold header (unfolded by h11)", head(get, b"X-A: 1", b"  folded"), (200, 400)),
        ("bare LF line ends", b"GET /api/health HTTP/1.1\nHost: 127.0.0.1\n" + auth.replace(b"\r\n", b"\n") + b"\n",
         (200, 400)),
        ("header of 60 KiB", head(get, b"X-Big: " + b"a" * 60000), (200, 400, 431, 0)),
        ("400 headers", head(get, *[b"X-%d: 1" % i for i in range(400)]), (200, 400, 431)),
    ]
    c["request_line"] = [(f"method {m!r}", request(m, "/api/health"), (400, 404, 405, 501))
                         for m in ("PROPFIND", "TRACE", "CONNECT", "PATCH", "DELETE", "PUT", "get", "G\x00T",
                                   "A" * 100, "OPTIONS")] + [
        ("HTTP/2.0 line (read as HTTP/1.1)", request("GET", "/api/health").replace(b"HTTP/1.1", b"HTTP/2.0", 1),
         (200, 400, 505)),
        ("HTTP/0.9 line", b"GET /api/health\r\n\r\n", bad4 + (0,)),
        ("absolute form to elsewhere", request("GET", "http://evil.example/api/health"), bad4),
        ("asterisk target", request("GET", "*"), bad4),
        ("target of 1 MiB", request("GET", "/api/health?" + "a" * (1 << 20)), bad4 + (0,)),
        ("target of 4 KiB", request("GET", "/" + "a" * 4000), (404,)),
        ("control chars in target", b"GET /api/\x01health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", bad4),
        ("raw UTF-8 in the target", request("GET", "/api/sessions/\u00e9\u00e9\u00e9"), (400, 404)),
        ("encoded slash", request("GET", "/api/sessions/..%2F..%2Fetc%2Fpasswd"), (404,)),
        ("dot segments", request("GET", "/static/../../../../etc/passwd"), (400, 404)),
        ("encoded dot segments", request("GET", "/static/%2e%2e/%2e%2e/etc/passwd"), (400, 404)),
        ("static traversal backslash", request("GET", "/static/..\\..\\server.py"), (400, 404)),
        ("garbage line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64) + b"\r\n\r\n", bad4 + (0,)),
    ]
    c["auth"] = [(name, request("GET", target, headers=h, token=False), (401,)) for name, target, h in (
        ("no token", "/api/health", {}),
        ("wrong bearer", "/api/health", {"Authorization": "Bearer wrong"}),
        ("basic", "/api/health", {"Authorization": f"Basic {TOKEN}"}),
        ("empty bearer", "/api/health", {"Authorization": "Bearer "}),
        ("bearer prefix", "/api/health", {"Authorization": f"Bearer {TOKEN[:-1]}"}),
        ("bearer unicode", "/api/health", {"Authorization": "Bearer \u00e9\u00e9"}),
        ("token 6 KiB", "/api/health", {"Authorization": "Bearer " + "t" * 6000}),
        ("wrong bearer, right query", f"/api/health?token={TOKEN}", {"Authorization": "Bearer x"}),
        ("x-token wrong", "/api/sessions", {"X-Token": "nope"}),
        ("query token twice, the last wrong", f"/api/health?token={TOKEN}&token=x", {}),
        ("metrics", "/metrics", {}), ("recordings", "/api/recordings", {}),
        ("docs", "/openapi.json", {}))] + [
        ("secret, not a token", request("GET", "/api/health", headers={"X-Stream-Secret": secret}, token=False),
         (401,)),
        ("docs with the token", request("GET", "/docs"), (404,)),
        ("another stream without its secret", request("GET", f"/api/sessions/{sid}"), (403,)),
        ("another stream, a wrong secret", request("POST", f"/api/sessions/{sid}/params", b'{"seed": 1}',
                                                   {"X-Stream-Secret": "x" * 32, **JSON}), (403,)),
    ]
    params = f"/api/sessions/{sid}/params"
    c["json"] = [(name, request("POST", params, body, own), bad4) for name, body in (
        ("empty body", b""), ("not JSON", b"{not json"), ("NaN", b'{"noise_scale": NaN}'),
        ("Infinity", b'{"noise_scale": Infinity}'), ("1e999", b'{"seed": 1e999}'),
        ("5000-digit integer", b'{"seed": ' + b"9" * 5000 + b"}"),
        ("100000-digit integer", b'{"seed": ' + b"9" * 100000 + b"}"),
        ("deep arrays", b"[" * 5000 + b"]" * 5000), ("deep objects", b'{"a":' * 3000 + b"1" + b"}" * 3000),
        ("lone surrogate", b'{"prompt": "\\ud800"}'), ("surrogate key", b'{"\\udfff": 1}'),
        ("invalid UTF-8", b'{"prompt": "\xff\xfe"}'),
        ("array", b"[1, 2, 3]"), ("string", b'"x"'), ("null", b"null"),
        ("unknown field", b'{"evil": 1}'), ("prompt of 2001", json.dumps({"prompt": "x" * 2001}).encode()),
        ("steps as string", b'{"steps": "2"}'), ("bool as int", b'{"noise_controller": 1}'),
        ("seed -1", b'{"seed": -1}'), ("seed 2**64", b'{"seed": 18446744073709551616}'),
        ("9 blend prompts", json.dumps({"prompts": [{"text": "a", "weight": 1}] * 9}).encode()),
        ("prompt and prompts", b'{"prompt": "a", "prompts": [{"text": "b"}]}'),
        ("17 LoRAs", json.dumps({"lora": {f"l{i}": 1.0 for i in range(17)}}).encode()),
        ("unknown LoRA", b'{"lora": {"../../etc/passwd": 1.0}}'),
        ("fit garbage", b'{"fit": "explode"}'), ("trailing garbage", b'{"seed": 1} {"seed": 2}'),
        ("body of 300 KiB", b'{"prompt": "' + b"x" * (300 << 10) + b'"}'))] + [
        ("wrong content type", request("POST", params, b'{"seed": 1}', {"X-Stream-Secret": secret,
                                                                         "Content-Type": "text/plain"}), bad4 + (200,)),
        ("offer: JSON array", request("POST", "/api/webrtc/offer", b"[]", JSON), bad4),
        ("offer: deep JSON", request("POST", "/api/webrtc/offer", b"[" * 5000 + b"]" * 5000, JSON), bad4),
        ("preset: deep JSON", request("POST", "/api/presets/validate", b'{"a":' * 3000 + b"1" + b"}" * 3000, JSON),
         bad4),
    ]
    c["names"] = [(name, request("GET", target), (400, 403, 404)) for name, target in (
        ("recording 5000 chars", "/api/recordings/" + "a" * 5000 + ".mp4"),
        ("recording 200 chars", "/api/recordings/" + "a" * 200 + ".mp4"),
        ("recording unicode over NAME_MAX", "/api/recordings/" + "%C3%A9" * 127 + ".mp4"),
        ("recording traversal", "/api/recordings/..%2F..%2Fetc%2Fpasswd"),
        ("recording dot-dot", "/api/recordings/%2e%2e.mp4"), ("recording hidden", "/api/recordings/.x.mp4"),
        ("recording NUL", "/api/recordings/x.mp4%00.txt"), ("recording emoji", "/api/recordings/%F0%9F%98%80.mp4"),
        ("recording not mp4", "/api/recordings/server.log"),
        ("session 5000 chars", "/api/sessions/" + "a" * 5000), ("session unicode", "/api/sessions/%E2%80%AE"),
        ("session traversal", "/api/sessions/..%2Fx/params"), ("session preset", "/api/sessions/x/preset"))] + [
        ("whip name 5000 chars", request("POST", "/whip/" + "a" * 5000, BASE_SDP.encode(), SDP), (400,)),
        ("whip name unicode", request("POST", "/whip/%C3%A9", BASE_SDP.encode(), SDP), (400,)),
        ("whip name traversal", request("POST", "/whip/..%2F..", BASE_SDP.encode(), SDP), (400, 404, 405)),
        ("whep unknown stream", request("POST", "/whep/" + "b" * 64, BASE_SDP.encode(), SDP), (404,)),
        ("whip delete unknown", request("DELETE", "/whip/x/" + "r" * 3000), (404,)),
        ("whep delete unknown", request("DELETE", "/whep/x/y"), (404,)),
        ("whip chosen secret too short", request("POST", "/whip/fuzz?secret=short", BASE_SDP.encode(), SDP), (400,)),
        ("whip chosen secret unicode", request("POST", "/whip/fuzz?secret=" + "%C3%A9" * 20, BASE_SDP.encode(),
                                               SDP), (400,)),
    ]
    validate = "/api/presets/validate"
    c["presets"] = [(name, request("POST", validate, json.dumps(body).encode(), JSON), bad4) for name, body in (
        ("LoRA path 6000 chars", {"loras": [{"path": "a/" * 3000 + "x"}]}),
        ("LoRA path 1025 chars", {"loras": [{"path": "a" * 1025}]}),
        ("LoRA path of a server folder", {"loras": [{"path": "/etc"}]}),
        ("LoRA traversal", {"loras": [{"path": "../../../../root/.ssh/id_rsa"}]}),
        ("LoRA NUL", {"loras": [{"path": "a\u0000b.safetensors"}]}),
        ("LoRA empty", {"loras": [{"path": ""}]}), ("LoRA unicode", {"loras": [{"path": "\u202e\u00e9.pt"}]}),
        ("17 LoRAs", {"loras": [{"path": f"l{i}.pt"} for i in range(17)]}),
        ("two LoRAs of one name", {"loras": [{"path": "a/x.pt"}, {"path": "b/x.safetensors"}]}),
        ("strength NaN-like", {"loras": [{"path": "x.pt", "strength": 1e308}]}),
        ("format", {"format": "other"}), ("version", {"version": 2}), ("live-only field", {"recording": True}),
        ("steps 9", {"steps": 9}), ("fit garbage", {"fit": "\u00e9"}))] + [
        ("apply without the secret", request("POST", f"/api/sessions/{sid}/preset", b'{"steps": 1}', JSON), (403,)),
        ("apply LoRA path 6000", request("POST", f"/api/sessions/{sid}/preset",
                                         json.dumps({"loras": [{"path": "a/" * 3000}]}).encode(), own), bad4),
    ]
    sdp_offer = lambda sdp: json.dumps({"sdp": sdp, "type": "offer"}).encode()  # noqa: E731
    broken = {
        "no fingerprint": without("a=fingerprint"), "no ice-ufrag": without("a=ice-ufrag"),
        "no ice-pwd": without("a=ice-pwd"), "no setup": without("a=setup"), "no rtcp-mux": without("a=rtcp-mux"),
        "fingerprint of md5": BASE_SDP.replace("sha-256", "md5"), "fingerprint without value":
            BASE_SDP.replace("a=fingerprint:sha-256 ", "a=fingerprint:sha-256"),
        "setup garbage": BASE_SDP.replace("a=setup:actpass", "a=setup:sideways"),
        "payload type 300": BASE_SDP.replace("SAVPF 96", "SAVPF 300"),
        "payload type x": BASE_SDP.replace("SAVPF 96", "SAVPF x"), "port x": BASE_SDP.replace("m=video 9", "m=video x"),
        "rtpmap garbage": BASE_SDP.replace("a=rtpmap:96 VP8/90000", "a=rtpmap:96"),
        "fmtp of unknown payload": BASE_SDP + "a=fmtp:97 x=1\r\n", "candidate garbage": BASE_SDP + "a=candidate:x\r\n",
        "audio only": BASE_SDP.replace("m=video", "m=audio"), "no v=0": BASE_SDP[5:], "only v=0": "v=0",
        "not SDP": "hello", "binary-ish": "v=0\r\n\x01\x02\x03",
        "3000 sections": "v=0\r\n" + "m=video 9 x 96\r\n" * 3000,
        "lone surrogate": BASE_SDP + "a=x:\ud800\r\n",
    }
    c["sdp"] = [(f"offer {name}", request("POST", "/api/webrtc/offer", sdp_offer(sdp), JSON), (400, 413, 422))
                for name, sdp in broken.items()] + [
        (f"whip {name}", request("POST", f"/whip/fuzz{i}", sdp.encode("utf-8", "surrogatepass"), SDP),
         (400, 413)) for i, (name, sdp) in enumerate(broken.items())] + [
        ("whip not UTF-8", request("POST", "/whip/fuzz", b"v=0\r\n\xff\xfe", SDP), (400,)),
        ("whip JSON type", request("POST", "/whip/fuzz", BASE_SDP.encode(), JSON), (415,)),
        ("whip over 64 KiB", request("POST", "/whip/fuzz", b"v=0\r\n" + b"a=x\r\n" * 20000, SDP), (400, 413)),
        ("whip PATCH", request("PATCH", "/whip/fuzz/x", b"a=ice", {"Content-Type": "application/trickle-ice-sdpfrag"}),
         (404, 405)),
        ("offer wrong type", request("POST", "/api/webrtc/offer", b'{"sdp": "v=0", "type": "answer"}', JSON), (422,)),
    ]
    c["secrets_in_query"] = [(name, request("GET", target, token=False), (200,)) for name, target in (
        ("%74oken", f"/api/health?%74oken={TOKEN}"), ("tok%65n", f"/api/health?tok%65n={TOKEN}&x=1"),
        ("plain token and secret", f"/api/health?token={TOKEN}&secret={secret}"),
        ("%73ecret", f"/api/sessions/{sid}?%73ecret={secret}&token={TOKEN}"))] + [
        ("secret in a 404 path", request("GET", f"/api/recordings/x.mp4?%73ecret={secret}"), (403, 404)),
    ]
    mod = f"/api/sessions/{sid}/modulation"

    def mapping(target="noise_scale", **source) -> dict:
        return {"target": target, "source": source or {"kind": "cc", "control": 1}}
    live_bodies = {
        "not JSON": b"{", "an array": b"[1]", "deep": b"[" * 5000 + b"]" * 5000,
        "NaN rate": b'{"mappings": [{"target": "noise_scale", "source": {"kind": "lfo", "rate_hz": NaN}}]}',
        "unknown target": json.dumps({"mappings": [mapping("x" * 200)]}).encode(),
        "traversal target": json.dumps({"mappings": [mapping("lora.../../etc/passwd")]}).encode(),
        "lone surrogate target": b'{"mappings": [{"target": "lora.\\ud800", "source": {"kind": "cc", "control": 1}}]}',
        "CC 999": json.dumps({"mappings": [mapping(kind="cc", control=999)]}).encode(),
        "unknown source": json.dumps({"mappings": [mapping(kind="wave")]}).encode(),
        "33 mappings": json.dumps({"mappings": [mapping()] * 33}).encode(),
        "200 note slots": json.dumps({"notes": [{"note": 1, "prompt": "x"}] * 200}).encode(),
        "min out of range": json.dumps({"mappings": [{**mapping("steps"), "min": -5}]}).encode(),
        "lora not loaded": json.dumps({"mappings": [mapping("lora.ink")]}).encode(),
    }
    c["live"] = [(f"modulation {name}", request("PUT", mod, body, own), (400, 422)) for name, body in
                 live_bodies.items()] + [
        ("modulation of another stream", request("PUT", f"/api/sessions/{'0' * 32}/modulation", b"{}", JSON),
         (403, 404)),
        ("modulation without the secret", request("PUT", mod, b"{}", JSON), (403,)),
        ("learn a bad target", request("POST", f"/api/sessions/{sid}/learn", b'{"target": "x"}', own), (422,)),
        ("learn without MIDI", request("POST", f"/api/sessions/{sid}/learn", b'{"target": "seed"}', own), (409,)),
        ("push to a file", request("POST", f"/api/sessions/{sid}/outputs", b'{"url": "file:///etc/passwd"}', own),
         (422,)),
        ("push anywhere (no --push-allow)",
         request("POST", f"/api/sessions/{sid}/outputs", b'{"url": "rtmp://10.0.0.1/live/k"}', own), (403,)),
        ("push URL of 5000 characters",
         request("POST", f"/api/sessions/{sid}/outputs", json.dumps({"url": "rtmp://" + "a" * 5000}).encode(), own),
         (422,)),
        ("stop a push that is not there", request("DELETE", f"/api/sessions/{sid}/outputs/99", b"", own), (404,)),
        ("stop push -1", request("DELETE", f"/api/sessions/{sid}/outputs/-1x", b"", own), (404, 422)),
        ("quantize to a fortnight",
         request("POST", f"/api/sessions/{sid}/params", b'{"seed": 1, "quantize": "fortnight"}', own), (422,)),
    ]
    return c


# ------------------------------------------------------------------------------------------------ WebSocket
WS_MESSAGES = [          # (name, payload, the reply expected: an error, or a plain answer); the socket stays open
    ("not JSON", "{not json"), ("JSON array", "[1, 2]"), ("JSON string", '"x"'), ("JSON null", "null"),
    ("deep JSON", "[" * 5000 + "]" * 5000), ("5000-digit number", '{"type": "params", "params": {"seed": '
                                                                  + "9" * 5000 + "}}"),
    ("NaN", '{"type": "params", "params": {"noise_scale": NaN}}'),
    ("lone surrogate", '{"type": "params", "params": {"prompt": "\\udc00"}}'),
    ("unknown field", '{"type": "params", "params": {"evil": 1}}'), ("unknown type", '{"type": "explode"}'),
    ("params not an object", '{"type": "params", "params": [1]}'), ("type not a string", '{"type": 5}'),
    ("over 64 KiB", '{"type": "params", "params": {"prompt": "' + "x" * 70000 + '"}}'),
    ("not a JPEG", b"definitely not an image"), ("broken raw frame", b"WSRF\x00\x01"),
    ("raw frame of 65535x65535", b"WSRF\xff\xff\xff\xff\x00\x00\x00\x00" + b"\x00" * 30),
    ("truncated JPEG", b"\xff\xd8\xff\xe0" + b"\x13" * 500), ("PNG", b"\x89PNG\r\n\x1a\n" + b"\x00" * 100),
]
WS_ODD = [               # odd but valid: answered as usual
    ("id an object", '{"type": "stats", "id": {"a": [1, 2, 3]}}', "stats"),
    ("prompt of 2000 emoji", json.dumps({"type": "params", "params": {"prompt": "\U0001f600" * 2000}}), "params"),
    ("prompt of control characters", json.dumps({"type": "params", "params": {"prompt": "\x00\x1b[2J\u202e"}}),
     "params"),
]


def _reply(ws, kind: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = ws.recv(max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            return None
        if isinstance(msg, str) and json.loads(msg).get("type") in (kind, "error"):
            return json.loads(msg)
    return None


def websocket_cases(port: int) -> list[tuple[str, bool, str]]:
    """One socket per message: ready, the message, the reply (an error for a bad one; the socket stays open)."""
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect
    url = f"ws://127.0.0.1:{port}/api/ws?format=raw&token={TOKEN}"
    out = []
    for name, payload, kind in [(n, p, "error") for n, p in WS_MESSAGES] + WS_ODD:
        try:
            with connect(url, max_size=None, open_timeout=20, close_timeout=5) as ws:
                ready = json.loads(ws.recv(20))
                if ready.get("type") != "ready":
                    out.append((f"message {name}", False, f"first message {ready}"))
                    continue
                ws.send(payload)
                reply = _reply(ws, kind)
                ok = reply is not None and reply["type"] == kind
                out.append((f"message {name}", ok, json.dumps(reply)[:200]))
        except (ConnectionClosed, TimeoutError, OSError, InvalidStatus) as exc:
            out.append((f"message {name}", False, f"{type(exc).__name__}: {exc}"[:200]))
    handshakes = [    # raw handshakes: every one refused with a 4xx, none upgraded
        ("no key", {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"}),
        ("version 8", {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "8",
                       "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}),
        ("key garbage", {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                         "Sec-WebSocket-Key": "\u00e9" * 30}),
        ("upgrade h2c", {"Upgrade": "h2c", "Connection": "Upgrade, HTTP2-Settings", "HTTP2-Settings": "AAMAAABkAAQ"}),
    ]
    for name, headers in handshakes:
        status = raw_request(port, request("GET", "/api/ws", headers=headers))
        out.append((f"handshake {name}", 400 <= status < 500, f"HTTP {status}"))
    return out


# ------------------------------------------------------------------------------------------------ OSC
def osc_datagrams(session: str, secret: str) -> list[tuple[str, bytes]]:
    def nested(depth: int) -> bytes:
        data = b"/wanstream/x/steps\x00\x00,i\x00\x00\x00\x00\x00\x02"
        for _ in range(depth):
            data = b"#bundle\x00" + bytes(7) + b"\x01" + len(data).to_bytes(4, "big") + data
        return data

    def message(address: str, tags: bytes, args: bytes = b"") -> bytes:
        pad = lambda b: b + b"\x00" * (4 - len(b) % 4)  # noqa: E731
        return pad(address.encode("utf-8", "surrogatepass")) + pad(tags) + args

    ours = f"/wanstream/{session}/{secret}/steps"
    return [
        ("bundles nested 3000 deep", nested(3000)), ("bundles nested 9 deep", nested(9)),
        ("type tag Z", message(ours, b",Z")), ("type tags without comma", message(ours, b"iii")),
        ("unclosed array tag", message(ours, b",[[[[")), ("stray array close", message(ours, b",]")),
        ("int missing", message(ours, b",i")), ("blob of 2 GiB", message(ours, b",b", b"\x7f\xff\xff\xff")),
        ("string not terminated", message(ours, b",s", b"abc")), ("address not UTF-8", b"/\xff\xfe\x00,s\x00\x00"),
        ("bundle with a negative size", b"#bundle\x00" + bytes(8) + b"\xff\xff\xff\xff"),
        ("bundle size beyond", b"#bundle\x00" + bytes(8) + b"\x00\x01\x00\x00"), ("empty", b""),
        ("random bytes", os.urandom(512)), ("one byte", b"/"), ("time tag only", message(ours, b",t")),
    ]


def osc_drops(port: int) -> float:
    text = http_call(port, "GET", "/metrics", headers={"Authorization": f"Bearer {ADMIN}"})[1]
    return sum(float(v) for v in re.findall(r'wanstream_osc_dropped_total\{reason="\w+"\} (\S+)', text))


# ------------------------------------------------------------------------------------------------ the run
def log_size(path: Path) -> int:
    return path.stat().st_size


def run_fuzz(port: int, osc_port: int | None, log_path: Path, rounds: int = 1, max_log_bytes: int = 512) -> dict:
    """Every class against a running server (token ``TOKEN``, admin ``ADMIN``); the report with its checks."""
    import threading

    from websockets.sync.client import connect
    admin = {"Authorization": f"Bearer {ADMIN}"}
    stack = contextlib.ExitStack()
    keeper = stack.enter_context(connect(f"ws://127.0.0.1:{port}/api/ws?format=raw&token={TOKEN}", open_timeout=30))
    ready = json.loads(keeper.recv(30))                 # a live stream to aim at (its id and secret)
    ctx = {"session": ready["session"], "secret": ready["secret"]}
    threading.Thread(target=lambda: [None for _ in keeper], daemon=True).start()   # read its stats (and pings)
    classes: dict[str, dict] = {}
    failures: list[str] = []

    def account(cls: str, results: list[tuple[str, int | None, bool, str]], size0: int) -> None:
        c = classes.setdefault(cls, {"requests": 0, "4xx": 0, "5xx": 0, "other": 0, "unexpected": 0,
                                     "log_bytes": 0, "statuses": Counter()})
        for name, status, ok, detail in results:
            c["requests"] += 1
            if status is not None:
                c["statuses"][status] += 1
                kind = "4xx" if 400 <= status < 500 else "5xx" if status >= 500 else "other"
                c[kind] += 1
            if not ok:
                c["unexpected"] += 1
                if len(failures) < 40:
                    failures.append(f"{cls}: {name}: {detail}")
        time.sleep(0.3)                                  # the log lines of the last requests
        c["log_bytes"] += log_size(log_path) - size0

    try:
        for _ in range(rounds):
            for cls, cases in http_cases(ctx).items():
                size0 = log_size(log_path)
                results = []
                for name, data, accepted in cases:
                    try:
                        status = raw_request(port, data)
                    except OSError as exc:
                        results.append((name, None, False, f"{type(exc).__name__}: {exc}"))
                        continue
                    results.append((name, status, status in accepted, f"HTTP {status}, expected {accepted}"))
                account(cls, results, size0)
            size0 = log_size(log_path)
            account("websocket", [(name, None, ok, detail) for name, ok, detail in websocket_cases(port)], size0)
            if osc_port is not None:
                datagrams = osc_datagrams(ctx["session"], ctx["secret"])
                before = osc_drops(port)
                size0 = log_size(log_path)
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                    for _, d in datagrams:
                        udp.sendto(d, ("127.0.0.1", osc_port))
                        time.sleep(0.01)
                time.sleep(0.5)
                osc_log = log_size(log_path) - size0    # (the /metrics polls below log lines of their own)
                deadline = time.monotonic() + 20
                while osc_drops(port) < before + len(datagrams) and time.monotonic() < deadline:
                    time.sleep(0.1)
                dropped = osc_drops(port) - before
                results = [(name, None, True, "") for name, _ in datagrams]
                if dropped != len(datagrams):
                    results.append(("all counted as dropped", None, False, f"{dropped:g} of {len(datagrams)}"))
                account("osc", results, log_size(log_path) - osc_log)
    finally:
        with contextlib.suppress(Exception):
            stack.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        health = http_call(port, "GET", "/api/health", headers=admin)
        if health[0] == 200 and health[1]["sessions"] == 0:
            break
        time.sleep(0.3)
    text = log_path.read_text(errors="replace")
    lines = text.splitlines()
    secrets_seen = [s for s in (TOKEN, ADMIN, ctx["secret"]) if s in text]
    checks = {
        "0 answers 5xx": all(c["5xx"] == 0 for c in classes.values()),
        "every answer as expected": all(c["unexpected"] == 0 for c in classes.values()),
        "no traceback or ERROR in the log": not [ln for ln in lines if "Traceback" in ln or " ERROR " in ln
                                                 or ln.startswith("ERROR")],
        f"at most {max_log_bytes} log bytes per request": all(
            c["log_bytes"] <= max_log_bytes * c["requests"] for c in classes.values()),
        f"no log line over {MAX_LINE} bytes": max((len(ln.encode()) for ln in lines), default=0) <= MAX_LINE,
        "no token or secret in the log": not secrets_seen,
        "healthy, no session left": health[0] == 200 and health[1]["status"] == "ok" and health[1]["sessions"] == 0,
    }
    for c in classes.values():
        c["statuses"] = dict(sorted(c["statuses"].items()))
    return {"classes": classes, "failures": failures, "checks": checks,
            "longest_log_line": max((len(ln.encode()) for ln in lines), default=0),
            "verdict": "pass" if all(checks.values()) else "fail"}


def print_report(report: dict) -> None:
    print(f"{'class':<18}{'requests':>9}{'4xx':>6}{'5xx':>6}{'other':>7}{'unexpected':>11}{'log bytes':>11}")
    for name, c in report["classes"].items():
        print(f"{name:<18}{c['requests']:>9}{c['4xx']:>6}{c['5xx']:>6}{c['other']:>7}{c['unexpected']:>11}"
              f"{c['log_bytes']:>11}")
    for failure in report["failures"][:40]:
        print(f"fuzz: unexpected: {failure}")
    for name, ok in report["checks"].items():
        print(f"fuzz: {'PASS' if ok else 'FAIL'} {name}")
    print(f"fuzz: verdict {report['verdict'].upper()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: a tiny random one)")
    ap.add_argument("--rounds", type=int, default=1, help="times every case is sent (default 1)")
    ap.add_argument("--max-log-bytes", type=int, default=512, help="log bytes allowed per request (default 512)")
    ap.add_argument("--json", type=Path, default=None, help="write the report here")
    ap.add_argument("--workdir", type=Path, default=None, help="server log and recordings (default: a temp dir)")
    args = ap.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="wanstream-fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        from wanstream.models.random_init import init_random
        model = init_random(workdir / "tiny-model", "tiny", seed=0, log=lambda *_: None)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:      # a free UDP port too
        probe.bind(("127.0.0.1", 0))
        osc_port = probe.getsockname()[1]
    # the token from the environment (as a deployment would): no token in the log at all, not even in the URL
    server = Server(model, workdir, 2, ["--osc-port", str(osc_port), "--idle-timeout", "600"],
                    env={"WANSTREAM_TOKEN": TOKEN})
    try:
        server.wait_ready()
        report = run_fuzz(server.port, osc_port, server.log_path, args.rounds, args.max_log_bytes)
    finally:
        server.stop()
    report["workdir"] = str(workdir)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print_report(report)
    return 0 if report["verdict"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
