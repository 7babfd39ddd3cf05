"""WHIP ingest and WHEP egress (the IETF WebRTC-HTTP protocols): OBS publishes, any WHEP player watches.

``POST /whip/{stream}`` (body: an SDP offer, ``Content-Type: application/sdp``) starts a session from a WHIP
publisher such as OBS; the reply is ``201 Created`` with the SDP answer, ``Location`` (the resource URL,
``/whip/{stream}/{resource}``), an ``ETag`` naming the ICE session and, only when ICE servers are configured
(``--ice-server``; none by default, the same rule as ``/api/webrtc/offer``), one ``Link: <url>; rel="ice-server"``
per server. ``DELETE`` on the resource URL ends the session and frees its slot. ``POST /whep/{stream}`` lets a
WHEP player watch the restyled output of that stream (the publisher's own connection only sends); ``DELETE`` on
its resource URL ends that viewer only. ``OPTIONS`` on either endpoint answers ``204`` with ``Accept-Post:
application/sdp`` (and the ICE server links); ``PATCH`` (trickle ICE / ICE restart) is not supported: ``405``, as
RFC 9725 asks of servers without it. Other methods get ``405``, another content type ``415``, a malformed offer
``400``, an unknown stream ``404``, a stream name in use ``409``, no room ``503`` — never a 500.

Who may do what (the rule of :mod:`.auth`, unchanged):

- **the token** (``--token``, sent as ``Authorization: Bearer`` — OBS's "Bearer Token" field) is needed to publish
  *and* to watch when the server has one; without it nothing here is reachable. A stream name is a name, not a
  capability: every holder of the token may watch any stream by its name, as every holder may use the page.
- **steering** a WHIP stream (prompt, knobs, recording) is done over the HTTP API, ``POST
  /api/sessions/{id}/params``, and needs the stream's **secret** or the admin token, as for every stream. The 201
  reply names the session in ``X-Stream-Id`` and its secret in ``X-Stream-Secret``; a publisher that cannot read
  reply headers (OBS) may choose the secret itself with ``?secret=S`` on its WHIP URL (16-128 characters of
  ``A-Za-z0-9_-``) and then steer with that.
- **ending**: the resource URLs hold a random part only their creator learns (``Location``), so only the
  publisher can end its stream and only a viewer itself can end its viewing.
- **a viewer never steers**: a WHEP offer that sends media is refused (400), a viewer's data channel is never
  read, and a viewer's connection carries nothing into the session.

Bounds: one publisher per stream name; ``whep_max_viewers`` viewers per stream (more get 503, counted in
``wanstream_server_whep_viewers_refused_total``; ``wanstream_server_whep_viewers`` is the current count); a slow
viewer keeps only the newest frames (``VIEWER_QUEUE``); a peer that does not connect within ``offer_timeout_s``
is freed; the publisher's audio is read for the stream's audio features (modulation sources, :mod:`.audio`) and
analysed at most ``audio_max_rate`` times real time.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections import deque
from concurrent.futures import Executor

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response

from wanstream.server.auth import Caller, caller_of, same_secret
from wanstream.server.session import Session
from wanstream.server.sessions import ServerFull, SessionManager
from wanstream.server.webrtc import (
    AVAILABLE,
    MAX_SDP_CHARS,
    OutputTrack,
    VideoIngest,
    answer_offer,
    check_offer_sdp,
    close_peer,
    new_peer,
    watch_peer,
)

log = logging.getLogger("wanstream.server")

SDP_TYPE = "application/sdp"
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CHOSEN_SECRET = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
VIEWER_QUEUE = 2          # frames a viewer may lag behind before its oldest is dropped


class Feed:
    """One viewer's frames: the newest ``VIEWER_QUEUE`` kept; ``next()`` gives the next one, None once ended."""

    def __init__(self):
        self.frames: deque = deque(maxlen=VIEWER_QUEUE)
        self.ended = False
        self._ready = asyncio.Event()

    def push(self, frame) -> None:
        self.frames.append(frame)
        self._ready.set()

    def end(self) -> None:
        self.ended = True
        self._ready.set()

    async def next(self):
        while not self.ended:
            if self.frames:
                return self.frames.popleft()
            self._ready.clear()
            await self._ready.wait()
        return None


