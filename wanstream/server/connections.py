"""Connection-level bounds of the HTTP server (uvicorn, h11) and secrets kept out of its logs.

uvicorn times out idle keep-alive connections but not a request whose line and headers never finish (or a
connection that sends nothing): :func:`guarded_http_protocol` adds that deadline (``header_timeout_s``) and
closes connections beyond ``max_connections`` at once, each counted in ``wanstream_server_refused_total``.
:class:`RedactSecrets` removes ``token=`` / ``secret=`` values from uvicorn's access and WebSocket log lines —
whatever their encoding (``%74oken=`` is ``token=`` to the server, so it is redacted too) — and shortens long
request targets, so one request writes one short line.
"""

from __future__ import annotations

import asyncio
import logging
import re
from urllib.parse import unquote_plus

from uvicorn.protocols.http.h11_impl import H11Protocol

from wanstream.server.settings import ServerSettings
from wanstream.server.stats import ServerTotals

_QUERY_PAIR = re.compile(r"([?&;])([^=&;\s\"']*)=([^&;\s\"']*)")
SECRET_PARAMS = frozenset({"token", "secret"})
MAX_LOGGED_CHARS = 300          # a request target longer than this is cut in the log (its length is kept)


def _secret_name(raw: str) -> bool:
    """A query parameter name the server reads as ``token`` / ``secret`` (or that looks like one once decoded,
    up to three times: double encoding is redacted too)."""
    name = raw
    for _ in range(3):
        if name.strip().lower() in SECRET_PARAMS:
            return True
        decoded = unquote_plus(name)
        if decoded == name:
            return False
        name = decoded
    return name.strip().lower() in SECRET_PARAMS


def redact(text: str, limit: int | None = None) -> str:
    """``/api/ws?token=abc&format=raw`` → ``/api/ws?token=***&format=raw`` (also ``%74oken=abc``); a text over
    ``limit`` characters is cut, naming its length."""
    text = _QUERY_PAIR.sub(lambda m: f"{m[1]}{m[2]}=***" if _secret_name(m[2]) else m[0], text)
    if limit is not None and len(text) > limit:
        text = f"{text[:limit]}...({len(text)} chars)"
    return text


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)             # (a format string: never cut)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a, MAX_LOGGED_CHARS) if isinstance(a, str) else a for a in record.args)
        return True


def redact_uvicorn_logs() -> None:
    """Install :class:`RedactSecrets` on uvicorn's loggers (once)."""
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())


def guarded_http_protocol(settings: ServerSettings, totals: ServerTotals) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with a deadline for request headers and a cap on open connections."""

    open_connections: set = set()            # uvicorn's set of open connections (HTTP and WebSocket), once seen
    totals.gauge("server_connections", "Open HTTP and WebSocket connections", lambda: len(open_connections))

    class GuardedH11Protocol(H11Protocol):
        _header_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            nonlocal open_connections
            open_connections = self.connections
            super().connection_made(transport)
            if len(self.connections) > settings.max_connections:
                totals.refuse("too_many_connections")
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            scope = self.scope
            super().data_received(data)
            if self.scope is not scope:                   # a request line + headers arrived
                self._disarm()
            elif self._header_deadline is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()                               # the start of a request, headers still coming

        def on_response_complete(self) -> None:
            super().on_response_complete()                # idle now: uvicorn's keep-alive timeout applies
            self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_deadline = self.loop.call_later(settings.header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _headers_late(self) -> None:
            self._header_deadline = None
            if not self.transport.is_closing():
                totals.refuse("header_timeout")
                self.transport.close()

    return GuardedH11Protocol
