"""Command line of the server: ``add_serve_parser(subparsers)`` adds ``wanstream serve`` to the main CLI;
``python -m wanstream.server`` runs the same parser on its own.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from ..argtypes import add_taehv_arg, autoencoders, float_in, int_in, resolution, taehv_argv
from .settings import ServerSettings

log = logging.getLogger("wanstream.server")


def configure_serve_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", required=True, type=Path, help="model folder (see `wanstream init-random`)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int_in(0, 65535, "port"), default=7860)
    p.add_argument("--max-sessions", type=int_in(1, None, "max sessions"), default=4,
                   help="streams served at once; more get a 'server full' answer (default 4)")
    p.add_argument("--token", default=None, help="require this token on every API and stream call")
    p.add_argument("--admin-token", default=None,
                   help="the admin's token: sees, steers and records every stream (default: no admin)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host name served besides IP addresses and localhost, e.g. the domain of a reverse "
                        "proxy (repeatable; '*' turns the DNS-rebinding guard off)")
    p.add_argument("--allowed-origin", action="append", default=[], metavar="URL",
                   help="a browser Origin accepted besides the page's own, e.g. https://example.com (repeatable)")
    p.add_argument("--api-docs", action="store_true", help="serve /docs, /redoc and /openapi.json (token needed)")
    p.add_argument("--lora", action="append", default=None, metavar="PATH[:STRENGTH]",
                   help="load a Wan LoRA (repeatable); each session sets its strengths by name (params.lora), "
                        "default STRENGTH (1)")
    p.add_argument("--osc-port", type=int_in(0, 65535, "OSC port"), default=None, metavar="PORT",
                   help="accept OSC control (UDP) on this port of --host: /wanstream/<session>/<param> with the "
                        "stream's secret (see docs/integrations.md); off by default")
    p.add_argument("--resolution", type=resolution, default=(512, 512), help="WxH, multiples of 16")
    p.add_argument("--steps", type=int_in(1, 4, "steps"), default=2, help="default denoising steps (1-4)")
    add_taehv_arg(p)
    p.add_argument("--record-dir", type=Path, default=Path("recordings"), help="where recordings go")
    p.add_argument("--idle-timeout", type=float_in(0.0, None, "idle timeout"), default=60.0,
                   help="close a session after this many seconds without frames (default 60)")
    p.add_argument("--offer-timeout", type=float_in(0.0, None, "offer timeout"), default=15.0,
                   help="free a WebRTC session whose peer has not connected after this many seconds (default 15)")
    p.add_argument("--max-recordings-per-session", type=int_in(0, None, "recordings per session"), default=16)
    p.add_argument("--max-recording-files", type=int_in(1, None, "recording files"), default=1000,
                   help="mp4 files in --record-dir beyond which new recordings are refused (default 1000)")
    p.add_argument("--max-recording-gb", type=float_in(0.0, None, "recording budget"), default=2.0,
                   help="disk budget of all recordings in --record-dir, GiB (default 2)")
    p.add_argument("--prompt-cache-mb", type=float_in(0.0, None, "prompt cache size"), default=64.0,
                   help="bytes the prompt embedding cache may hold, MiB (default 64)")
    p.add_argument("--max-connections", type=int_in(1, None, "max connections"), default=256,
                   help="open HTTP / WebSocket connections; more are closed at once (default 256)")
    p.add_argument("--whep-max-viewers", type=int_in(1, None, "WHEP viewers"), default=4,
                   help="WHEP viewers one WHIP stream may have at once (default 4)")
    p.add_argument("--ice-server", action="append", default=[], metavar="URL",
                   help="STUN/TURN server for WebRTC (repeatable; none by default)")
    p.add_argument("--drain-grace", type=float_in(0.0, None, "drain grace"), default=30.0, metavar="SECONDS",
                   help="on SIGTERM, refuse new streams and let running ones go on this long, then exit 0 "
                        "(default 30; match Kubernetes' terminationGracePeriodSeconds, see docs/deploy.md)")
    p.add_argument("--webrtc-loopback-candidates", action="store_true",
                   help="use only the 127.0.0.1 ICE candidates of WebRTC offers (hermetic tests)")
    from ..pipeline_parallel import add_pipeline_args
    add_pipeline_args(p)       # --gpus 0,1,2,3 / --pipeline N: the server's engine runs on a pipeline of ranks
    return p


def load_serving_model(args, settings: ServerSettings):
    """``(model, pipeline)``: the model on one device (pipeline None), or a launched pipeline and its rank 0
    stage when ``--pipeline`` / ``--gpus`` asks for one."""
    from ..models.loader import load_model
    from ..pipeline_parallel import check_pipeline_args, launch_pipeline, pipeline_requested
    from ..presets import lora_specs
    t0 = time.perf_counter()
    if pipeline_requested(args):
        check_pipeline_args(args)
        driver = launch_pipeline(args, settings.decoder)
        print(f"wanstream serve: model {args.model} on a pipeline of {driver.world} ranks "
              f"({', '.join(driver.spec.devices)}) started in {time.perf_counter() - t0:.1f} s", flush=True)
        return driver.model, driver
    model = load_model(args.model, device=args.device, taehv="taehv" in (settings.encoder, settings.decoder),
                       lora=lora_specs(args))
    print(f"wanstream serve: model {args.model} on {model.device} loaded in {time.perf_counter() - t0:.1f} s"
          + (f", LoRAs {', '.join(model.dit.lora.names)}" if model.dit.lora is not None else ""), flush=True)
    return model, None


def run_serve(args) -> int:
    """``wanstream serve``: load the model once, print the URL, serve until interrupted (imports the server only
    now)."""
    from .app import create_app, uvicorn_config
    from .lifecycle import DrainingServer
    settings = settings_from_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: reachable from other machines%s", settings.host,
                    "" if settings.token else " WITHOUT a token (consider --token)")
    model, pipeline = load_serving_model(args, settings)
    try:
        app = create_app(model, settings, pipeline=pipeline)
        config = uvicorn_config(app, settings)
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        query = f"?token={settings.token}" if settings.token else ""
        print(f"wanstream serve: open http://{host}:{settings.port}/{query}  "
              f"({settings.width}x{settings.height}, up to {settings.max_sessions} sessions)", flush=True)
        if settings.osc_port is not None:
            print(f"wanstream serve: OSC control on udp {host}:{settings.osc_port} (see docs/integrations.md)",
                  flush=True)
        DrainingServer(config, app.state.manager, settings.drain_grace_s).run()
    finally:
        if pipeline is not None and not pipeline.closed:   # the app never started (or its shutdown failed)
            pipeline._abort(RuntimeError("the server stopped"))
    return 0


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``serve`` to a subparsers object; ``run_serve(args)`` runs it (also set as the ``func`` default)."""
    p = subparsers.add_parser("serve", help="live server: browser camera in, restyled video out")
    configure_serve_parser(p)
    p.set_defaults(func=run_serve)
    return p


