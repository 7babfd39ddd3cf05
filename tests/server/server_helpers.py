"""Test helpers: an in-process server on a free 127.0.0.1 port, a WebSocket client, a background streamer.

Every loop here is bounded (by a count and a deadline) and stops by itself; all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import uvicorn
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from wanstream.server.app import create_app, uvicorn_config
from wanstream.server.frames import pack_raw, unpack_raw
from wanstream.server.settings import ServerSettings

W = H = 64   # the tiny model at 64x64 keeps the server tests fast on 2 CPU cores


def server_settings(tmp_path, **kw) -> ServerSettings:
    kw.setdefault("max_sessions", 4)
    return ServerSettings(width=W, height=H, record_dir=tmp_path / "recordings", **kw)


def wait_until(predicate, timeout: float = 60.0, what: str = "condition", interval: float = 0.02):
    """Poll ``predicate`` until it is true (bounded); AssertionError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class LiveServer:
    """``create_app`` served by uvicorn on a thread of this process (127.0.0.1, port picked by the OS)."""

    def __init__(self, model, settings, clock=time.perf_counter, **app_options):
        self.settings = settings
        self.app = create_app(model, settings, clock=clock, **app_options)
        self.manager = self.app.state.manager
        config = uvicorn_config(self.app, settings, log_level="warning", port=0)   # the settings of `serve`
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), 60, "server start")
        assert self.server.started, "server failed to start"
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/api/ws"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    def http(self, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
        """``(status, parsed JSON, text or bytes)`` of one request."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=dict(headers or {}))
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status, payload, ctype = r.status, r.read(), r.headers.get("content-type", "")
        except urllib.error.HTTPError as e:
            status, payload, ctype = e.code, e.read(), e.headers.get("content-type", "")
        if "json" in ctype:
            return status, json.loads(payload)
        return status, payload.decode() if ctype.startswith("text/") else payload


class WSClient:
    """A WebSocket session; a thread collects output frames and JSON messages."""

    def __init__(self, url: str, fmt: str = "raw", keep_frames: bool = True, headers: dict | None = None):
        sep = "&" if "?" in url else "?"
        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(connect(f"{url}{sep}format={fmt}", max_size=None, open_timeout=30,
                                                    close_timeout=5, additional_headers=headers))
        self.fmt = fmt
        self.keep_frames = keep_frames
        self.frames: list[tuple[int, np.ndarray]] = []
        self.frame_count = 0
        self.frame_times: list[float] = []     # arrival (time.monotonic) of each output frame
        self.messages: list[dict] = []
        self.closed = False
        self.close_code: int | None = None
        self._lock = threading.Lock()
        self._next_id = 0
        self.thread = threading.Thread(target=self._recv, daemon=True)
        self.thread.start()

    def _recv(self) -> None:
        try:
            for msg in self.ws:
                if isinstance(msg, bytes):
                    with self._lock:
                        self.frame_count += 1
                        self.frame_times.append(time.monotonic())
                        if self.keep_frames:
                            self.frames.append(unpack_raw(msg)[::-1] if self.fmt == "raw" else (-1, msg))
                else:
                    with self._lock:
                        self.messages.append(json.loads(msg))
        except ConnectionClosed:
            pass
        finally:
            self.closed = True
            self.close_code = self.ws.close_code

    # ------------------------------------------------------------------ sending
    def send_frame(self, image: np.ndarray, index: int = 0) -> None:
        self.ws.send(pack_raw(image, index))

    def send_bytes(self, data: bytes) -> None:
        self.ws.send(data)

    def send_text(self, text: str) -> None:
        self.ws.send(text)

    def send_json(self, obj) -> None:
        self.ws.send(json.dumps(obj))

    def request(self, obj: dict, timeout: float = 60) -> dict:
        """Send a control message with a fresh id and wait for the reply carrying it."""
        with self._lock:
            self._next_id += 1
            rid = self._next_id
        self.send_json({**obj, "id": rid})
        return wait_until(lambda: next((m for m in self.of_type(None) if m.get("id") == rid), None), timeout,
                          f"reply to {obj}")

    def stats(self) -> dict:
        return self.request({"type": "stats"})

    def params(self, **params) -> dict:
        return self.request({"type": "params", "params": params})

    # ------------------------------------------------------------------ reading
    def of_type(self, kind: str | None) -> list[dict]:
        with self._lock:
            return [m for m in self.messages if kind is None or m.get("type") == kind]

    def errors(self, code: str | None = None) -> list[dict]:
        return [m for m in self.of_type("error") if code is None or m["code"] == code]

    def ready(self, timeout: float = 30) -> dict:
        return wait_until(lambda: next(iter(self.of_type("ready")), None), timeout, "ready message")

    def wait_error(self, code: str, timeout: float = 30) -> dict:
        return wait_until(lambda: next(iter(self.errors(code)), None), timeout, f"error {code!r}")

    def wait_frames(self, n: int, timeout: float = 90) -> None:
        wait_until(lambda: self.frame_count >= n, timeout, f"{n} output frames")

    def close(self) -> None:
        try:
            self._stack.close()
        except Exception:  # noqa: BLE001
            pass
        self.thread.join(10)


def stream_until(client: WSClient, clip: np.ndarray, n: int, timeout: float = 120.0, fps: float = 30.0,
                 start: int = 0) -> int:
    """Send frames like a camera until the client has ``n`` output frames (bounded); returns frames sent.
    Works on a loaded machine, where a fixed number of frames may yield fewer outputs (newest-frame policy)."""
    deadline = time.monotonic() + timeout
    sent = 0
    while client.frame_count < n:
        if time.monotonic() > deadline or client.closed:
            raise AssertionError(f"{n} output frames not reached in {timeout:g} s ({client.frame_count} after "
                                 f"{sent} frames sent, closed={client.closed})")
        client.send_frame(clip[(start + sent) % len(clip)], start + sent)
        sent += 1
        time.sleep(1 / fps)
    return sent


class Streamer:
    """A healthy session streaming raw frames at ``fps`` on a thread (stops at ``close`` or after ``max_s``)."""

    def __init__(self, url: str, clip: np.ndarray, fps: float = 15.0, max_s: float = 240.0, id_base: int = 0,
                 keep_frames: bool = False):
        self.client = WSClient(url, "raw", keep_frames=keep_frames)
        self.ready = self.client.ready()
        self.id_base = id_base                  # frame ids sent: id_base, id_base + 1, ...
        self.clip = clip
        self.fps = fps
        self.max_s = max_s
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        end = time.monotonic() + self.max_s
        i = 0
        while not self._stop.is_set() and time.monotonic() < end and not self.client.closed:
            try:
                self.client.send_frame(self.clip[i % len(self.clip)], self.id_base + i)
            except (ConnectionClosed, OSError):
                return
            i += 1
            self._stop.wait(1 / self.fps)

    @property
    def outputs(self) -> int:
        return self.client.frame_count

    def assert_progress(self, n: int = 8, timeout: float = 90) -> None:
        """The session is still streaming: ``n`` more output frames arrive."""
        start = self.outputs
        wait_until(lambda: self.outputs >= start + n, timeout,
                   f"{n} more frames on the healthy session (closed={self.client.closed})")
        assert not self.client.closed

    def close(self) -> None:
        self._stop.set()
        self.thread.join(10)
        self.client.close()


def make_offer(video: bool = True, direction: str = "sendrecv") -> str:
    """A real SDP offer of an aiortc peer (a video transceiver and a data channel, as the page makes), gathered
    with no STUN server; the peer is closed right after, so this offer is never followed by a connection."""
    import asyncio

    from aiortc import RTCConfiguration, RTCPeerConnection

    async def run() -> str:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.createDataChannel("control")
        if video:
            pc.addTransceiver("video", direction=direction)
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp
    return asyncio.run(run())


def netns_prefix() -> list[str]:
    """A command prefix that runs a command in a new network namespace with only ``lo`` up (root + unshare),
    so nothing but loopback is reachable; [] where that is not possible."""
    import os
    import shutil
    import subprocess
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return []
    probe = subprocess.run(["unshare", "--net", "sh", "-c", "ip link set lo up"], capture_output=True)
    if probe.returncode != 0:
        return []
    return ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']


def clip_chunks(clip, n_chunks: int) -> list:
    """``(start, frames)`` of a clip's first ``n_chunks`` chunks (5 frames, then 4 each)."""
    bounds = [(0, 5)] + [(5 + 4 * k, 9 + 4 * k) for k in range(n_chunks - 1)]
    return [(a, clip[a:b]) for a, b in bounds]


