"""Security headers on every HTTP answer of the server (the page, its files and the API).

- ``Content-Security-Policy``: the page's scripts, styles and connections come from the server itself only (no
  inline script or style, no other origin); the camera / video file are ``blob:`` / ``mediastream:`` media;
  ``frame-ancestors 'none'`` and ``X-Frame-Options: DENY`` keep the page out of other sites' frames
  (clickjacking of the camera permission). ``connect-src 'self'`` covers the WebSocket of the same host and port
  (CSP level 3); WebRTC's media path is not a CSP fetch.
- ``X-Content-Type-Options: nosniff``: a file is what its type says (an mp4 is never run as a script).
- ``Referrer-Policy: no-referrer``: the page's URL carries ``?token=``, which must not leak to any link target.
"""

from __future__ import annotations

CSP = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data: blob:",
    "media-src 'self' blob: mediastream:",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
])

HEADERS = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in {
    "content-security-policy": CSP,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}.items()]


class SecurityHeaders:
    """ASGI middleware: adds :data:`HEADERS` to every HTTP response that does not set them itself."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in HEADERS if k not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