class Viewer:
    def __init__(self, pc, feed: Feed):
        self.id = secrets.token_urlsafe(18)
        self.etag = f'"{secrets.token_hex(8)}"'
        self.pc = pc
        self.feed = feed
        self.tasks: list[asyncio.Task] = []


class WhipStream:
    """A published stream: its session, the publisher's peer, the viewers; the output is fanned out to them."""

    def __init__(self, name: str, session: Session, pc):
        self.name = name
        self.session = session
        self.pc = pc
        self.resource = secrets.token_urlsafe(18)
        self.etag = f'"{secrets.token_hex(8)}"'
        self.viewers: dict[str, Viewer] = {}
        self.tasks: list[asyncio.Task] = []

    async def fan_out(self) -> None:
        """The session's paced output to every viewer (consumed even when nobody watches, so it never backs up)."""
        while True:
            out = await self.session.next_output()
            if out is None:
                return
            for viewer in list(self.viewers.values()):
                viewer.feed.push(out)


def _sdp_body(request: Request, body: bytes) -> str:
    """The request's SDP offer, or 415 / 400 naming the problem."""
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype != SDP_TYPE:
        raise HTTPException(415, f"the offer must be sent as Content-Type: {SDP_TYPE} (got {ctype[:60]!r})",
                            headers={"Accept-Post": SDP_TYPE})
    if len(body) > MAX_SDP_CHARS:
        raise HTTPException(400, f"the SDP offer is over {MAX_SDP_CHARS} bytes")
    try:
        sdp = body.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPException(400, "the SDP offer is not UTF-8 text") from None
    try:
        check_offer_sdp(sdp)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    return sdp


def _ice_links(settings) -> dict[str, str]:
    """``Link`` headers for the configured ICE servers (none by default)."""
    if not settings.ice_servers:
        return {}
    return {"Link": ", ".join(f'<{url}>; rel="ice-server"' for url in settings.ice_servers)}