def stream_in_lockstep(url, chunks, prompt, seed, change_at, wire_change, result, expect_after=None,
                       expect_end=None) -> None:
    """A raw-frame WebSocket client sends ``chunks`` one at a time, each handed to the model before the next (so
    no frame is dropped and the chunk boundaries match a reference run), with the live change ``wire_change``
    before chunk ``change_at``; waits for ``expect_after[k]`` (output indices) after chunk k and for
    ``expect_end`` at the end. Fills ``result`` (frames, errors, or exc: meant to run in a thread)."""
    try:
        c = WSClient(url, "raw")
        c.ready()
        c.params(prompt=prompt, seed=seed)
        sent = 0
        for k, (start, frames) in enumerate(chunks):
            if k == change_at:
                reply = c.params(**wire_change)
                assert reply["type"] == "params", reply
            for i, f in enumerate(frames):
                c.send_frame(f, start + i)
            sent += len(frames)
            wait_until(lambda: c.stats()["frames_to_model"] == sent, 120, f"chunk {k} handed to the model")
            if expect_after is not None:
                want = expect_after[k]
                wait_until(lambda: want <= {i for i, _ in c.frames}, 120, f"outputs after chunk {k}")
        if expect_end is not None:
            wait_until(lambda: expect_end <= {i for i, _ in c.frames}, 120, "the outputs of the last chunks")
        result["frames"] = list(c.frames)
        result["errors"] = c.errors()
        c.close()
    except BaseException as exc:  # noqa: BLE001 - reported by the test thread
        result["exc"] = exc


def run_threads(threads, timeout: float = 600.0) -> None:
    """Start the client threads together and wait for each (bounded)."""
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