def settings_from_args(args) -> ServerSettings:
    width, height = args.resolution
    return ServerSettings(host=args.host, port=args.port, max_sessions=args.max_sessions, token=args.token,
                          admin_token=args.admin_token, allowed_hosts=list(args.allowed_host),
                          allowed_origins=list(args.allowed_origin), api_docs=args.api_docs,
                          width=width, height=height, steps=args.steps, record_dir=args.record_dir,
                          idle_timeout_s=args.idle_timeout, offer_timeout_s=args.offer_timeout,
                          max_recordings_per_session=args.max_recordings_per_session,
                          max_recording_files=args.max_recording_files,
                          max_recording_bytes=int(args.max_recording_gb * 2**30),
                          prompt_cache_bytes=int(args.prompt_cache_mb * 2**20), max_connections=args.max_connections,
                          ice_servers=list(args.ice_server), webrtc_loopback_candidates=args.webrtc_loopback_candidates,
                          encoder=autoencoders(args.taehv)[0], decoder=autoencoders(args.taehv)[1],
                          whep_max_viewers=args.whep_max_viewers,
                          osc_port=args.osc_port, drain_grace_s=args.drain_grace)


def main(argv: list[str] | None = None) -> int:
    from ..errors import CheckpointError
    parser = configure_serve_parser(argparse.ArgumentParser(prog="wanstream serve",
                                                            description="wanstream live server"))
    args = parser.parse_args(taehv_argv(sys.argv[1:] if argv is None else argv))
    try:
        return run_serve(args)
    except (CheckpointError, ValueError, RuntimeError, OSError) as exc:
        print(f"wanstream serve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