def whip_router(manager: SessionManager, executor: Executor, peers: set) -> APIRouter:
    router = APIRouter()
    settings = manager.settings
    totals = manager.totals
    streams: dict[str, WhipStream] = {}
    refused_viewers = [0]
    totals.gauge("server_whip_streams", "WHIP streams being published", lambda: len(streams))
    totals.gauge("server_whep_viewers", "WHEP viewers watching now (all streams)",
                 lambda: sum(len(s.viewers) for s in list(streams.values())))
    totals.gauge("server_whep_viewers_refused", "WHEP viewers refused: the stream had whep_max_viewers already",
                 lambda: refused_viewers[0], counter=True)
    totals.limits(whep_max_viewers=settings.whep_max_viewers)

    async def caller(request: Request) -> Caller:
        return caller_of(request.scope)

    def need_aiortc() -> None:
        if not AVAILABLE:
            raise HTTPException(501, "WHIP / WHEP need the aiortc package")

    def stream_named(name: str) -> WhipStream:
        stream = streams.get(name) if NAME.match(name) else None
        if stream is None or stream.session.closed:
            raise HTTPException(404, f"no stream {name[:64]!r} is being published")
        return stream

    def created(answer: str, location: str, etag: str, extra: dict | None = None) -> Response:
        headers = {"Location": location, "ETag": etag, **_ice_links(settings), **(extra or {})}
        return Response(answer, status_code=201, media_type=SDP_TYPE, headers=headers)

    @router.options("/whip/{name}")
    @router.options("/whep/{name}")
    async def options(name: str):
        return Response(status_code=204, headers={"Accept-Post": SDP_TYPE, **_ice_links(settings)})

    # ------------------------------------------------------------------------------------------- WHIP
    @router.post("/whip/{name}")
    async def publish(name: str, request: Request, c: Caller = Depends(caller)):
        need_aiortc()
        if not NAME.match(name):
            raise HTTPException(400, "a stream name is 1-64 characters of A-Za-z0-9_-")
        sdp = _sdp_body(request, await request.body())
        if c.secret is not None and not CHOSEN_SECRET.match(c.secret):
            raise HTTPException(400, "a chosen stream secret (?secret=) is 16-128 characters of A-Za-z0-9_-")
        held = streams.get(name)
        if held is not None and not held.session.closed:    # (a closed one is being cleaned up: the name is free)
            raise HTTPException(409, f"the stream {name!r} is being published already (DELETE its resource "
                                     f"first, or choose another name)")
        try:
            session = manager.open("whip", asyncio.get_running_loop())
        except ServerFull as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": "10"}) from None
        if c.secret is not None:
            session.secret = c.secret
        pc = new_peer(settings, peers)
        stream = WhipStream(name, session, pc)
        streams[name] = stream
        ingest = VideoIngest(pc, session, executor, stream.tasks)   # OBS's audio: the stream's audio features

        async def cleanup():
            if streams.get(name) is stream:
                del streams[name]
            ingest.cancel()
            for viewer in list(stream.viewers.values()):
                await end_viewer(stream, viewer)
            await close_peer(pc, peers, stream.tasks)

        closing: list[asyncio.Task] = []
        session.on_close(lambda reason: closing.append(asyncio.ensure_future(cleanup())))
        try:
            answer = await answer_offer(pc, sdp, settings, ingest.require_video)
        except HTTPException:
            session.close("bad offer")
            raise
        stream.tasks.append(asyncio.ensure_future(stream.fan_out()))
        stream.tasks.append(watch_peer(pc, settings, totals, session.close, f"WHIP stream {name}"))
        log.info("WHIP stream %s: session %s", name, session.id[:8])
        return created(answer, f"/whip/{name}/{stream.resource}", stream.etag,
                       {"X-Stream-Id": session.id, "X-Stream-Secret": session.secret})

    @router.delete("/whip/{name}/{resource}")
    async def unpublish(name: str, resource: str):
        stream = stream_named(name)
        if not same_secret(resource, stream.resource):
            raise HTTPException(404, "no such WHIP resource")
        stream.session.close("ended by the publisher")
        return Response(status_code=200)

    # ------------------------------------------------------------------------------------------- WHEP
    async def end_viewer(stream: WhipStream, viewer: Viewer) -> None:
        if stream.viewers.pop(viewer.id, None) is None:
            return
        viewer.feed.end()
        await close_peer(viewer.pc, peers, viewer.tasks)

    @router.post("/whep/{name}")
    async def watch(name: str, request: Request):
        need_aiortc()
        stream = stream_named(name)
        sdp = _sdp_body(request, await request.body())
        if len(stream.viewers) >= settings.whep_max_viewers:
            refused_viewers[0] += 1
            raise HTTPException(503, f"the stream {name!r} has its {settings.whep_max_viewers} viewers already "
                                     f"(whep_max_viewers)", headers={"Retry-After": "10"})
        pc = new_peer(settings, peers)
        viewer = Viewer(pc, Feed())
        stream.viewers[viewer.id] = viewer
        sends = []
        pc.on("track", sends.append)            # a viewer only receives: anything it sends is refused below

        def only_receive() -> None:
            if sends:
                raise HTTPException(400, "a WHEP viewer only receives: its offer must not send media "
                                         "(direction recvonly)")
            pc.addTrack(OutputTrack(viewer.feed.next))

        try:
            answer = await answer_offer(pc, sdp, settings, only_receive)
        except HTTPException:
            await end_viewer(stream, viewer)
            raise
        if stream.session.closed:               # the stream ended while the answer was made
            await end_viewer(stream, viewer)
            raise HTTPException(404, f"the stream {name!r} ended")

        def end(reason: str) -> None:
            asyncio.ensure_future(end_viewer(stream, viewer))
        viewer.tasks.append(watch_peer(pc, settings, totals, end, f"WHEP viewer of {name}"))
        return created(answer, f"/whep/{name}/{viewer.id}", viewer.etag)

    @router.delete("/whep/{name}/{viewer_id}")
    async def unwatch(name: str, viewer_id: str):
        stream = stream_named(name)
        viewer = stream.viewers.get(viewer_id)
        if viewer is None:
            raise HTTPException(404, "no such WHEP resource")
        await end_viewer(stream, viewer)
        return Response(status_code=200)

    return router
