"""Command line of the server: ``add_serve_parser(subparsers)`` adds ``wanstream serve`` to the main CLI;
``python -m wanstream.server`` runs the same parser on its own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..argtypes import float_in, int_in, resolution
from .settings import ServerSettings


def configure_serve_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", required=True, type=Path, help="model folder (see `wanstream init-random`)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int_in(0, 65535, "port"), default=7860)
    p.add_argument("--max-sessions", type=int_in(1, None, "max sessions"), default=4,
                   help="streams served at once; more get a 'server full' answer (default 4)")
    p.add_argument("--token", default=None, help="require this token on every API and stream call")
    p.add_argument("--resolution", type=resolution, default=(512, 512), help="WxH, multiples of 16")
    p.add_argument("--steps", type=int_in(1, 4, "steps"), default=2, help="default denoising steps (1-4)")
    p.add_argument("--taehv", action="store_true", help="decode with the TAEHV tiny decoder (needs taew2_1.pth)")
    p.add_argument("--record-dir", type=Path, default=Path("recordings"), help="where recordings go")
    p.add_argument("--idle-timeout", type=float_in(0.0, None, "idle timeout"), default=60.0,
                   help="close a session after this many seconds without frames (default 60)")
    p.add_argument("--ice-server", action="append", default=[], metavar="URL",
                   help="STUN/TURN server for WebRTC (repeatable; none by default)")
    p.add_argument("--webrtc-loopback-candidates", action="store_true",
                   help="use only the 127.0.0.1 ICE candidates of WebRTC offers (hermetic tests)")
    return p


def run_serve(args) -> int:
    """Run ``wanstream serve`` with parsed arguments (imports the server only now)."""
    from .app import serve
    return serve(args)


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``serve`` to a subparsers object; ``run_serve(args)`` runs it (also set as the ``func`` default)."""
    p = subparsers.add_parser("serve", help="live server: browser camera in, restyled video out")
    configure_serve_parser(p)
    p.set_defaults(func=run_serve)
    return p


def settings_from_args(args) -> ServerSettings:
    width, height = args.resolution
    return ServerSettings(host=args.host, port=args.port, max_sessions=args.max_sessions, token=args.token,
                          width=width, height=height, steps=args.steps, record_dir=args.record_dir,
                          idle_timeout_s=args.idle_timeout, ice_servers=list(args.ice_server),
                          webrtc_loopback_candidates=args.webrtc_loopback_candidates,
                          decoder="taehv" if args.taehv else "vae")


def main(argv: list[str] | None = None) -> int:
    from ..errors import CheckpointError
    parser = configure_serve_parser(argparse.ArgumentParser(prog="wanstream serve",
                                                            description="wanstream live server"))
    args = parser.parse_args(argv)
    try:
        return run_serve(args)
    except (CheckpointError, ValueError, RuntimeError, OSError) as exc:
        print(f"wanstream serve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
