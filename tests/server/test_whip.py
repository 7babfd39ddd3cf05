"""WHIP ingest / WHEP egress: an aiortc publisher sends a generated clip over WHIP to a live server (tiny model,
127.0.0.1 only), aiortc WHEP viewers receive the restyled frames; DELETE ends a viewer or the stream; the HTTP
rules of RFC 9725 / the WHEP draft (201 + Location + ETag, 405 / 415 / 4xx, the token, the stream secret).

Every wait is bounded; frames are sent until a condition holds (never a fixed count that assumes speed).
"""

from __future__ import annotations

import asyncio
import fractions
import importlib.util
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from server_helpers import H, LiveServer, W, server_settings, wait_until

pytestmark = pytest.mark.skipif(importlib.util.find_spec("aiortc") is None, reason="WHIP / WHEP need aiortc")

TOKEN = "whip-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def request(srv, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """``(status, headers, body bytes)`` of one request (no JSON assumptions: WHIP bodies are SDP)."""
    url = path if path.startswith("http") else srv.base + path
    req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def sdp_post(srv, path: str, sdp: str, headers: dict | None = None):
    return request(srv, "POST", path, sdp.encode(), {"Content-Type": "application/sdp", **AUTH, **(headers or {})})


def metric(srv, name: str) -> float:
    _, _, text = request(srv, "GET", "/metrics", headers=AUTH)
    for line in text.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.fixture
def srv(tiny_model, tmp_path):
    settings = server_settings(tmp_path, token=TOKEN, webrtc_loopback_candidates=True, whep_max_viewers=2,
                               idle_timeout_s=60)
    # the process-wide aiortc settings the server applies at its first offer, applied now: the test's own peers
    # (in this process) then gather their 127.0.0.1 candidates too, the only ones the server uses
    from wanstream.server.webrtc import configure_aiortc
    configure_aiortc(settings.webrtc_bitrate_kbps, settings.loopback_only)
    with LiveServer(tiny_model, settings) as s:
        yield s


async def offer_of(pc) -> str:
    await pc.setLocalDescription(await pc.createOffer())      # aiortc gathers (no STUN) before this returns
    return pc.localDescription.sdp


def clip_track(clip: np.ndarray, fps: float = 15.0):
    """A video track playing ``clip`` in a loop at ``fps`` (a camera: frames are paced, with pts)."""
    from aiortc import VideoStreamTrack
    from av import VideoFrame

    class ClipTrack(VideoStreamTrack):
        def __init__(self):
            super().__init__()
            self.n = 0
            self.t0 = None

        async def recv(self):
            if self.t0 is None:
                self.t0 = time.monotonic()
            due = self.t0 + self.n / fps
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            frame = VideoFrame.from_ndarray(clip[self.n % len(clip)], format="rgb24")
            frame.pts, frame.time_base = self.n * 6000, fractions.Fraction(1, 90000)
            self.n += 1
            return frame
    return ClipTrack()


async def publisher(srv, clip, name: str, headers: dict | None = None, path: str | None = None,
                    audio: bool = False):
    """(peer, 201 headers) of an aiortc WHIP publisher sending ``clip`` (send-only, as OBS; with ``audio`` also
    an audio track of silence, as OBS sends one)."""
    from aiortc import AudioStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    if audio:
        pc.addTransceiver(AudioStreamTrack(), direction="sendonly")
    pc.addTransceiver(clip_track(clip), direction="sendonly")
    status, rh, body = await asyncio.to_thread(sdp_post, srv, path or f"/whip/{name}", await offer_of(pc), headers)
    assert status == 201, (status, body[:300])
    await pc.setRemoteDescription(RTCSessionDescription(sdp=body.decode(), type="answer"))
    return pc, rh


class WhepViewer:
    """An aiortc WHEP player: receive-only video; counts and keeps the frames it gets."""

    def __init__(self):
        from aiortc import RTCConfiguration, RTCPeerConnection
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.addTransceiver("video", direction="recvonly")
        self.frames: list[np.ndarray] = []
        self.tasks = []

        @self.pc.on("track")
        def on_track(track):
            self.tasks.append(asyncio.ensure_future(self._read(track)))

    async def _read(self, track):
        from aiortc.mediastreams import MediaStreamError
        try:
            while True:
                frame = await track.recv()
                self.frames.append(frame.to_ndarray(format="rgb24"))
        except MediaStreamError:
            pass

    async def start(self, srv, name: str):
        from aiortc import RTCSessionDescription
        status, rh, body = await asyncio.to_thread(sdp_post, srv, f"/whep/{name}", await offer_of(self.pc))
        if status != 201:
            return status, rh, body
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=body.decode(), type="answer"))
        return status, rh, body

    async def close(self):
        for t in self.tasks:
            t.cancel()
        await self.pc.close()


async def until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)


def test_whip_publish_whep_watch_delete(srv, clip):
    """The whole path: publish over WHIP, set the prompt over the HTTP API with the stream's secret, two WHEP
    viewers get restyled frames, a third is refused (bounded), a viewer's DELETE ends only it, the publisher's
    DELETE ends the session and frees it."""

    async def run():
        pub, rh = await publisher(srv, clip, "cam1")
        viewers = []
        try:
            location, etag = rh["Location"], rh["ETag"]
            assert location.startswith("/whip/cam1/") and len(location) > len("/whip/cam1/") + 16
            assert etag.startswith('"') and etag.endswith('"')
            assert rh["Content-Type"].startswith("application/sdp")
            assert rh.get("Link") is None                   # no ICE servers configured: no Link, no STUN
            sid, secret = rh["X-Stream-Id"], rh["X-Stream-Secret"]
            assert srv.manager.count == 1 and srv.manager.get(sid).transport == "whip"

            # parameters over the existing HTTP API: the secret steers, the token alone does not
            update = {"prompt": "a charcoal sketch"}
            code, reply = await asyncio.to_thread(srv.http, "POST", f"/api/sessions/{sid}/params", update, AUTH)
            assert code == 403, reply
            code, reply = await asyncio.to_thread(srv.http, "POST", f"/api/sessions/{sid}/params", update,
                                                  {**AUTH, "X-Stream-Secret": secret})
            assert code == 200 and reply["params"]["prompt"] == "a charcoal sketch", reply

            for _ in range(2):
                v = WhepViewer()
                viewers.append(v)
                status, vh, body = await v.start(srv, "cam1")
                assert status == 201, (status, body[:300])
                assert vh["Location"].startswith("/whep/cam1/") and vh["ETag"]
                assert "X-Stream-Secret" not in vh                # a viewer learns no authority over the stream
            # bounded: a third viewer is refused and counted
            extra = WhepViewer()
            status, _, _ = await extra.start(srv, "cam1")
            await extra.close()
            assert status == 503
            assert metric(srv, "wanstream_server_whep_viewers_refused_total") == 1
            assert metric(srv, "wanstream_server_whep_viewers") == 2

            await until(lambda: all(len(v.frames) >= 4 for v in viewers), 180, "4 frames on each WHEP viewer")
            for v in viewers:
                assert all(f.shape == (H, W, 3) for f in v.frames)
                assert np.std(v.frames[-1].astype(np.float32)) > 1.0     # a picture, not a blank frame
            session = srv.manager.get(sid)
            assert session.stats.summary()["frames_in"] > 0

            # a viewer's DELETE ends only that viewer
            status, _, _ = await asyncio.to_thread(request, srv, "DELETE", vh["Location"], None, AUTH)
            assert status == 200
            assert metric(srv, "wanstream_server_whep_viewers") == 1 and srv.manager.count == 1
            n = len(viewers[0].frames)
            await until(lambda: len(viewers[0].frames) >= n + 3, 120, "the other viewer keeps receiving")

            # the publisher's DELETE ends the session and frees it
            status, _, _ = await asyncio.to_thread(request, srv, "DELETE", location, None, AUTH)
            assert status == 200
            assert srv.manager.count == 0
            await until(lambda: metric(srv, "wanstream_server_whep_viewers") == 0
                        and metric(srv, "wanstream_server_whip_streams") == 0, 30, "stream and viewers freed")
            status, _, _ = await asyncio.to_thread(request, srv, "DELETE", location, None, AUTH)
            assert status == 404
            status, _, _ = await WhepViewer().start(srv, "cam1")
            assert status == 404
        finally:
            for v in viewers:
                await v.close()
            await pub.close()
    asyncio.run(run())
    wait_until(lambda: srv.manager.count == 0, 30, "no sessions left")


def test_publisher_may_choose_its_secret_and_leaving_frees_the_stream(srv, clip):
    """OBS cannot read reply headers: ``?secret=`` on the WHIP URL sets the stream's secret; audio + video as OBS
    sends them (the audio drained); a publisher that goes away (peer closed) frees the session and the name."""
    chosen = "obs-chosen-secret-0123"

    async def run():
        pub, rh = await publisher(srv, clip, "obs", path=f"/whip/obs?secret={chosen}", audio=True)
        try:
            assert rh["X-Stream-Secret"] == chosen
            sid = rh["X-Stream-Id"]
            code, reply = await asyncio.to_thread(srv.http, "POST", f"/api/sessions/{sid}/params",
                                                  {"steps": 1}, {**AUTH, "X-Stream-Secret": chosen})
            assert code == 200 and reply["params"]["steps"] == 1
            # the name is held while published
            from aiortc import RTCConfiguration, RTCPeerConnection
            other = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            other.addTransceiver(clip_track(clip), direction="sendonly")
            status, _, body = await asyncio.to_thread(sdp_post, srv, "/whip/obs", await offer_of(other))
            await other.close()
            assert status == 409, body[:200]
            await until(lambda: srv.manager.get(sid) is not None
                        and srv.manager.get(sid).stats.summary()["frames_in"] > 0, 60, "frames arriving")
        finally:
            await pub.close()
        await until(lambda: srv.manager.count == 0, 60, "the session freed after the publisher left")
        await until(lambda: metric(srv, "wanstream_server_whip_streams") == 0, 30, "the name freed")
    asyncio.run(run())


def test_whip_whep_refusals_are_4xx(srv, clip):
    """Wrong token, wrong content type, bad SDP, unknown stream, wrong method, a viewer that sends: 4xx, never 5xx;
    nothing is left behind."""
    from server_helpers import make_offer
    good = make_offer(direction="sendonly")
    # token
    assert request(srv, "POST", "/whip/a", good.encode(), {"Content-Type": "application/sdp"})[0] == 401
    status, headers, _ = request(srv, "POST", "/whip/a", good.encode(),
                                 {"Content-Type": "application/sdp", "Authorization": "Bearer wrong"})
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert sdp_post(srv, "/whep/a", good, {"Authorization": "Bearer wrong"})[0] == 401
    # content type, body, name
    assert request(srv, "POST", "/whip/a", good.encode(), {"Content-Type": "application/json", **AUTH})[0] == 415
    assert request(srv, "POST", "/whip/a", good.encode(), AUTH)[0] == 415
    status, _, body = sdp_post(srv, "/whip/a", "this is not SDP")
    assert status == 400 and b"v=0" in body
    status, _, body = sdp_post(srv, "/whip/a", "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"
                                               "a=garbage\r\n")
    assert status == 400, body
    assert sdp_post(srv, "/whip/a", make_offer(video=False))[0] == 400           # nothing to restyle
    assert sdp_post(srv, "/whip/a", make_offer(direction="recvonly"))[0] == 400  # sends no video
    assert sdp_post(srv, "/whip/bad%20name", good)[0] == 400
    assert request(srv, "POST", "/whip/a?secret=short", good.encode(),
                   {"Content-Type": "application/sdp", **AUTH})[0] == 400
    # unknown stream / resource
    assert sdp_post(srv, "/whep/nobody", make_offer(direction="recvonly"))[0] == 404
    assert request(srv, "DELETE", "/whip/nobody/xyz", None, AUTH)[0] == 404
    assert request(srv, "DELETE", "/whep/nobody/xyz", None, AUTH)[0] == 404
    # methods: GET / PUT on the endpoint, PATCH (no trickle ICE / ICE restart) on a resource
    assert request(srv, "GET", "/whip/a", None, AUTH)[0] == 405
    assert request(srv, "PUT", "/whep/a", b"x", AUTH)[0] == 405
    assert request(srv, "PATCH", "/whip/a/xyz", b"x", {"Content-Type": "application/trickle-ice-sdpfrag",
                                                       **AUTH})[0] == 405
    status, headers, _ = request(srv, "OPTIONS", "/whip/a", None, AUTH)
    assert status == 204 and headers["Accept-Post"] == "application/sdp" and headers.get("Link") is None
    assert srv.manager.count == 0
    sending_viewer = make_offer(direction="sendrecv")

    async def run():
        pub, rh = await publisher(srv, clip, "b")
        try:
            # a viewer whose offer sends video is refused (a viewer never feeds the stream)
            status, _, body = await asyncio.to_thread(sdp_post, srv, "/whep/b", sending_viewer)
            assert status == 400 and b"only receives" in body
            assert metric(srv, "wanstream_server_whep_viewers") == 0
            # the wrong resource id does not end someone else's stream
            status, _, _ = await asyncio.to_thread(request, srv, "DELETE", "/whip/b/not-the-resource", None, AUTH)
            assert status == 404 and srv.manager.count == 1
            status, _, _ = await asyncio.to_thread(request, srv, "DELETE", rh["Location"], None, AUTH)
            assert status == 200 and srv.manager.count == 0
        finally:
            await pub.close()
    asyncio.run(run())


def test_ice_servers_are_announced_only_when_configured(tiny_model, tmp_path):
    settings = server_settings(tmp_path, ice_servers=["stun:stun.invalid:3478", "turn:turn.invalid:3478"])
    with LiveServer(tiny_model, settings) as s:
        status, headers, _ = request(s, "OPTIONS", "/whep/x")
        assert status == 204
        assert headers["Link"] == '<stun:stun.invalid:3478>; rel="ice-server", <turn:turn.invalid:3478>; ' \
                                  'rel="ice-server"'


CHROMIUM = "/usr/bin/chromium"


class BackgroundPublisher:
    """The aiortc WHIP publisher on its own event loop thread (so a synchronous browser driver can run here)."""

    def __init__(self, srv, clip, name: str):
        import threading
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.pc, self.headers = asyncio.run_coroutine_threadsafe(publisher(srv, clip, name), self.loop).result(60)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.pc.close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_whep_player_page_in_headless_chromium(srv, clip, tmp_path):
    """The WHEP player page (/static/whep.html, what an OBS browser source loads) in Debian's Chromium plays the
    restyled output of a WHIP stream; closing the page ends that viewer (its DELETE), not the stream."""
    import os
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip("Debian chromium is not installed (run scripts/install_browser.sh as root)")
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("the playwright python package is not installed (run scripts/install_browser.sh)")
    from browser_driver import chromium_args, poll_js, watch_csp, write_y4m
    from playwright.sync_api import sync_playwright

    pub = BackgroundPublisher(srv, clip, "show")
    try:
        # mDNS host candidates off: the server uses only the 127.0.0.1 candidates of an offer
        args = chromium_args(write_y4m(tmp_path / "unused.y4m", seconds=0.2)) + \
            ["--disable-features=WebRtcHideLocalIpsWithMdns"]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
            try:
                page = browser.new_page()
                csp = watch_csp(page)                   # the player works under the server's CSP
                page.goto(f"{srv.base}/static/whep.html?stream=show&token={TOKEN}")
                if not poll_js(page, "window.whep && (whep.error !== null || document.getElementById('video')"
                                     ".getVideoPlaybackQuality().totalVideoFrames >= 5)", 180):
                    raise AssertionError(f"no frames in the player: {page.evaluate('JSON.stringify(window.whep)')}")
                assert csp == [], csp
                state = page.evaluate("""() => {
                    const v = document.getElementById('video');
                    const c = document.createElement('canvas');
                    c.width = v.videoWidth; c.height = v.videoHeight;
                    const g = c.getContext('2d'); g.drawImage(v, 0, 0);
                    const px = g.getImageData(0, 0, c.width, c.height).data;
                    let sum = 0, sq = 0, n = 0;
                    for (let i = 0; i < px.length; i += 4) { sum += px[i + 1]; sq += px[i + 1] ** 2; n++; }
                    const mean = sum / n;
                    return {error: whep.error, status: whep.status, resource: whep.resource,
                            width: v.videoWidth, height: v.videoHeight, std: Math.sqrt(sq / n - mean * mean)};
                }""")
                assert state["error"] is None, state
                assert (state["width"], state["height"]) == (W, H), state
                assert state["std"] > 1.0, state                       # a picture, not a blank frame
                assert state["resource"].startswith("/whep/show/")
                assert metric(srv, "wanstream_server_whep_viewers") == 1
                page.close(run_before_unload=True)                      # pagehide: the player DELETEs its resource
                wait_until(lambda: metric(srv, "wanstream_server_whep_viewers") == 0, 30, "the viewer ended")
                assert srv.manager.count == 1                           # the stream goes on
            finally:
                browser.close()
        status, _, _ = request(srv, "DELETE", pub.headers["Location"], None, AUTH)
        assert status == 200 and srv.manager.count == 0
    finally:
        pub.close()


def test_a_slow_viewer_keeps_only_the_newest_frames():
    """A viewer that falls behind gets the newest ``VIEWER_QUEUE`` frames, never a backlog; None once ended."""
    from wanstream.server.whip import VIEWER_QUEUE, Feed

    async def run():
        feed = Feed()
        for i in range(5):
            feed.push(i)
        got = [await feed.next() for _ in range(VIEWER_QUEUE)]
        assert got == list(range(5 - VIEWER_QUEUE, 5))
        waiter = asyncio.ensure_future(feed.next())
        await asyncio.sleep(0)
        feed.push(9)
        assert await asyncio.wait_for(waiter, 5) == 9
        feed.push(10)
        feed.end()
        assert await feed.next() is None
    asyncio.run(run())
