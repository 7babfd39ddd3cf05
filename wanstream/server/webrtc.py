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

The peer plumbing is shared with WHIP / WHEP (:mod:`.whip`): ``new_peer`` (ICE servers only when configured),
``answer_offer`` (offer → answer, 400 naming the problem), ``watch_peer`` (connection state, offer expiry),
``VideoIngest`` (a peer's video into a session), ``OutputTrack`` (frames out with a 90 kHz clock), ``close_peer``.

Bounds: an offer is checked (SDP structure, a video section, ICE credentials, a DTLS fingerprint and role, RTCP
mux: what aiortc only fails on later) before it takes a session slot, with a 400 naming the problem; a session
whose peer does not connect within ``offer_timeout_s`` is freed (counted in
``wanstream_server_webrtc_offers_expired_total``), so unfinished offers cannot hold the slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import Executor
from fractions import Fraction

from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from wanstream.server.audio import frame_to_mono
from wanstream.server.frames import video_frame_to_rgb
from wanstream.server.protocol import error, handle_control, ready_message
from wanstream.server.session import Session
from wanstream.server.sessions import ServerFull, SessionManager
from wanstream.server.uplink import Uplink

log = logging.getLogger("wanstream.server")

try:
    import aioice.ice
    from aiortc import MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
    from aiortc import sdp as aiortc_sdp
    from aiortc.mediastreams import MediaStreamError
    from aiortc.rtcdtlstransport import X509_DIGEST_ALGORITHMS
    from av import VideoFrame
    AVAILABLE = True
except ImportError:  # pragma: no cover - aiortc is a dependency, but the WebSocket path works without it
    AVAILABLE = False
    MediaStreamTrack = object
    MediaStreamError = RuntimeError

VIDEO_CLOCK = 90000
MAX_SDP_CHARS = 64 * 1024
SDP_LINE = re.compile(r"^[a-z]=")


class Offer(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    sdp: str = Field(max_length=MAX_SDP_CHARS)
    type: str = Field(pattern="^offer$")


def check_offer_sdp(sdp: str) -> None:
    """Raise ValueError naming what is wrong with an SDP offer (before it takes a session slot): its structure,
    a video section, and what the connection cannot do without (aiortc would only fail later, on a slot): ICE
    credentials, a DTLS fingerprint of a supported algorithm and a setup role in every section, RTCP mux for
    media."""
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
        raise ValueError(f"the offer has no video track to restyle (its media sections: {', '.join(media)[:200]})")
    if AVAILABLE:
        _check_transport(sdp)


def _check_transport(sdp: str) -> None:
    try:
        description = aiortc_sdp.SessionDescription.parse(sdp)
    except Exception as exc:  # noqa: BLE001 - the parser raises many kinds (and asserts) on garbage
        raise ValueError(f"malformed SDP offer: it cannot be parsed ({type(exc).__name__})") from None
    for number, m in enumerate(description.media, 1):
        where = f"malformed SDP offer: media section {number} ({m.kind[:20]})"
        if not m.ice.usernameFragment or not m.ice.password:
            raise ValueError(f"{where} has no ICE credentials (a=ice-ufrag, a=ice-pwd)")
        if m.dtls is None:
            raise ValueError(f"{where} has no DTLS role (a=setup)")
        if not any(f.algorithm.lower() in X509_DIGEST_ALGORITHMS for f in m.dtls.fingerprints):
            raise ValueError(f"{where} has no DTLS fingerprint of a supported algorithm (a=fingerprint: "
                             f"{', '.join(X509_DIGEST_ALGORITHMS)})")
        if m.kind in ("audio", "video") and not m.rtcp_mux:
            raise ValueError(f"{where} does not multiplex RTCP (a=rtcp-mux)")


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


class OutputTrack(MediaStreamTrack):
    """Output frames as a video track with a 90 kHz presentation clock; ``next_frame()`` gives the next
    ``OutputFrame`` (awaited) or None at the end (a session's paced output, or a WHEP viewer's feed)."""

    kind = "video"

    def __init__(self, next_frame):
        super().__init__()
        self.next_frame = next_frame
        self._t0: float | None = None
        self._last_pts = -1

    async def recv(self):
        out = await self.next_frame()
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


def new_peer(settings, peers: set):
    """A peer connection with the configured ICE servers only (none by default: no STUN), tracked in ``peers``
    (closed at shutdown). Configures aiortc on first use."""
    configure_aiortc(settings.webrtc_bitrate_kbps, settings.loopback_only)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[RTCIceServer(urls=u) for u in settings.ice_servers]))
    peers.add(pc)
    return pc


async def answer_offer(pc, sdp: str, settings, prepare: Callable[[], None] | None = None) -> str:
    """Apply a (structure-checked) SDP offer and return the answer (with the bitrate hints). ``prepare()`` runs
    between the two (tracks are known then: add output tracks, refuse what does not fit by raising
    HTTPException). A malformed or unanswerable offer raises HTTPException(400) naming the problem; the caller
    frees what it allocated."""
    if settings.webrtc_loopback_candidates:
        sdp = keep_loopback_candidates(sdp)
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
    except Exception as exc:  # noqa: BLE001 - aiortc raises many kinds on a malformed offer
        raise HTTPException(400, f"malformed SDP offer: {type(exc).__name__}: {str(exc)[:300]}") from None
    if prepare is not None:
        prepare()
    try:
        await pc.setLocalDescription(await pc.createAnswer())
    except Exception as exc:  # noqa: BLE001
        raise HTTPException(400, f"cannot answer this offer: {type(exc).__name__}: {str(exc)[:300]}") from None
    return add_bitrate_hints(pc.localDescription.sdp, settings.webrtc_bitrate_kbps)


