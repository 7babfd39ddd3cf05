"""WebRTC transport via aiortc: ``POST /api/webrtc/offer`` with ``{"sdp", "type": "offer"}`` → answer.

The page sends its camera as a video track (``contentHint = 'detail'``) and opens a data channel (any label)
before its offer; the answer holds the session's output track on the same transceiver. The data channel
carries the JSON control protocol of :mod:`.protocol` both ways, and ``stats`` every ``stats_interval_s``.
No trickle ICE: aiortc gathers while setting the local description, the page waits for its own gathering.

Pitfalls handled (transport notes): no STUN/TURN unless configured (``iceServers=[]``; aiortc's default is a
public STUN server); bound to loopback, aioice offers 127.0.0.1 (it skips it by default); optionally only the
offer's 127.0.0.1 candidates are used (hermetic tests); the incoming track is always drained and only the
newest frame is decoded (aiortc's receive queue is unbounded); decoding and the model never run on the event
loop; output frames carry pts / time_base (without them Chrome shows a fraction of the frames); the answer
asks Chrome for a bitrate floor and aiortc's encoder defaults are raised to the same floor (Chrome otherwise
stays near 300 kbit/s, which is poor input for a diffusion model).

Bounds: an offer is checked (SDP structure, a video section) before it takes a session slot, with a 400 naming
the problem; a session whose peer does not connect within ``offer_timeout_s`` is freed (counted in
``wanstream_server_webrtc_offers_expired_total``), so unfinished offers cannot hold the slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from concurrent.futures import Executor
from fractions import Fraction

from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from .frames import video_frame_to_rgb
from .protocol import error, handle_control, ready_message
from .sessions import ServerFull, Session, SessionManager
from .uplink import Uplink

log = logging.getLogger("wanstream.server")

try:
    import aioice.ice
    from aiortc import (MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCPeerConnection,
                        RTCSessionDescription)
    from aiortc.mediastreams import MediaStreamError
    from av import VideoFrame
    AVAILABLE = True
except ImportError:  # pragma: no cover - aiortc is a dependency, but the WebSocket path works without it
    AVAILABLE = False
    MediaStreamTrack = object

VIDEO_CLOCK = 90000
MAX_SDP_CHARS = 64 * 1024
SDP_LINE = re.compile(r"^[a-z]=")


class Offer(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    sdp: str = Field(max_length=MAX_SDP_CHARS)
    type: str = Field(pattern="^offer$")


def check_offer_sdp(sdp: str) -> None:
    """Raise ValueError naming what is wrong with an SDP offer's structure (before aiortc parses it)."""
    lines = [line for line in sdp.replace("\r\n", "\n").split("\n") if line.strip()]
    if not lines or lines[0].strip() != "v=0":
        raise ValueError("malformed SDP offer: it must start with the line 'v=0'")
    for number, line in enumerate(lines, 1):
        if not SDP_LINE.match(line):
            raise ValueError(f"malformed SDP offer: line {number} is not of the form 'x=value': {line[:60]!r}")
    media = [line[2:].split(" ", 1)[0] for line in lines if line.startswith("m=")]
    if not media:
        raise ValueError("malformed SDP offer: it has no media section (no 'm=' line)")
    if "video" not in media:
        raise ValueError(f"the offer has no video track to restyle (its media sections: {', '.join(media)})")


_configured = False


def configure_aiortc(bitrate_kbps: int, loopback_only: bool) -> None:
    """Process-wide aiortc / aioice settings (the server process owns them)."""
    global _configured
    if _configured or not AVAILABLE:
        return
    import aiortc.codecs.h264 as h264
    import aiortc.codecs.vpx as vpx
    floor = bitrate_kbps * 1000
    for codec in (vpx, h264):
        codec.MIN_BITRATE = floor
        codec.DEFAULT_BITRATE = floor
        codec.MAX_BITRATE = max(codec.MAX_BITRATE, 2 * floor)
    if loopback_only:
        aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=True: ["127.0.0.1"]
    _configured = True


def add_bitrate_hints(sdp: str, kbps: int) -> str:
    """Ask Chrome for a bitrate floor on VP8 / H264 (``x-google-*`` fmtp parameters; other browsers ignore them)."""
    hint = f"x-google-min-bitrate={kbps};x-google-start-bitrate={kbps};x-google-max-bitrate={2 * kbps}"
    lines = sdp.splitlines()
    payloads = {m.group(1) for line in lines if (m := re.match(r"a=rtpmap:(\d+) (VP8|H264)/90000", line))}
    with_fmtp = set()
    out = []
    for line in lines:
        m = re.match(r"a=fmtp:(\d+) (.*)", line)
        if m and m.group(1) in payloads:
            line = f"{line};{hint}"
            with_fmtp.add(m.group(1))
        out.append(line)
    final = []
    for line in out:
        final.append(line)
        m = re.match(r"a=rtpmap:(\d+) VP8/90000", line)
        if m and m.group(1) not in with_fmtp:
            final.append(f"a=fmtp:{m.group(1)} {hint}")
    return "\r\n".join(final) + "\r\n"


