"""WebSocket transport (the default): ``/api/ws[?token=T][&format=jpeg|raw]`` (the token may also come as an
``Authorization: Bearer`` or ``X-Token`` header; one precedence rule, see :mod:`.auth`).

Binary messages are frames: JPEG (or raw RGB, see :mod:`.frames`) up, JPEG (or raw with ``format=raw``) down.
Text messages are the JSON control protocol of :mod:`.protocol`; the server also pushes ``stats`` every
``stats_interval_s``. The first server message is ``ready`` (session id, its secret, resolution, parameters)
or an ``error`` with code ``server_full`` / ``draining`` / ``unauthorized`` / ``bad_format`` / ``bad_resume`` followed
by the close. ``?resume=TOKEN`` continues a stream migrated to this server (:mod:`.migration`); a stream that
migrates away gets its ``redirect`` as its last message, after its last frame.
One task receives, one sends (frames and JSON, never two sends at once); when either ends, the session ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from concurrent.futures import Executor

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from wanstream.server.auth import caller_of
from wanstream.server.frames import decode_frame, encode_jpeg, pack_raw
from wanstream.server.protocol import error, handle_control, ready_message
from wanstream.server.sessions import ServerFull, SessionManager
from wanstream.server.uplink import Uplink

log = logging.getLogger("wanstream.server")

CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_UNAUTHORIZED = 4401
CLOSE_UNSUPPORTED = 1003


def ws_router(manager: SessionManager, executor: Executor) -> APIRouter:
    router = APIRouter()
    settings = manager.settings

    @router.websocket("/api/ws")
    async def stream(ws: WebSocket, format: str = "jpeg"):
        await ws.accept()
        if not caller_of(ws.scope).token_ok:
            manager.totals.refuse("unauthorized")
            await _refuse(ws, error("unauthorized", "missing or wrong token (add ?token=... to the URL)"),
                          CLOSE_UNAUTHORIZED)
            return
        if format not in ("jpeg", "raw"):
            await _refuse(ws, error("bad_format", "format must be 'jpeg' or 'raw'"), CLOSE_UNSUPPORTED)
            return
        loop = asyncio.get_running_loop()
        resume = ws.query_params.get("resume")
        try:
            session = manager.open("websocket", loop) if resume is None else manager.claim(resume, loop)
        except ServerFull as exc:
            await _refuse(ws, error(exc.code, str(exc)), CLOSE_TRY_AGAIN_LATER)
            return
        if session is None:
            await _refuse(ws, error("bad_resume", "no stream waits here for this resume token (it expired, was "
                                                  "used, or belongs to another server)"), CLOSE_UNAUTHORIZED)
            return
        outbox: asyncio.Queue = asyncio.Queue(maxsize=64)

        def post(msg: dict) -> None:
            with contextlib.suppress(asyncio.QueueFull):
                outbox.put_nowait(msg)

        session.add_listener(post)
        w, h = session.width, session.height
        decode = lambda data: decode_frame(data, w, h, settings.max_frame_pixels, session.params.fit)  # noqa: E731
        uplink = Uplink(session, executor, decode)
        if format == "raw":
            encode = lambda out: pack_raw(out.image, out.index)  # noqa: E731
        else:
            encode = lambda out: encode_jpeg(out.image, settings.jpeg_quality)  # noqa: E731

        async def receive():
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    return "disconnected"
                data, text = msg.get("bytes"), msg.get("text")
                if data is not None:
                    if len(data) > settings.max_frame_bytes:
                        session.note_arrival()
                        session.stats.count("bad_frames")
                        session.report_error("frame_too_large", f"frames are limited to {settings.max_frame_bytes}"
                                                                f" bytes, got {len(data)}")
                        continue
                    uplink.offer(data)
                elif text is not None:
                    reply = handle_control(session, text)
                    if reply is not None:
                        post(reply)

        async def send():
            frame_task = asyncio.ensure_future(session.next_output())
            msg_task = asyncio.ensure_future(outbox.get())
            try:
                while True:
                    done, _ = await asyncio.wait({frame_task, msg_task}, return_when=asyncio.FIRST_COMPLETED)
                    if msg_task in done:
                        await ws.send_text(json.dumps(msg_task.result()))
                        msg_task = asyncio.ensure_future(outbox.get())
                    if frame_task in done:
                        out = frame_task.result()
                        if out is None:
                            while not outbox.empty():       # the last notices (why the session ended)
                                await ws.send_text(json.dumps(outbox.get_nowait()))
                            if session.handoff is not None:  # migrated: after its last frame, where it goes on
                                await ws.send_text(json.dumps(session.handoff))
                            return session.close_reason or "closed"
                        data = await loop.run_in_executor(executor, encode, out)
                        await ws.send_bytes(data)
                        frame_task = asyncio.ensure_future(session.next_output())
            finally:
                frame_task.cancel()
                msg_task.cancel()

        async def push_stats():
            while True:
                await asyncio.sleep(settings.stats_interval_s)
                post(session.stats_message())

        post(ready_message(session))
        tasks = [asyncio.ensure_future(c) for c in (receive(), send(), push_stats())]
        reason = "disconnected"
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if not t.cancelled() and t.exception() is None and t.result():
                    reason = t.result()
                elif not t.cancelled() and isinstance(t.exception(), WebSocketDisconnect):
                    reason = "disconnected"
                elif not t.cancelled() and t.exception() is not None:
                    log.warning("session %s: websocket error: %r", session.id[:8], t.exception())
                    reason = "transport error"
        finally:
            for t in tasks:
                t.cancel()
            uplink.cancel()
            session.close(reason)
            await asyncio.gather(*tasks, return_exceptions=True)
            if ws.application_state == WebSocketState.CONNECTED and ws.client_state == WebSocketState.CONNECTED:
                with contextlib.suppress(Exception):
                    code = {"disconnected": 1000, "idle": 1000, "migrated": 1000,
                            "server shutdown": 1001}.get(reason, 1011)
                    await ws.close(code, reason[:100])
            session.manager.worker.memory_released()     # the connection's buffers are free now

    return router


async def _refuse(ws: WebSocket, message: dict, code: int) -> None:
    with contextlib.suppress(Exception):
        await ws.send_text(json.dumps(message))
        await ws.close(code, message["message"][:100])