def watch_peer(pc, settings, totals, end: Callable[[str], None], what: str) -> asyncio.Task:
    """Call ``end(reason)`` when the peer's connection fails or closes, or when it has not connected within
    ``offer_timeout_s`` (counted in ``webrtc_offers_expired``). Returns the expiry task (cancel it at the end)."""
    connected = []

    @pc.on("connectionstatechange")
    async def on_state():
        if pc.connectionState == "connected":
            connected.append(True)
        if pc.connectionState in ("failed", "closed"):
            end("disconnected" if pc.connectionState == "closed" else "connection failed")

    async def expire():
        await asyncio.sleep(settings.offer_timeout_s)
        if not connected:
            totals.add("webrtc_offers_expired")
            log.info("%s: the peer did not connect within %g s", what, settings.offer_timeout_s)
            end("offer expired")
    return asyncio.ensure_future(expire())


async def close_peer(pc, peers: set, tasks: list[asyncio.Task]) -> None:
    """Cancel a peer's tasks, close it, forget it."""
    for t in list(tasks):
        t.cancel()
    with contextlib.suppress(Exception):
        await pc.close()
    peers.discard(pc)


class VideoIngest:
    """A peer's first video track feeds ``session`` (through an :class:`Uplink`: the newest frames decoded off the
    loop); its first audio track feeds the session's audio features (:mod:`.audio`, modulation sources); any other
    track is drained unread, as aiortc's receive queues are unbounded.
    ``on_video(track)`` runs when the video track appears; the session closes when that track ends."""

    def __init__(self, pc, session: Session, executor: Executor, tasks: list[asyncio.Task],
                 on_video: Callable[[object], None] | None = None):
        w, h = session.width, session.height
        self.session = session
        self.uplink = Uplink(session, executor, lambda f: (video_frame_to_rgb(f, w, h, session.params.fit), None))
        self.tasks = tasks
        self.on_video = on_video
        self.got_video = False
        self.got_audio = False
        pc.on("track", self._on_track)

    def _on_track(self, track) -> None:
        if track.kind == "video" and not self.got_video:
            self.got_video = True
            if self.on_video is not None:
                self.on_video(track)
            self.tasks.append(asyncio.ensure_future(self._pump(track)))
        elif track.kind == "audio" and not self.got_audio:
            self.got_audio = True
            self.tasks.append(asyncio.ensure_future(self._listen(track)))
        else:
            self.tasks.append(asyncio.ensure_future(self._drain(track)))

    async def _pump(self, track) -> None:
        with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
            while True:
                self.uplink.offer(await track.recv())
        self.session.close("disconnected")

    async def _listen(self, track) -> None:
        """The peer's audio → the session's audio features (a frame that cannot be read is skipped)."""
        live = self.session.live
        with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
            while True:
                frame = await track.recv()
                try:
                    live.audio_in(*frame_to_mono(frame))
                except ValueError:
                    self.session.stats.count("bad_frames")

    @staticmethod
    async def _drain(track) -> None:
        with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
            while True:
                await track.recv()

    def require_video(self) -> None:
        """For :func:`answer_offer`: 400 unless the offer sends a video track."""
        if not self.got_video:
            raise HTTPException(400, "the offer's video section carries no track from the client (it must send "
                                     "video: direction sendrecv or sendonly)")

    def cancel(self) -> None:
        self.uplink.cancel()


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
        loop = asyncio.get_running_loop()
        try:
            session = manager.open("webrtc", loop)
        except ServerFull as exc:
            return JSONResponse(error(exc.code, str(exc)), status_code=503)
        pc = new_peer(settings, peers)
        tasks: list[asyncio.Task] = []
        channels: list = []
        ingest = VideoIngest(pc, session, executor, tasks,
                             on_video=lambda track: pc.addTrack(OutputTrack(session.next_output)))

        def send(msg: dict) -> None:
            for ch in channels:
                if ch.readyState == "open":
                    with contextlib.suppress(Exception):
                        ch.send(json.dumps(msg))

        session.add_listener(send)

        async def push_stats():
            while True:
                await asyncio.sleep(settings.stats_interval_s)
                send(session.stats_message())

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

        async def cleanup():
            ingest.cancel()
            await close_peer(pc, peers, tasks)
            session.manager.worker.memory_released()     # the peer's codecs and buffers are free now

        closing: list[asyncio.Task] = []
        session.on_close(lambda reason: closing.append(asyncio.ensure_future(cleanup())))
        try:
            answer = await answer_offer(pc, body.sdp, settings, ingest.require_video)
        except HTTPException:
            session.close("bad offer")
            raise
        tasks.append(asyncio.ensure_future(push_stats()))
        tasks.append(watch_peer(pc, settings, manager.totals, session.close, f"session {session.id[:8]}"))
        return {**ready_message(session), "sdp": answer, "type": "answer"}

    return router