def keep_loopback_candidates(sdp: str) -> str:
    """Drop every offered ICE candidate that is not 127.0.0.1 (hermetic tests: only loopback traffic)."""
    kept = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            parts = line.split()
            if len(parts) < 6 or parts[4] != "127.0.0.1" or parts[2].lower() != "udp":
                continue
        kept.append(line)
    return "\r\n".join(kept) + "\r\n"


class SessionTrack(MediaStreamTrack):
    """The session's paced output as a video track, with a 90 kHz presentation clock."""

    kind = "video"

    def __init__(self, session: Session):
        super().__init__()
        self.session = session
        self._t0: float | None = None
        self._last_pts = -1

    async def recv(self):
        out = await self.session.next_output()
        if out is None:
            self.stop()
            raise MediaStreamError
        frame = VideoFrame.from_ndarray(out.image, format="rgb24")
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        pts = max(int((now - self._t0) * VIDEO_CLOCK), self._last_pts + 1)
        self._last_pts = pts
        frame.pts, frame.time_base = pts, Fraction(1, VIDEO_CLOCK)
        return frame


def webrtc_router(manager: SessionManager, executor: Executor, peers: set) -> APIRouter:
    router = APIRouter()
    settings = manager.settings

    @router.post("/api/webrtc/offer")
    async def offer(body: Offer):
        if not AVAILABLE:
            raise HTTPException(501, "WebRTC needs the aiortc package; use the WebSocket transport")
        try:
            check_offer_sdp(body.sdp)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        configure_aiortc(settings.webrtc_bitrate_kbps, settings.loopback_only)
        loop = asyncio.get_running_loop()
        try:
            session = manager.open("webrtc", loop)
        except ServerFull as exc:
            return JSONResponse(error(exc.code, str(exc)), status_code=503)
        config = RTCConfiguration(iceServers=[RTCIceServer(urls=u) for u in settings.ice_servers])
        pc = RTCPeerConnection(config)
        peers.add(pc)
        tasks: list[asyncio.Task] = []
        channels: list = []
        w, h = session.width, session.height
        uplink = Uplink(session, executor, lambda f: (video_frame_to_rgb(f, w, h), None))
        got_video = []
        connected = []

        def send(msg: dict) -> None:
            for ch in channels:
                if ch.readyState == "open":
                    with contextlib.suppress(Exception):
                        ch.send(json.dumps(msg))

        session.add_listener(send)

        async def pump(track):
            with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
                while True:
                    uplink.offer(await track.recv())
            session.close("disconnected")

        async def push_stats():
            while True:
                await asyncio.sleep(settings.stats_interval_s)
                send(session.stats_message())

        @pc.on("track")
        def on_track(track):
            if track.kind == "video" and not got_video:
                got_video.append(track)
                pc.addTrack(SessionTrack(session))
                tasks.append(asyncio.ensure_future(pump(track)))

        @pc.on("datachannel")
        def on_datachannel(channel):
            channels.append(channel)

            @channel.on("message")
            def on_message(message):
                if isinstance(message, str):
                    reply = handle_control(session, message)
                else:
                    session.stats.count("bad_messages")
                    reply = error("bad_message", "the data channel takes JSON text messages only")
                if reply is not None:
                    send(reply)

            @channel.on("close")
            def on_channel_close():
                session.close("disconnected")

            send(ready_message(session))

        @pc.on("connectionstatechange")
        async def on_state():
            if pc.connectionState == "connected":
                connected.append(True)
            if pc.connectionState in ("failed", "closed"):
                session.close("disconnected" if pc.connectionState == "closed" else "connection failed")

        async def expire():
            await asyncio.sleep(settings.offer_timeout_s)
            if not connected and not session.closed:
                manager.totals.add("webrtc_offers_expired")
                log.info("session %s: the peer did not connect within %g s", session.id[:8], settings.offer_timeout_s)
                session.close("offer expired")

        async def cleanup():
            for t in list(tasks):
                t.cancel()
            uplink.cancel()
            with contextlib.suppress(Exception):
                await pc.close()
            peers.discard(pc)

        closing: list[asyncio.Task] = []
        session.on_close(lambda reason: closing.append(asyncio.ensure_future(cleanup())))
        sdp = keep_loopback_candidates(body.sdp) if settings.webrtc_loopback_candidates else body.sdp
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        except Exception as exc:  # noqa: BLE001 - aiortc raises many kinds on a malformed offer
            session.close("bad offer")
            raise HTTPException(400, f"malformed SDP offer: {type(exc).__name__}: {str(exc)[:300]}") from None
        if not got_video:
            session.close("bad offer")
            raise HTTPException(400, "the offer's video section carries no track from the client (it must send "
                                     "its camera: direction sendrecv or sendonly)")
        try:
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:  # noqa: BLE001
            session.close("bad offer")
            raise HTTPException(400, f"cannot answer this offer: {type(exc).__name__}: {str(exc)[:300]}") from None
        tasks.append(asyncio.ensure_future(push_stats()))
        tasks.append(asyncio.ensure_future(expire()))
        answer = add_bitrate_hints(pc.localDescription.sdp, settings.webrtc_bitrate_kbps)
        return {**ready_message(session), "sdp": answer, "type": "answer"}

    return router
