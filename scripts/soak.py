#!/usr/bin/env python
"""Soak and fuzz the live server: many clients, many cycles, hostile inputs; then a verdict.

Starts ``python -m wanstream.server`` (the code of ``wanstream serve``) on a free 127.0.0.1 port with a tiny random
model (or ``--model``), then runs ``--sessions`` clients for ``--minutes``. Each client repeats cycles of
connect → stream → prompt changes (every prompt new) → record on / off → a malformed input → abort or close
→ reconnect, over the WebSocket (raw frames, so every output frame names its input frame) and, every third
cycle, over WebRTC (aiortc; some of those offers are never connected). Meanwhile it samples the server's RSS,
threads, open fds and sessions.

Phases: a warm-up (one WebSocket and one WebRTC cycle per client), a pause (no sessions) for the warm
baseline, the soak, a pause for the end figures. Verdict (exit 0 only if all hold):

- memory: RSS at the end within ``--max-growth-mib`` of the warm baseline (both with no session open);
- 0 leaked sessions (health and opened == closed) and 0 leaked threads / fds against the warm baseline;
- 0 frames crossed between streams (an output frame whose id its own connection never sent);
- 0 server errors: no 5xx, every malformed input answered as documented, no model errors, no tracebacks or
  ERROR lines in the server log.

    python scripts/soak.py --minutes 1 --sessions 4              # what CI runs (tests/server/test_soak.py)
    python scripts/soak.py --minutes 20 --sessions 8 --json soak.json

Only loopback traffic; every loop is bounded by the deadline. Progress shows on stderr (tqdm).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import itertools
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wanstream.server.frames import pack_raw, unpack_raw  # noqa: E402

ADMIN = "soak-admin-" + os.urandom(8).hex()
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}        # also the token, when the server has one (fuzz.py)
W = H = 64


# ------------------------------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_sample(pid: int) -> dict:
    """RSS (MiB), threads and open fds of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
    return {"rss_mib": round(rss, 1), "threads": threads, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def thread_names(pid: int) -> dict[str, int]:
    """How many threads of each name a process has (to tell which ones stayed)."""
    names: dict[str, int] = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            name = Path(f"/proc/{pid}/task/{task}/comm").read_text().strip()
            names[name] = names.get(name, 0) + 1
    return dict(sorted(names.items()))


class Server:
    def __init__(self, model: Path, workdir: Path, sessions: int, extra: list[str], env: dict | None = None):
        self.port = free_port()
        self.log_path = workdir / "server.log"
        self.record_dir = workdir / "recordings"
        self._log = open(self.log_path, "w")
        cmd = [sys.executable, "-m", "wanstream.server", "--model", str(model), "--port", str(self.port),
               "--resolution", f"{W}x{H}", "--max-sessions", str(sessions), "--record-dir", str(self.record_dir),
               "--webrtc-loopback-candidates", "--admin-token", ADMIN, "--idle-timeout", "30",
               "--offer-timeout", "5", "--device", "cpu", *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                if http_call(self.port, "GET", "/api/health", headers=ADMIN_AUTH)[0] == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.3)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()

    def sample(self) -> dict:
        return proc_sample(self.proc.pid)

    def health(self) -> dict:
        return http_call(self.port, "GET", "/api/health", headers=ADMIN_AUTH)[1]

    def metrics(self) -> dict[str, float]:
        text = http_call(self.port, "GET", "/metrics", headers=ADMIN_AUTH)[1]
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out

    def log_problems(self) -> list[str]:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [line for line in lines if "Traceback" in line or " ERROR " in line or line.startswith("ERROR")]


def http_call(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
              timeout: float = 30) -> tuple[int, object]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        r = conn.getresponse()
        payload = r.read()
    finally:
        conn.close()
    if "json" in r.getheader("content-type", ""):
        return r.status, json.loads(payload)
    return r.status, payload.decode("utf-8", "replace")


# ----------------------------------------------------------------------------------------------- bookkeeping
@dataclass
class Tally:
    cycles: dict = field(default_factory=lambda: {"websocket": 0, "webrtc": 0, "webrtc_unfinished": 0})
    frames_sent: int = 0
    frames_out: int = 0
    frames_crossed: int = 0
    prompts: int = 0
    record_toggles: int = 0
    aborts: int = 0
    full: int = 0
    malformed: dict = field(default_factory=dict)       # name → times answered as documented
    malformed_dropped: int = 0                          # bad frames dropped unread (newest frames are kept)
    problems: list = field(default_factory=list)        # server errors / unexpected answers (first 50 kept)
    server_errors: int = 0
    cycles_without_output: int = 0
    _prompt_ids = itertools.count()

    def problem(self, text: str, server_error: bool = True) -> None:
        self.server_errors += server_error
        if len(self.problems) < 50:
            self.problems.append(text)

    def next_prompt(self, client: int) -> str:
        self.prompts += 1
        return f"soak prompt {next(self._prompt_ids)} from client {client}: a painting of a harbour, style {client}"


class ServerFullError(Exception):
    pass


# --------------------------------------------------------------------------------------------- malformed input
def malformed_http(port: int, sid: str, secret: str, other_sid: str | None) -> list[tuple[str, bool, str]]:
    """Hostile HTTP requests against a live stream: (name, answered as documented, what came back)."""
    own = {"Content-Type": "application/json", "X-Stream-Secret": secret}
    cases = [
        ("params_nan", "POST", f"/api/sessions/{sid}/params", b'{"noise_scale": NaN}', own, 422),
        ("params_infinity", "POST", f"/api/sessions/{sid}/params", b'{"seed": 1e999}', own, 422),
        ("params_surrogate", "POST", f"/api/sessions/{sid}/params", b'{"prompt": "\\ud800"}', own, 422),
        ("params_deep_json", "POST", f"/api/sessions/{sid}/params", b"[" * 3000 + b"]" * 3000, own, 400),
        ("params_no_secret", "POST", f"/api/sessions/{sid}/params", b'{"recording": true}',
         {"Content-Type": "application/json"}, 403),
        ("offer_nan", "POST", "/api/webrtc/offer", b'{"sdp": NaN, "type": "offer"}',
         {"Content-Type": "application/json"}, 422),
        ("offer_bad_sdp", "POST", "/api/webrtc/offer", b'{"sdp": "v=0\\r\\nhello", "type": "offer"}',
         {"Content-Type": "application/json"}, 400),
        ("big_body", "POST", "/api/webrtc/offer", b"{" + b" " * (300 << 10) + b"}",
         {"Content-Type": "application/json"}, 413),
        ("dns_rebinding_host", "GET", "/api/health", None, {"Host": "attacker.example"}, 403),
        ("cross_site_post", "POST", "/api/webrtc/offer", b'{"sdp": "v=0", "type": "offer"}',
         {"Content-Type": "application/json", "Origin": "http://attacker.example"}, 403),
        ("docs", "GET", "/openapi.json", None, {}, 404),
        # the classes of issue 19 (scripts/fuzz.py sends every case of each)
        ("host_bad_ipv6", "GET", "/api/health", None, {"Host": "[::1"}, 403),
        ("origin_brackets", "GET", "/api/health", None, {"Origin": "http://[zz]"}, 403),
        ("recording_name_long", "GET", "/api/recordings/" + "a" * 5000 + ".mp4", None, {}, 404),
        ("preset_lora_path_long", "POST", "/api/presets/validate",
         json.dumps({"loras": [{"path": "a/" * 3000}]}).encode(), {"Content-Type": "application/json"}, 422),
        ("offer_no_fingerprint", "POST", "/api/webrtc/offer", json.dumps({"sdp": NO_FINGERPRINT_SDP,
                                                                         "type": "offer"}).encode(),
         {"Content-Type": "application/json"}, 400),
    ]
    if other_sid:                  # 404 when that stream ended meanwhile
        cases.append(("steer_other_stream", "POST", f"/api/sessions/{other_sid}/params", b'{"recording": true}',
                      own, (403, 404)))
    name, method, path, body, headers, expect = random.choice(cases)
    try:
        status, reply = http_call(port, method, path, body, headers)
    except OSError as exc:
        return [(name, False, f"{type(exc).__name__}: {exc}")]
    return [(name, status in (expect if isinstance(expect, tuple) else (expect,)), f"HTTP {status} {str(reply)[:200]}")]


NO_FINGERPRINT_SDP = "\r\n".join([
    "v=0", "o=- 1 1 IN IP4 127.0.0.1", "s=-", "t=0 0", "m=video 9 UDP/TLS/RTP/SAVPF 96", "c=IN IP4 0.0.0.0",
    "a=mid:0", "a=rtcp-mux", "a=ice-ufrag:soak", "a=ice-pwd:soaksoaksoaksoaksoaksoak", "a=setup:actpass",
    "a=rtpmap:96 VP8/90000", ""])


def half_sent_headers(port: int, timeout_s: float) -> tuple[str, bool, str]:
    """A request whose headers never finish: the server must close the connection (header timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        try:
            closed = sock.recv(100) == b""
        except (TimeoutError, socket.timeout):
            closed = False
    return ("half_sent_headers", closed, "closed by the server" if closed else f"held {timeout_s:g} s")


WS_MALFORMED = [   # (name, payload, the error code the server answers with; a frame may be dropped unread)
    ("ws_bad_json", "{not json", "bad_json"),
    ("ws_nan_param", '{"type": "params", "params": {"noise_scale": NaN}}', "bad_params"),
    ("ws_surrogate_prompt", '{"type": "params", "params": {"prompt": "\\udc00"}}', "bad_params"),
    ("ws_unknown_field", '{"type": "params", "params": {"evil": 1}}', "bad_params"),
    ("ws_not_jpeg", b"definitely not an image", "not_jpeg"),
    ("ws_broken_raw", b"WSRF\x00\x01", "bad_raw"),
]


# -------------------------------------------------------------------------------------------------- clients
class Soak:
    def __init__(self, server: Server, sessions: int, clip: np.ndarray, webrtc: bool, tally: Tally):
        self.server = server
        self.sessions = sessions
        self.clip = clip
        self.webrtc = webrtc
        self.t = tally
        self.live: dict[int, str] = {}        # client → its current session id (a target for "steer another")
        self.ids = itertools.count(1)

    async def run_clients(self, deadline: float, warm_up: bool = False) -> None:
        await asyncio.gather(*(self.client(k, deadline, warm_up) for k in range(self.sessions)))

    async def client(self, k: int, deadline: float, warm_up: bool) -> None:
        """Cycles until the deadline; ``warm_up``: one WebSocket and one WebRTC cycle (every code path once)."""
        rng = random.Random(k)
        for cycle in itertools.count():
            if time.monotonic() > deadline or (warm_up and cycle == (2 if self.webrtc else 1)):
                return
            kind = "webrtc" if self.webrtc and cycle % 3 == (1 if warm_up else 2) else "websocket"
            try:
                if kind == "webrtc":
                    await self.webrtc_cycle(k, rng, unfinished=not warm_up and rng.random() < 0.25)
                else:
                    await self.ws_cycle(k, rng, deadline)
            except ServerFullError:
                self.t.full += 1
                await asyncio.sleep(0.5 + rng.random())
                continue
            except Exception as exc:  # noqa: BLE001 - a client failure is a finding, not a crash of the soak
                self.t.problem(f"client {k} {kind} cycle: {type(exc).__name__}: {exc}", server_error=False)
                await asyncio.sleep(1.0)
            finally:
                self.live.pop(k, None)

    # ------------------------------------------------------------------ WebSocket
    async def ws_cycle(self, k: int, rng: random.Random, deadline: float) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed

        url = f"ws://127.0.0.1:{self.server.port}/api/ws?format=raw"
        async with connect(url, max_size=None, open_timeout=30, close_timeout=5) as ws:
            ready = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if ready.get("code") == "server_full":
                raise ServerFullError
            if ready.get("type") != "ready":
                raise RuntimeError(f"unexpected first message {ready}")
            sid, secret = ready["session"], ready["secret"]
            self.live[k] = sid
            self.t.cycles["websocket"] += 1
            sent: set[int] = set()
            errors: list[dict] = []
            outputs = [0]

            async def receive():
                with contextlib.suppress(ConnectionClosed):
                    async for msg in ws:
                        if isinstance(msg, bytes):
                            _, index = unpack_raw(msg)
                            outputs[0] += 1
                            if index not in sent:
                                self.t.frames_crossed += 1
                        else:
                            m = json.loads(msg)
                            if m.get("type") == "error":
                                errors.append(m)

            receiver = asyncio.ensure_future(receive())
            length = rng.uniform(4.0, 9.0)
            t0 = time.monotonic()
            actions = sorted(rng.uniform(0.5, length - 0.5) for _ in range(4))
            recording = False
            expected: list[tuple[str, str]] = []
            i = 0
            try:
                while time.monotonic() - t0 < length and time.monotonic() < deadline + 30:
                    index = k * 100_000_000 + next(self.ids) % 100_000_000
                    sent.add(index)
                    await ws.send(pack_raw(self.clip[i % len(self.clip)], index))
                    self.t.frames_sent += 1
                    i += 1
                    while actions and time.monotonic() - t0 > actions[0]:
                        actions.pop(0)
                        step = len(actions)
                        if step in (3, 1):                          # a new prompt, sometimes blended in
                            params = {"prompt": self.t.next_prompt(k), "transition_chunks": rng.choice([0, 0, 2])}
                            await ws.send(json.dumps({"type": "params", "params": params}))
                        elif step == 2:                             # record on (off at the end)
                            recording = not recording
                            self.t.record_toggles += 1
                            await ws.send(json.dumps({"type": "params", "params": {"recording": recording}}))
                        else:                                       # one hostile input
                            name, payload, code = rng.choice(WS_MALFORMED)
                            await ws.send(payload)
                            expected.append((name, code, isinstance(payload, bytes)))
                            other = next((s for c, s in self.live.items() if c != k), None)
                            for item in await asyncio.to_thread(malformed_http, self.server.port, sid, secret,
                                                                other):
                                self.record_malformed(*item)
                    await asyncio.sleep(1 / 15)
                if recording:
                    self.t.record_toggles += 1
                    await ws.send(json.dumps({"type": "params", "params": {"recording": False}}))
                wait_until = time.monotonic() + 60
                while outputs[0] == 0 and time.monotonic() < wait_until:
                    await asyncio.sleep(0.2)
                await asyncio.sleep(0.5)                            # let the replies of the last messages arrive
                if outputs[0] == 0:
                    self.t.cycles_without_output += 1
                    self.t.problem(f"client {k}: no output frame in a websocket cycle", server_error=False)
                for name, code, is_frame in expected:
                    ok = any(e.get("code") == code for e in errors)
                    if ok or not is_frame:
                        self.record_malformed(name, ok, json.dumps(errors[-3:])[:300])
                    else:                               # newest-frame policy: dropped before decoding
                        self.t.malformed_dropped += 1
                for e in errors:
                    if e.get("code") in ("model_error", "internal"):
                        self.t.problem(f"client {k}: {e}")
                if rng.random() < 0.3:                              # an abrupt end: no close handshake
                    self.t.aborts += 1
                    ws.transport.abort()
            finally:
                receiver.cancel()
                with contextlib.suppress(BaseException):
                    await receiver
                self.t.frames_out += outputs[0]

    def record_malformed(self, name: str, ok: bool, detail: str) -> None:
        self.t.malformed[name] = self.t.malformed.get(name, 0) + ok
        if not ok:
            self.t.problem(f"malformed input {name} not answered as documented: {detail}",
                           server_error=detail.startswith("HTTP 5"))

    # ------------------------------------------------------------------ WebRTC
    async def webrtc_cycle(self, k: int, rng: random.Random, unfinished: bool) -> None:
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
        from aiortc.mediastreams import MediaStreamError, VideoStreamTrack
        from av import VideoFrame

        clip = self.clip

        class Camera(VideoStreamTrack):
            def __init__(self):
                super().__init__()
                self.n = 0

            async def recv(self):
                await asyncio.sleep(1 / 15)
                frame = VideoFrame.from_ndarray(clip[self.n % len(clip)], format="rgb24")
                frame.pts, frame.time_base = self.n * 6000, Fraction(1, 90000)
                self.n += 1
                return frame

        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        camera = Camera()
        try:
            channel = pc.createDataChannel("control")
            pc.addTransceiver(camera, direction="sendrecv")
            outputs = [0]
            got_track = asyncio.get_running_loop().create_future()

            @pc.on("track")
            def on_track(track):
                if not got_track.done():
                    got_track.set_result(track)

            await pc.setLocalDescription(await pc.createOffer())
            body = json.dumps({"sdp": pc.localDescription.sdp, "type": "offer"}).encode()
            status, answer = await asyncio.to_thread(http_call, self.server.port, "POST", "/api/webrtc/offer", body,
                                                     {"Content-Type": "application/json"})
            if status == 503:
                raise ServerFullError
            if status != 200:
                self.t.problem(f"client {k}: offer answered HTTP {status}: {str(answer)[:200]}",
                               server_error=status >= 500)
                return
            self.live[k] = answer["session"]
            if unfinished:                          # an offer never followed by a connection
                self.t.cycles["webrtc_unfinished"] += 1
                return
            self.t.cycles["webrtc"] += 1
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
            track = await asyncio.wait_for(got_track, 30)

            async def consume():
                with contextlib.suppress(MediaStreamError):
                    while True:
                        await track.recv()
                        outputs[0] += 1

            consumer = asyncio.ensure_future(consume())
            try:
                length = rng.uniform(5.0, 9.0)
                t0 = time.monotonic()
                opened = time.monotonic() + 30
                while channel.readyState != "open" and time.monotonic() < opened:
                    await asyncio.sleep(0.1)
                prompt_at, record_at = rng.uniform(1, length / 2), rng.uniform(length / 2, length - 1)
                recording = False
                while time.monotonic() - t0 < length:
                    now = time.monotonic() - t0
                    if prompt_at is not None and now > prompt_at and channel.readyState == "open":
                        channel.send(json.dumps({"type": "params", "params": {"prompt": self.t.next_prompt(k)}}))
                        prompt_at = None
                    if record_at is not None and now > record_at and channel.readyState == "open":
                        channel.send(json.dumps({"type": "params", "params": {"recording": True}}))
                        self.t.record_toggles += 1
                        recording, record_at = True, None
                    await asyncio.sleep(0.1)
                if recording and channel.readyState == "open":
                    channel.send(json.dumps({"type": "params", "params": {"recording": False}}))
                    self.t.record_toggles += 1
                wait_until = time.monotonic() + 60
                while outputs[0] == 0 and time.monotonic() < wait_until:
                    await asyncio.sleep(0.2)
                if outputs[0] == 0:
                    self.t.cycles_without_output += 1
                    self.t.problem(f"client {k}: no output frame in a WebRTC cycle", server_error=False)
            finally:
                consumer.cancel()
                with contextlib.suppress(BaseException):
                    await consumer
                self.t.frames_out += outputs[0]
        finally:
            camera.stop()
            await pc.close()


# --------------------------------------------------------------------------------------------------- phases
def quiesce(server: Server, warm: dict | None, timeout: float = 90) -> dict:
    """Wait for no sessions, then (given a baseline) for threads / fds to come back to it; one sample."""
    deadline = time.monotonic() + timeout
    while server.health()["sessions"] and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(2.0)
    sample = server.sample()
    while warm is not None and time.monotonic() < deadline and (
            sample["threads"] > warm["threads"] or sample["fds"] > warm["fds"]):
        time.sleep(1.0)
        sample = server.sample()
    return {**sample, "sessions": server.health()["sessions"], "thread_names": thread_names(server.proc.pid),
            "prompt_cache_bytes": server.metrics().get("wanstream_prompt_cache_bytes", 0.0)}


def sampler(server: Server, samples: list, stop: threading.Event, period: float = 2.0) -> None:
    t0 = time.monotonic()
    while not stop.wait(period):
        with contextlib.suppress(Exception):
            samples.append({"t": round(time.monotonic() - t0, 1), **server.sample(),
                            "sessions": server.health()["sessions"]})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=1.0, help="soak duration after the warm-up")
    ap.add_argument("--sessions", type=int, default=4, help="concurrent clients (and the server's --max-sessions)")
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: a tiny random one)")
    ap.add_argument("--max-growth-mib", type=float, default=64.0,
                    help="RSS allowed above the warm baseline at the end (default 64)")
    ap.add_argument("--no-webrtc", action="store_true", help="WebSocket clients only")
    ap.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                    help="one more argument for `wanstream serve` (repeatable), "
                         "e.g. --server-arg=--max-recording-files=9999")
    ap.add_argument("--json", type=Path, default=None, help="write the full report here")
    ap.add_argument("--workdir", type=Path, default=None, help="server log and recordings (default: a temp dir)")
    args = ap.parse_args(argv)
    from tqdm import tqdm

    from wanstream.io.video import make_motion_clip
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="wanstream-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        from wanstream.models.random_init import init_random
        model = init_random(workdir / "tiny-model", "tiny", seed=0, log=lambda *_: None)
    webrtc = not args.no_webrtc
    if webrtc:
        try:
            import aioice.ice
            import aiortc  # noqa: F401
        except ImportError:
            webrtc = False
        else:  # the client offers 127.0.0.1 (aioice skips loopback by default); the server keeps only those
            aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=True: ["127.0.0.1"]
    clip = make_motion_clip(48, W, H, seed=3)
    tally = Tally()
    if not 1 <= args.sessions <= 40:
        ap.error("--sessions must be in 1..40 (frame ids are partitioned per client)")
    server = Server(model, workdir, args.sessions, args.server_arg)
    samples: list[dict] = []
    stop = threading.Event()
    report: dict = {"minutes": args.minutes, "sessions": args.sessions, "webrtc": webrtc, "workdir": str(workdir)}
    try:
        server.wait_ready()
        report["cold"] = server.sample()
        threading.Thread(target=sampler, args=(server, samples, stop), daemon=True).start()
        soak = Soak(server, args.sessions, clip, webrtc, tally)
        print(f"soak: server on port {server.port}, {args.sessions} clients, warm-up ...", file=sys.stderr)
        asyncio.run(soak.run_clients(time.monotonic() + 180, warm_up=True))
        report["warm"] = warm = quiesce(server, None)
        t_end = time.monotonic() + args.minutes * 60
        with tqdm(total=round(args.minutes * 60), unit="s", desc="soak", file=sys.stderr, disable=None) as bar:
            def tick():
                while not stop.is_set() and time.monotonic() < t_end:
                    time.sleep(1.0)
                    bar.n = min(bar.total, round(args.minutes * 60 - (t_end - time.monotonic())))
                    bar.set_postfix(prompts=tally.prompts, toggles=tally.record_toggles, crossed=tally.frames_crossed,
                                    errors=tally.server_errors, refresh=False)
                    bar.refresh()
            threading.Thread(target=tick, daemon=True).start()
            asyncio.run(soak.run_clients(t_end))
        for _, ok, detail in [half_sent_headers(server.port, 20.0)]:
            soak.record_malformed("half_sent_headers", ok, detail)
        report["end"] = end = quiesce(server, warm)
        stop.set()
        metrics = server.metrics()
        log_problems = server.log_problems()
    finally:
        stop.set()
        server.stop()
    for line in log_problems[:10]:
        tally.problem(f"server log: {line[:300]}")
    tally.server_errors += max(0, len(log_problems) - 10)
    opened = metrics.get("wanstream_server_sessions_opened_total", 0)
    closed = metrics.get("wanstream_server_sessions_closed_total", 0)
    worker_errors = metrics.get("wanstream_server_worker_errors_total", 0)
    if worker_errors:
        tally.problem(f"{worker_errors:g} model worker errors")
    peak = max([s["rss_mib"] for s in samples] + [warm["rss_mib"], end["rss_mib"]])
    cache_growth = (end["prompt_cache_bytes"] - warm["prompt_cache_bytes"]) / 2**20
    growth = end["rss_mib"] - warm["rss_mib"] - max(0.0, cache_growth)   # the prompt cache is bounded on its own
    report.update({
        "peak_rss_mib": peak, "rss_growth_mib": round(growth, 1), "prompt_cache_growth_mib": round(cache_growth, 1),
        "leaked_sessions": int(max(end["sessions"], opened - closed)),
        "leaked_threads": max(0, end["threads"] - warm["threads"]), "leaked_fds": max(0, end["fds"] - warm["fds"]),
        "cycles": tally.cycles, "full_answers": tally.full, "frames_sent": tally.frames_sent,
        "frames_out": tally.frames_out, "frames_crossed": tally.frames_crossed,
        "distinct_prompts": tally.prompts, "record_toggles": tally.record_toggles, "aborts": tally.aborts,
        "malformed_answered": tally.malformed, "malformed_frames_dropped": tally.malformed_dropped,
        "cycles_without_output": tally.cycles_without_output,
        "server_errors": tally.server_errors, "problems": tally.problems,
        "counters": {k: v for k, v in metrics.items() if k.startswith(("wanstream_server_", "wanstream_prompt_"))},
        "samples": samples,
    })
    checks = {
        f"memory within {args.max_growth_mib:g} MiB of the warm baseline": growth <= args.max_growth_mib,
        "0 leaked sessions": report["leaked_sessions"] == 0,
        "0 leaked threads": report["leaked_threads"] == 0,
        "0 leaked fds": report["leaked_fds"] == 0,
        "0 frames crossed": tally.frames_crossed == 0,
        "0 server errors": tally.server_errors == 0,
        "every cycle streamed": tally.cycles_without_output == 0 and tally.frames_out > 0,
    }
    report["checks"] = checks
    report["verdict"] = "pass" if all(checks.values()) else "fail"
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(f"soak: {args.minutes:g} min, {args.sessions} clients, cycles {tally.cycles}, "
          f"{tally.prompts} distinct prompts, {tally.record_toggles} record toggles, {tally.aborts} aborts")
    print(f"soak: RSS MiB cold {report['cold']['rss_mib']} / warm {warm['rss_mib']} / peak {peak} / end "
          f"{end['rss_mib']} (growth {growth:+.1f} beyond the prompt cache's {cache_growth:+.1f}); "
          f"threads {warm['threads']} → {end['threads']}; fds "
          f"{warm['fds']} → {end['fds']}; frames out {tally.frames_out}, crossed {tally.frames_crossed}")
    print(f"soak: malformed inputs answered as documented: {tally.malformed}")
    for problem in tally.problems[:20]:
        print(f"soak: problem: {problem}")
    for name, ok in checks.items():
        print(f"soak: {'PASS' if ok else 'FAIL'} {name}")
    print(f"soak: verdict {report['verdict'].upper()}")
    return 0 if report["verdict"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
