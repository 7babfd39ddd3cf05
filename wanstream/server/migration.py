"""Live migration: a WebSocket stream moves to another server behind the load balancer; its output goes on with no
frame lost or repeated, and the same numbers.

**Out** — ``POST /api/sessions/{id}/migrate`` (the admin token or the stream's secret), and the SIGTERM drain
(:func:`migrate_all`) when a peer has room:

1. the client is told ``{"type": "migrate", "state": "start"}`` (the page stops sending frames; frames still on
   their way wait in the stream's queue and travel along);
2. the model worker parks the stream (:mod:`wanstream.engine.parking`) with its input held, so nothing more enters;
3. the output frames made so far are sent (the paced queue empties);
4. its blob (:mod:`wanstream.engine.blob`: the parked state, its queued frames, the session's id, secret,
   parameters and frame numbering) is POSTed to ``{migrate_to}/api/migrations`` with the admin token — through a
   load balancer, which sends it to a ready server;
5. the answer carries a resume token, the load balancer names the server (``X-Wanstream-Server``): the client's
   last message here is ``{"type": "redirect", "url": "/api/ws?resume=TOKEN&server=NAME", ...}`` and the session
   ends here (reason ``migrated``). On any failure the stream resumes here, the client is told
   ``{"type": "migrate", "state": "cancelled"}`` and the caller gets the reason.

**In** — ``POST /api/migrations`` (admin token; the body, at most ``max_blob_bytes``, is the blob): everything is
checked before anything changes — 413 too large, 400 corrupt / truncated / malformed, 422 another format version,
model, resolution or device, 503 no room, 409 that session is here already. Then a session holding the parked
stream waits ``resume_timeout_s`` for its client, which continues it with ``GET /api/ws?resume=TOKEN`` (the same
session id and secret; its next frame resumes the stream). The servers of one deployment share the admin token.

``/metrics``: ``wanstream_server_migrations_{out,in,failed}_total``, ``wanstream_server_blobs_refused_total``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
import urllib.error
import urllib.request

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from wanstream.api.params import SessionParams
from wanstream.engine.blob import BlobError, dumps, loads
from wanstream.engine.parking import StateError, check
from wanstream.server.auth import BLOB_PATH as MIGRATIONS_PATH
from wanstream.server.auth import Caller
from wanstream.server.sessions import ServerFull, SessionExists, SessionManager

log = logging.getLogger("wanstream.server")

ID_RE = re.compile(r"^[0-9a-f]{32}$")
BLOB_STATUS = {"too_large": 413, "malformed": 400, "version": 422}


class MigrationError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Migrations:
    """Both directions of one server (see the module docstring)."""

    def __init__(self, manager: SessionManager):
        self.manager = manager
        self.counts = {"migrations_out": 0, "migrations_in": 0, "migrations_failed": 0, "blobs_refused": 0}
        docs = {"migrations_out": "Streams moved to another server", "migrations_in": "Streams taken from another "
                "server (blob accepted)", "migrations_failed": "Migrations out that failed (the stream stayed)",
                "blobs_refused": "Migration blobs refused (too large, corrupt, another version, model or size)"}
        for key, doc in docs.items():
            manager.totals.gauge(f"server_{key}", doc, lambda key=key: self.counts[key], counter=True)
        manager.totals.limits(max_blob_bytes=manager.settings.max_blob_bytes,
                              resume_timeout_s=manager.settings.resume_timeout_s)

    # ------------------------------------------------------------------------------------------ out
    async def migrate(self, session, why: str = "requested") -> dict:
        """Move one stream out (see the module docstring); :class:`MigrationError` when it stays here."""
        m, st = self.manager, self.manager.settings
        if st.migrate_to is None:
            raise MigrationError(409, "this server has no migration target (serve --migrate-to URL)")
        if st.admin_token is None:
            raise MigrationError(409, "migrations need the admin token the servers share (serve --admin-token-file)")
        if session.transport != "websocket":
            raise MigrationError(409, f"{session.transport} streams cannot migrate (WebSocket streams can)")
        if session.freeze or session.resume_token is not None or session.closed:
            raise MigrationError(409, "this stream is migrating already, or not connected")
        if session.stream is None and session.parked is None:
            raise MigrationError(409, "this stream has not started yet")
        loop = asyncio.get_running_loop()
        session.notify({"type": "migrate", "state": "start",
                        "message": "This stream moves to another server: hold on to the frames until redirected."})
        with session._lock:
            session.freeze = True
            session.buffer.held = True
        m.worker.notify()
        try:
            await _until(lambda: session.parked is not None or session.closed, 60, "the stream to park")
            await _until(lambda: len(session.pacer) == 0 or session.closed, 30, "its output to be sent")
            if session.closed:
                raise MigrationError(409, "the stream ended while it was being moved")
            blob = await loop.run_in_executor(None, self.export, session)
            status, body, server = await loop.run_in_executor(None, _post, st.migrate_to.rstrip("/") +
                                                              MIGRATIONS_PATH, st.admin_token, blob,
                                                              st.blob_timeout_s)
            if status != 201 or not isinstance(body, dict) or not isinstance(body.get("resume"), str):
                why = (body.get("message") or body.get("detail")) if isinstance(body, dict) else body
                raise MigrationError(502, f"the target refused the stream: HTTP {status}: {why}")
        except Exception as exc:
            self.counts["migrations_failed"] += 1
            with session._lock:
                session.freeze = False
                session.buffer.held = session._held()
            m.worker.notify()                        # it resumes here on its next frame
            session.notify({"type": "migrate", "state": "cancelled", "message": f"the stream stays here ({exc})"})
            log.warning("session %s: migration failed (%s): %s", session.id[:8], why, exc)
            if isinstance(exc, MigrationError):
                raise
            raise MigrationError(502, f"the migration failed: {type(exc).__name__}: {exc}") from None
        token = body["resume"]
        url = f"/api/ws?resume={token}" + (f"&server={server}" if server else "")
        session.handoff = {"type": "redirect", "reason": "migrated", "url": url, "resume": token, "server": server,
                           "session": session.id, "message": "This stream continues on another server."}
        session.close("migrated")
        self.counts["migrations_out"] += 1
        log.info("session %s migrated to %s (%s)", session.id[:8], server or st.migrate_to, why)
        return {"migrated": True, "session": session.id, "server": server}

    def export(self, session) -> bytes:
        """The blob of a parked session (its stream, queued frames and the session's own values)."""
        head, images = session.buffer.snapshot()
        extra = {"session": {"id": session.id, "secret": session.secret, "params": session.params.model_dump(),
                             "arrivals": session._arrivals, "width": session.width, "height": session.height},
                 "buffer": head}
        return dumps(session.parked, self.manager.clock(), extra, images)

    async def migrate_all(self, why: str) -> int:
        """Move every WebSocket stream out while a peer has room (the drain); returns how many moved."""
        st = self.manager.settings
        if st.migrate_to is None or st.admin_token is None:
            return 0
        moved = 0
        loop = asyncio.get_running_loop()
        for session in self.manager.list():
            if session.transport != "websocket" or session.closed or (session.stream is None and
                                                                      session.parked is None):
                continue
            status, _, _ = await loop.run_in_executor(None, _get, st.migrate_to.rstrip("/") + "/api/ready",
                                                      st.admin_token)
            if status != 200:
                log.info("drain: no peer has room (%s/api/ready: %s); the streams stay", st.migrate_to, status)
                break
            try:
                await self.migrate(session, why)
                moved += 1
            except MigrationError as exc:
                log.info("drain: session %s stays: %s", session.id[:8], exc)
        return moved

    # ------------------------------------------------------------------------------------------ in
    def accept(self, data: bytes, loop) -> dict:
        """Take a blob (on a worker thread): checked, then a session waiting for its client. Raises
        :class:`MigrationError` (nothing changed)."""
        m, st = self.manager, self.manager.settings
        try:
            parked, extra, images = loads(data, st.max_blob_bytes, m.clock())
        except BlobError as exc:
            self.counts["blobs_refused"] += 1
            raise MigrationError(BLOB_STATUS[exc.kind], str(exc)) from None
        try:
            width, height = check(m.engine, parked)
            if (width, height) != (st.width, st.height):
                raise StateError(f"the stream is {width}x{height}, this server serves {st.width}x{st.height}")
            info = extra["session"]
            sid, secret = info["id"], info["secret"]
            if not isinstance(sid, str) or not ID_RE.match(sid) or not isinstance(secret, str) or \
                    not 16 <= len(secret) <= 64:
                raise StateError("the blob's session id or secret is malformed")
            params = SessionParams.model_validate(info["params"])
            arrivals = info["arrivals"]
            if isinstance(arrivals, bool) or not isinstance(arrivals, int) or arrivals < 0:
                raise StateError("the blob's frame numbering is malformed")
        except (StateError, ValidationError, KeyError, TypeError) as exc:
            self.counts["blobs_refused"] += 1
            raise MigrationError(422, f"this server cannot take the stream: {exc}") from None
        token = secrets.token_urlsafe(24)
        try:
            session = m.adopt(sid, secret, params, parked, extra["buffer"], images, extra["_shift"], arrivals, token,
                              loop)
        except ServerFull as exc:
            raise MigrationError(503, str(exc)) from None
        except SessionExists as exc:
            raise MigrationError(409, str(exc)) from None
        except (ValueError, KeyError, TypeError, IndexError) as exc:   # its input queue is malformed
            self.counts["blobs_refused"] += 1
            raise MigrationError(422, f"this server cannot take the stream: bad input queue ({exc})") from None
        self.counts["migrations_in"] += 1
        log.info("session %s migrated in; waiting %g s for its client", session.id[:8], st.resume_timeout_s)
        return {"session": session.id, "resume": token, "expires_s": st.resume_timeout_s}


async def _until(predicate, timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise MigrationError(504, f"timed out waiting for {what}")
        await asyncio.sleep(interval)


def _post(url: str, admin_token: str, blob: bytes, timeout: float) -> tuple[int, object, str | None]:
    """POST a blob; ``(status, JSON body or text, the load balancer's server name)``."""
    req = urllib.request.Request(url, data=blob, method="POST", headers={
        "Authorization": f"Bearer {admin_token}", "Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, payload, headers = r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        status, payload, headers = e.code, e.read(), e.headers
    try:
        body = json.loads(payload)
    except ValueError:
        body = payload[:300].decode(errors="replace")
    server = headers.get("X-Wanstream-Server")
    if server is None:
        cookie = re.search(r"wanstream_server=([A-Za-z0-9_.-]+)", headers.get("Set-Cookie", ""))
        server = cookie.group(1) if cookie else None
    return status, body, server if server and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", server) else None


def _get(url: str, admin_token: str, timeout: float = 5.0) -> tuple[int, object, None]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {admin_token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, None, None
    except urllib.error.HTTPError as e:
        return e.code, None, None
    except OSError:
        return 0, None, None


def migration_router(manager: SessionManager, migrations: Migrations, controlled, caller) -> APIRouter:
    router = APIRouter()

    @router.post("/api/sessions/{session_id}/migrate")
    async def migrate_out(session_id: str, c: Caller = Depends(caller)):
        """Move this stream to another server (the admin token or its secret)."""
        session = controlled(session_id, c)
        try:
            return await migrations.migrate(session)
        except MigrationError as exc:
            raise HTTPException(exc.status, str(exc)) from None

    @router.post(MIGRATIONS_PATH, status_code=201)
    async def migrate_in(request: Request, c: Caller = Depends(caller)):
        """Take a stream from another server (admin token; the body is its blob)."""
        if not c.admin:
            manager.totals.refuse("forbidden")
            raise HTTPException(403, "taking a stream from another server needs the admin token")
        data = await request.body()
        loop = asyncio.get_running_loop()
        try:
            body = await loop.run_in_executor(None, migrations.accept, data, loop)
        except MigrationError as exc:
            return JSONResponse({"error": "migration_refused", "message": str(exc)}, status_code=exc.status)
        return JSONResponse(body, status_code=201)

    return router
