"""Live server: browser camera in, restyled video out (WebSocket and WebRTC), see docs/server.md.

Imports are lazy so that ``wanstream --help`` does not load FastAPI / aiortc.
"""

__all__ = ["create_app", "serve", "ServerSettings"]


def __getattr__(name):
    if name in ("create_app", "serve"):
        from wanstream.server import app
        return getattr(app, name)
    if name == "ServerSettings":
        from wanstream.server.settings import ServerSettings
        return ServerSettings
    raise AttributeError(name)
