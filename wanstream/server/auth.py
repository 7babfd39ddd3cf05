"""Who may do what, checked before any route runs: Host and Origin, the tokens, the size of a request body.

Credentials (one rule for every HTTP route and the WebSocket):

- **token**: ``Authorization: Bearer T``, else ``X-Token: T``, else ``?token=T`` — the first form present is the
  one used (a wrong Bearer header is not rescued by a right query token). With ``--token`` set, every API and
  stream call needs it (the page itself and its static files do not). The ``--admin-token`` goes in the same
  place and also counts as the token.
- **stream secret**: ``X-Stream-Secret: S``, else ``?secret=S``. Creating a stream (WebSocket ``ready``, WebRTC
  answer) returns its secret; changing its parameters, reading its details, listing and downloading its
  recordings over HTTP need that secret or the admin token. Session ids are names, not capabilities.

Host and Origin (DNS rebinding, cross-site requests and WebSockets): the ``Host`` header must name an IP address,
``localhost``, the bound host or one of ``allowed_hosts``; a browser's ``Origin`` must be the page's own
(same host and port as ``Host``) or one of ``allowed_origins``. Requests without ``Origin`` (curl, same-origin
navigation) pass.

Request bodies are read here, at most ``max_body_bytes`` within ``body_timeout_s``, before any parsing or
validation; larger or slower ones get 413 / 408.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import secrets
from dataclasses import dataclass

from starlette.datastructures import Headers, QueryParams
from starlette.responses import JSONResponse

from wanstream.server.conditioning import body_limit
from wanstream.server.settings import ServerSettings
from wanstream.server.stats import ServerTotals

SCOPE_KEY = "wanstream.caller"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
BLOB_PATH = "/api/migrations"              # a migration blob: max_blob_bytes (admin only), not max_body_bytes
DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}
PUBLIC_PATHS = frozenset({"/", "/favicon.ico"})     # with /static/...: served without the token


def same_secret(given: str | None, expected: str | None) -> bool:
    """Constant-time comparison; None never matches."""
    if given is None or expected is None:
        return False
    return secrets.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


def presented_token(headers: Headers, query: QueryParams) -> str | None:
    """The token of a request: Bearer header, else X-Token header, else ``?token=`` (the first one present)."""
    auth = headers.get("authorization")
    if auth is not None:
        scheme, _, value = auth.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else ""
    if "x-token" in headers:
        return headers["x-token"]
    return query.get("token")


def presented_secret(headers: Headers, query: QueryParams) -> str | None:
    """The stream secret of a request: ``X-Stream-Secret`` header, else ``?secret=``."""
    if "x-stream-secret" in headers:
        return headers["x-stream-secret"]
    return query.get("secret")


@dataclass(frozen=True)
class Caller:
    """What one request may do."""

    token_ok: bool           # holds the access token (or none is configured)
    admin: bool              # holds the admin token
    secret: str | None       # the stream secret it presented

    def controls(self, session) -> bool:
        """May change, read and record ``session`` (its secret or the admin token)."""
        return self.admin or same_secret(self.secret, session.secret)


def identify(settings: ServerSettings, headers: Headers, query: QueryParams) -> Caller:
    token = presented_token(headers, query)
    admin = same_secret(token, settings.admin_token)
    token_ok = admin or settings.token is None or same_secret(token, settings.token)
    return Caller(token_ok=token_ok, admin=admin, secret=presented_secret(headers, query))


def caller_of(scope) -> Caller:
    """The :class:`Caller` the guard attached to a request (``request.scope`` / ``websocket.scope``)."""
    return scope[SCOPE_KEY]


# ------------------------------------------------------------------------------------------- Host / Origin
# RFC 9110 / 3986: uri-host [":" port], where uri-host is "[" IPv6 "]", an IPv4 address or a registered name
# (browsers send names in ASCII, IDNs punycoded). Anything else is malformed and refused (never an exception).
_HOST_PORT = re.compile(r"^(?:\[(?P<ip6>[0-9A-Fa-f:.]{2,45})\]|(?P<name>[A-Za-z0-9._~-]{1,253}))"
                        r"(?::(?P<port>[0-9]{0,5}))?$")
_ORIGIN = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]{0,15})://(?P<hostport>[^/?#@\s]{1,300})$")


def split_host(value: str) -> tuple[str, int | None]:
    """``host[:port]`` (IPv6 in brackets) → ``(lower-case host without brackets, port or None)``; ValueError
    naming the problem for anything malformed (bad brackets, a bad IPv6 literal, a port over 65535, ...)."""
    m = _HOST_PORT.match(value.strip())
    if m is None:
        raise ValueError("not a host[:port]")
    if m["ip6"] is not None:
        ipaddress.IPv6Address(m["ip6"])                 # ValueError for a bad literal (and no zone ids)
    port = int(m["port"]) if m["port"] else None
    if port is not None and port > 65535:
        raise ValueError("port out of range")
    return (m["ip6"] or m["name"]).lower(), port


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def host_allowed(settings: ServerSettings, host_header: str | None) -> bool:
    """IP literals cannot be rebound by DNS; names must be localhost, the bound host or allowed explicitly.
    A missing or malformed Host is refused."""
    if "*" in settings.allowed_hosts:
        return True
    if not host_header:
        return False
    try:
        host, _ = split_host(host_header)
    except ValueError:
        return False
    return (is_ip(host) or host == "localhost" or host.endswith(".localhost") or host == settings.host.lower()
            or host in settings.allowed_hosts)


def origin_allowed(settings: ServerSettings, origin: str | None, host_header: str | None, scheme: str) -> bool:
    """No Origin (not a browser, or a same-origin navigation) passes; else the page's own origin (scheme, host,
    port of this request) or an allowed one. A malformed Origin is refused."""
    if origin is None or "*" in settings.allowed_origins:
        return True
    origin = origin.strip().rstrip("/").lower()
    if origin in (o.rstrip("/").lower() for o in settings.allowed_origins):
        return True
    m = _ORIGIN.match(origin)
    if m is None or m["scheme"] not in ("http", "https") or not host_header:
        return False                                    # "null", file://, extensions, garbage ...
    try:
        origin_host, origin_port = split_host(m["hostport"])
        host, port = split_host(host_header)
    except ValueError:
        return False
    served = {"ws": "http", "wss": "https"}.get(scheme, scheme)
    # The Host header omits default ports: compare with the default of the origin's scheme (the browser's view).
    default = DEFAULT_PORTS[m["scheme"]]
    return m["scheme"] == served and origin_host == host and (origin_port or default) == (port or default)


# ----------------------------------------------------------------------------------------------- middleware
class BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware in front of every route: Host / Origin, token, bounded body; attaches the :class:`Caller`.

    The page (``/``), its static files and ``/favicon.ico`` need no token (the page passes ``?token=`` on). A
    WebSocket without the token is accepted by its route and told ``unauthorized`` (so the page can say so); one
    from a wrong or malformed Host or Origin is refused before the handshake (HTTP 403).
    """

    def __init__(self, app, settings: ServerSettings, totals: ServerTotals):
        self.app = app
        self.settings = settings
        self.totals = totals

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host")
        if not host_allowed(self.settings, host):
            await self._refuse(scope, receive, send, 403, "bad_host",
                               f"Host {str(host)[:100]!r} is not served here (a DNS-rebinding guard; add it with "
                               f"--allowed-host)")
            return
        if not origin_allowed(self.settings, headers.get("origin"), host, scope.get("scheme", "http")):
            await self._refuse(scope, receive, send, 403, "bad_origin",
                               f"cross-site request from Origin {headers.get('origin', '')[:100]!r} refused "
                               f"(allow it with --allowed-origin)")
            return
        caller = identify(self.settings, headers, QueryParams(scope.get("query_string", b"")))
        scope[SCOPE_KEY] = caller
        if kind == "websocket":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if not caller.token_ok and not (path in PUBLIC_PATHS or path.startswith("/static/")):
            await self._refuse(scope, receive, send, 401, "unauthorized", "missing or wrong token",
                               {"WWW-Authenticate": "Bearer"})
            return
        if path == BLOB_PATH and not caller.admin:      # refused before a (large) body is read
            await self._refuse(scope, receive, send, 403, "forbidden", "taking a stream from another server needs "
                                                                       "the admin token")
            return
        if scope["method"] in BODY_METHODS:
            st = self.settings
            # a migration blob (admin only, above: server/migration.py) has its own, larger bound
            limit, timeout = (st.max_blob_bytes, st.blob_timeout_s) if path == BLOB_PATH else \
                (st.max_body_bytes, st.body_timeout_s)
            image_limit = body_limit(path, st)     # a VACE reference image, or a preset with one (conditioning.py)
            limit = limit if image_limit is None else image_limit
            try:
                body = await self._read_body(headers, receive, limit, timeout)
            except BodyTooLarge:
                await self._refuse(scope, receive, send, 413, "body_too_large",
                                   f"request bodies are limited to {limit} bytes")
                return
            except TimeoutError:
                await self._refuse(scope, receive, send, 408, "body_timeout",
                                   f"the request body did not arrive within {timeout:g} s")
                return
            if body is None:            # the client went away
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    async def _read_body(self, headers: Headers, receive, limit: int, timeout: float) -> bytes | None:
        length = headers.get("content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > limit):
            raise BodyTooLarge
        body = bytearray()
        async with asyncio.timeout(timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                body += message.get("body", b"")
                if len(body) > limit:
                    raise BodyTooLarge
                if not message.get("more_body", False):
                    return bytes(body)

    async def _refuse(self, scope, receive, send, status: int, reason: str, message: str,
                      headers: dict | None = None) -> None:
        self.totals.refuse(reason)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
            return
        response = JSONResponse({"error": reason, "message": message}, status_code=status, headers=headers)
        await response(scope, receive, send)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay
