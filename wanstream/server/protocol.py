"""The control protocol shared by the WebSocket and the WebRTC data channel (JSON text messages).

Client → server: ``{"type": "params", "params": {...}}`` (a :class:`~.params.ParamsUpdate`; the fields may
also sit at the top level), ``{"type": "stats"}``, ``{"type": "ping"}``; an optional ``"id"`` is echoed back.
Server → client: ``ready``, ``params`` (the full state after a change), ``stats``, ``error`` (``code`` +
``message``), ``closed``, ``pong``. Bad messages get an ``error`` reply and change nothing; messages over the
per-session rate limit are dropped and counted.
"""

from __future__ import annotations

import json

from pydantic import ValidationError

from wanstream.api.params import ParamsUpdate
from wanstream.server.session import Session


def error(code: str, message: str, request_id=None) -> dict:
    msg = {"type": "error", "code": code, "message": message}
    if request_id is not None:
        msg["id"] = request_id
    return msg


def describe_errors(errors: list[dict], skip: tuple[str, ...] = (), limit: int = 5) -> str:
    """Pydantic / FastAPI validation errors → ``"field.path: what is wrong; ..."`` (the values are not echoed:
    NaN, infinities and lone surrogates cannot even be written back as JSON)."""
    parts = []
    for e in errors[:limit]:
        msg = e.get("msg", "invalid")
        if e.get("type") == "json_invalid":          # FastAPI: loc ("body", character position)
            position = e.get("loc", ("", "?"))[-1]
            parts.append(f"malformed JSON at character {position}: {(e.get('ctx') or {}).get('error', msg)}")
            continue
        loc = [str(p)[:64] for p in e.get("loc", ()) if str(p) not in skip]
        where = ".".join(loc).encode("utf-8", "backslashreplace").decode() or "params"
        if "unicode" in msg.lower():
            msg = "not valid Unicode text (a lone surrogate such as \\ud800?)"
            if not loc:
                where = "a field name"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def ready_message(session: Session) -> dict:
    """The first message of a stream, to its own client only: it carries the stream's secret."""
    return {"type": "ready", "session": session.id, "secret": session.secret, "transport": session.transport,
            "width": session.width, "height": session.height, "params": session.params.model_dump(),
            "stats_interval_s": session.settings.stats_interval_s}


def handle_control(session: Session, text: str | bytes) -> dict | None:
    """The reply to one control message (None: dropped by the rate limit)."""
    stats = session.stats
    if not session.control_bucket.take():
        stats.count("dropped_messages")
        session.report_error("rate_limited", "too many control messages; some were dropped")
        return None
    if len(text) > session.settings.max_control_bytes:
        stats.count("bad_messages")
        return error("message_too_large", f"control messages are limited to {session.settings.max_control_bytes} "
                                          f"bytes, got {len(text)}")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        stats.count("bad_messages")
        return error("bad_json", f"malformed JSON: {str(exc)[:200]}")
    if not isinstance(obj, dict):
        stats.count("bad_messages")
        return error("bad_json", "a control message must be a JSON object")
    request_id = obj.get("id")
    if not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
        request_id = None
    kind = obj.get("type", "params")
    if kind == "params":
        body = obj["params"] if "params" in obj else {k: v for k, v in obj.items() if k not in ("type", "id")}
        if not isinstance(body, dict):
            stats.count("bad_messages")
            return error("bad_params", "'params' must be a JSON object", request_id)
        try:
            update = ParamsUpdate.model_validate(body)
            state = session.apply(update)
        except ValidationError as exc:
            stats.count("bad_messages")
            return error("bad_params", describe_errors(exc.errors()), request_id)
        except (ValueError, RuntimeError) as exc:
            stats.count("bad_messages")
            return error("bad_params", str(exc), request_id)
        reply = {"type": "params", "ok": True, "params": state.model_dump()}
    elif kind == "stats":
        reply = session.stats_message()
    elif kind == "ping":
        reply = {"type": "pong"}
    else:
        stats.count("bad_messages")
        return error("unknown_type", f"unknown message type {str(kind)[:50]!r} (use params, stats or ping)",
                     request_id)
    if request_id is not None:
        reply["id"] = request_id
    return reply
