"""``wanstream serve``: the server's command line (``add_serve_parser(subparsers)``; ``python -m wanstream.server``
is the same command).

Start-up order: the listening port (and the OSC port) are bound first, then the model loads, and only then is
"open http://..." printed — a busy port is one error line and exit code 2, before any model is loaded, never the
URL of somebody else's server. Tokens come from ``--token`` / ``--admin-token`` (visible to every local user in
``ps``: a warning says so), ``--token-file`` / ``--admin-token-file``, or the environment (``WANSTREAM_TOKEN``,
``WANSTREAM_ADMIN_TOKEN``). ``--preset FILE`` and ``--fit`` set the defaults of new sessions.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys
import time
from pathlib import Path

from wanstream.cli.argtypes import (
    add_backbone_arg,
    add_taehv_arg,
    autoencoders,
    float_in,
    int_in,
    resolution,
    taehv_argv,
)
from wanstream.core.geometry import FIT_MODES
from wanstream.server.settings import ServerSettings

log = logging.getLogger("wanstream.server")

TOKEN_ENV = {"token": "WANSTREAM_TOKEN", "admin_token": "WANSTREAM_ADMIN_TOKEN"}


def configure_serve_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", required=True, type=Path, help="model folder (see `wanstream init-random`)")
    add_backbone_arg(p)
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int_in(0, 65535, "port"), default=7860, help="TCP port (0: any free port)")
    p.add_argument("--max-sessions", type=int_in(1, None, "max sessions"), default=4,
                   help="streams served at once; more get a 'server full' answer (default 4)")
    tokens = p.add_mutually_exclusive_group()
    tokens.add_argument("--token", default=None,
                        help="require this token on every API and stream call (visible to other local users in "
                             "`ps`: prefer --token-file or $WANSTREAM_TOKEN)")
    tokens.add_argument("--token-file", type=Path, default=None, metavar="FILE",
                        help="read the token from the first line of FILE (default: $WANSTREAM_TOKEN if set, "
                             "else no token)")
    admins = p.add_mutually_exclusive_group()
    admins.add_argument("--admin-token", default=None,
                        help="the admin's token: sees, steers and records every stream (default: no admin; "
                             "prefer --admin-token-file or $WANSTREAM_ADMIN_TOKEN)")
    admins.add_argument("--admin-token-file", type=Path, default=None, metavar="FILE",
                        help="read the admin token from the first line of FILE (default: $WANSTREAM_ADMIN_TOKEN)")
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
    live = p.add_argument_group("playing live (docs/integrations.md#play-it-live)")
    live.add_argument("--midi", action="append", default=None, metavar="PORT",
                      help="open this MIDI input (repeatable; 'all': every port): CC / note mappings, learn, note "
                           "slots, MIDI clock (needs mido + python-rtmidi: pip install 'wanstream[midi]')")
    live.add_argument("--tempo", type=float_in(20.0, 400.0, "tempo"), default=120.0, metavar="BPM",
                      help="the tempo until MIDI clock or Link drives it (default 120)")
    live.add_argument("--beats-per-bar", type=int_in(1, 32, "beats per bar"), default=4,
                      help="beats of a bar, for changes quantised to the bar (default 4)")
    live.add_argument("--link", action="store_true",
                      help="follow an Ableton Link session on the local network (pip install 'wanstream[link]')")
    live.add_argument("--beat-latency", type=float_in(0.0, 10.0, "beat latency"), default=None, metavar="SECONDS",
                      help="output latency beat-quantised changes are timed with (default: each stream's measured "
                           "median)")
    live.add_argument("--push-allow", action="append", default=[], metavar="URL_PREFIX",
                      help="allow RTMP / SRT pushes of a stream's output to URLs starting with this (repeatable; "
                           "e.g. rtmp://127.0.0.1/); pushes are off without it")
    live.add_argument("--max-pushes", type=int_in(0, None, "max pushes"), default=8,
                      help="pushes running at once, all streams (default 8; 2 per stream)")
    p.add_argument("--resolution", type=resolution, default=(512, 512), help="WxH, multiples of 16")
    p.add_argument("--steps", type=int_in(1, 4, "steps"), default=None,
                   help="denoising steps of a new session, 1-4 (default: the preset's, else 2)")
    p.add_argument("--fit", choices=FIT_MODES, default=None,
                   help="framing of a new session's input of another aspect: crop, pad or stretch (default: the "
                        "preset's, else crop)")
    p.add_argument("--preset", dest="preset_file", type=Path, default=None, metavar="FILE",
                   help="a preset JSON: the defaults of new sessions (prompts, knobs, framing) and its LoRAs "
                        "(loaded unless --lora is given); --steps / --fit override its values")
    add_taehv_arg(p)
    p.add_argument("--reference", type=Path, action="append", default=None, metavar="IMG",
                   help="a VACE reference image every new session starts with, repeatable (needs a Wan2.1-VACE model "
                        "beside --model; sessions change it live: docs/conditioning.md)")
    p.add_argument("--reference-strength", type=float_in(0.0, 4.0, "reference strength"), default=1.0,
                   help="scale of the VACE hints of a new session, (0, 4] (default 1)")
    p.add_argument("--control", choices=["edges", "depth", "flow", "pose"], default=None,
                   help="the VACE control kind every new session starts with")
    p.add_argument("--max-reference-mb", type=float_in(0.0, None, "reference size"), default=4.0,
                   help="largest reference image a client may upload, MB (default 4)")
    p.add_argument("--record-dir", type=Path, default=Path("recordings"), help="where recordings go")
    p.add_argument("--idle-timeout", type=float_in(0.0, None, "idle timeout"), default=60.0,
                   help="close a session after this many seconds without frames (default 60)")
    p.add_argument("--offer-timeout", type=float_in(0.0, None, "offer timeout"), default=15.0,
                   help="free a WebRTC session whose peer has not connected after this many seconds (default 15)")
    p.add_argument("--max-recordings-per-session", type=int_in(0, None, "recordings per session"), default=16,
                   help="recordings one stream may make (default 16)")
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
    beyond = p.add_argument_group("serving beyond one server (docs/deploy.md)")
    beyond.add_argument("--policy", choices=("continuous", "slack"), default="continuous",
                        help="tick policy: continuous (SLO-aware batching, the default) or slack (playback slack: "
                             "the streams about to stall are degraded for a few chunks, those with slack wait)")
    beyond.add_argument("--ladder-taehv", action="store_true",
                        help="with --policy slack: load the TAEHV decoder (ckpts/taew2_1.pth) as the last rung of "
                             "the degradation ladder (streams decode with the VAE otherwise)")
    beyond.add_argument("--park-after", type=_zero_or_more("park after"), default=10.0, metavar="SECONDS",
                        help="park a stream without input this long in host memory, resume it on its next frame "
                             "(default 10; 0: never)")
    beyond.add_argument("--park-max-gb", type=_zero_or_more("parked memory"), default=4.0, metavar="GB",
                        help="host memory of all parked streams; the oldest expire beyond it (default 4)")
    beyond.add_argument("--parked-timeout", type=float_in(0.0, None, "parked timeout"), default=600.0,
                        metavar="SECONDS", help="close a parked stream without input this long (default 600)")
    beyond.add_argument("--migrate-to", default=None, metavar="URL",
                        help="where streams migrate to (the load balancer in front of the servers, or a peer): "
                             "POST /api/sessions/ID/migrate and the SIGTERM drain move streams there (needs the "
                             "admin token, the same on every server)")
    beyond.add_argument("--max-blob-gb", type=float_in(0.0, None, "blob size"), default=8.0, metavar="GB",
                        help="largest migration blob taken from another server (default 8)")
    beyond.add_argument("--resume-timeout", type=float_in(0.0, None, "resume timeout"), default=30.0,
                        metavar="SECONDS", help="free a migrated stream whose client has not reconnected by then "
                                                "(default 30)")
    beyond.add_argument("--drift-watchdog", action="store_true",
                        help="watch each stream's output for drift and refresh its cache's sinks past a threshold "
                             "(off by default until measured on real weights)")
    p.add_argument("--webrtc-loopback-candidates", action="store_true",
                   help="use only the 127.0.0.1 ICE candidates of WebRTC offers (hermetic tests)")
    from wanstream.cli.pipeline import add_pipeline_args
    add_pipeline_args(p)       # --gpus 0,1,2,3 / --pipeline N: the server's engine runs on a pipeline of ranks
    return p


def _zero_or_more(what: str):
    """A finite number >= 0 (0: off)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0 <= value < float("inf"):
            raise argparse.ArgumentTypeError(f"{what} must be a number >= 0, got {text!r}")
        return value
    return parse


def load_serving_model(args, settings: ServerSettings):
    """``(model, pipeline)``: the model on one device (pipeline None), or a launched pipeline and its rank 0
    stage when ``--pipeline`` / ``--gpus`` asks for one."""
    from wanstream.cli.pipeline import check_pipeline_args, launch_pipeline, pipeline_requested
    from wanstream.cli.presets import lora_specs
    from wanstream.models.loader import load_model
    t0 = time.perf_counter()
    if pipeline_requested(args):
        check_pipeline_args(args)
        driver = launch_pipeline(args, settings.decoder)
        print(f"wanstream serve: model {args.model} on a pipeline of {driver.world} ranks "
              f"({', '.join(driver.spec.devices)}) started in {time.perf_counter() - t0:.1f} s", flush=True)
        return driver.model, driver
    taehv = "taehv" in (settings.encoder, settings.decoder) or (settings.policy == "slack" and settings.ladder_taehv)
    vace = True if settings.default_reference is not None or settings.default_control != "none" else None
    model = load_model(args.model, device=args.device, taehv=taehv, lora=lora_specs(args), backbone=args.backbone,
                       vace=vace)
    print(f"wanstream serve: {model.backbone.title} model {args.model} on {model.device} loaded in "
          f"{time.perf_counter() - t0:.1f} s"
          + (f", LoRAs {', '.join(model.dit.lora.names)}" if model.dit.lora is not None else ""), flush=True)
    return model, None


def run_serve(args) -> int:
    """``wanstream serve``: bind the port, load the model once, print the URL, serve until interrupted (imports the
    server only now)."""
    from wanstream.server.app import create_app, uvicorn_config
    from wanstream.server.lifecycle import DrainingServer
    settings = settings_from_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name, flag in (("token", "--token"), ("admin_token", "--admin-token")):
        if getattr(args, name, None):
            log.warning("%s on the command line is visible to every user of this machine (ps); use %s-file or "
                        "$%s instead", flag, flag, TOKEN_ENV[name])
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: reachable from other machines%s", settings.host,
                    "" if settings.token else " WITHOUT a token (consider --token-file)")
        if settings.osc_port is not None:
            log.warning("OSC on %s: plain UDP, stream secrets travel in clear (trusted networks only)",
                        settings.host)
    check_live(settings)
    sock = listen_socket(settings.host, settings.port)      # a busy port fails here, before the model loads
    pipeline = None
    try:
        if settings.osc_port is not None:
            check_udp_port(settings.host, settings.osc_port)
        model, pipeline = load_serving_model(args, settings)
        app = create_app(model, settings, pipeline=pipeline)
        config = uvicorn_config(app, settings)
        sock.listen(config.backlog)                          # the printed URL answers from now on
        port = sock.getsockname()[1]
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        print(f"wanstream serve: open http://{host}:{port}/{token_query(args, settings)}  "
              f"({settings.width}x{settings.height}, up to {settings.max_sessions} sessions)", flush=True)
        if settings.osc_port is not None:
            print(f"wanstream serve: OSC control on udp {host}:{settings.osc_port} (see docs/integrations.md)",
                  flush=True)
        DrainingServer(config, app.state.manager, settings.drain_grace_s).run(sockets=[sock])
    finally:
        sock.close()
        if pipeline is not None and not pipeline.closed:   # the app never started (or its shutdown failed)
            pipeline._abort(RuntimeError("the server stopped"))
    return 0


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` as uvicorn would bind it (uvicorn listens on it); OSError naming the
    address and what to do when it is taken or cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        hint = " (another server runs there: stop it or choose another --port)" \
            if exc.errno == errno.EADDRINUSE else ""
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from None
    return sock


def check_udp_port(host: str, port: int) -> None:
    """OSError naming the port when the OSC port cannot be bound (checked before the model loads)."""
    if port == 0:
        return
    host = "127.0.0.1" if host == "localhost" else host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise OSError(f"cannot receive OSC on udp {host}:{port}: {exc.strerror or exc} (choose another "
                          f"--osc-port)") from None


def token_query(args, settings: ServerSettings) -> str:
    """The URL's ``?token=``: the token itself only when it was on the command line (visible anyway); a token
    from a file or the environment is not printed (stdout often ends in a log)."""
    if not settings.token:
        return ""
    if getattr(args, "token", None):
        return f"?token={settings.token}"
    source = f"the first line of {args.token_file}" if getattr(args, "token_file", None) else f"${TOKEN_ENV['token']}"
    return f"?token=<the token: {source}>"


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``serve`` to a subparsers object; ``run_serve(args)`` runs it (also set as the ``func`` default)."""
    p = subparsers.add_parser("serve", help="live server: browser camera in, restyled video out")
    configure_serve_parser(p)
    p.set_defaults(func=run_serve)
    return p


def read_token(args, name: str, environ=os.environ) -> str | None:
    """``--token`` / ``--admin-token`` (``name``), else the first line of its ``-file``, else the environment."""
    value = getattr(args, name, None)
    if value is not None:
        return value
    path = getattr(args, f"{name}_file", None)
    if path is not None:
        try:
            lines = Path(path).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--{name.replace('_', '-')}-file {path}: cannot read it "
                             f"({getattr(exc, 'strerror', None) or exc})") from None
        value = lines[0].strip() if lines else ""
        if not value:
            raise ValueError(f"--{name.replace('_', '-')}-file {path}: its first line is empty")
        return value
    value = environ.get(TOKEN_ENV[name], "").strip()
    return value or None


def serve_preset(args):
    """The ``--preset`` of ``serve`` (loaded once; its LoRAs become ``args.preset_loras`` unless ``--lora``)."""
    path = getattr(args, "preset_file", None)
    if path is None:
        return None
    if getattr(args, "preset", None) is None:
        from wanstream.api.presets import Preset
        args.preset = Preset.load(path)
        args.preset_loras = args.preset.lora_specs()
    return args.preset


def settings_from_args(args) -> ServerSettings:
    width, height = args.resolution
    preset = serve_preset(args)
    defaults = preset.to_params().model_dump(exclude_none=True, exclude={"lora", "steps", "fit"}) if preset else {}
    steps = args.steps if args.steps is not None else (preset.steps if preset and preset.steps else 2)
    fit = args.fit if args.fit is not None else (preset.fit if preset and preset.fit else "crop")
    return ServerSettings(host=args.host, port=args.port, max_sessions=args.max_sessions,
                          token=read_token(args, "token"), admin_token=read_token(args, "admin_token"),
                          allowed_hosts=list(args.allowed_host),
                          allowed_origins=list(args.allowed_origin), api_docs=args.api_docs,
                          width=width, height=height, steps=steps, fit=fit, session_defaults=defaults,
                          record_dir=args.record_dir,
                          idle_timeout_s=args.idle_timeout, offer_timeout_s=args.offer_timeout,
                          max_recordings_per_session=args.max_recordings_per_session,
                          max_recording_files=args.max_recording_files,
                          max_recording_bytes=int(args.max_recording_gb * 2**30),
                          prompt_cache_bytes=int(args.prompt_cache_mb * 2**20), max_connections=args.max_connections,
                          ice_servers=list(args.ice_server), webrtc_loopback_candidates=args.webrtc_loopback_candidates,
                          encoder=autoencoders(args.taehv)[0], decoder=autoencoders(args.taehv)[1],
                          whep_max_viewers=args.whep_max_viewers,
                          osc_port=args.osc_port, drain_grace_s=args.drain_grace,
                          midi_ports=midi_ports(args), tempo_bpm=args.tempo, beats_per_bar=args.beats_per_bar,
                          link=args.link, beat_latency_s=args.beat_latency, push_allow=list(args.push_allow),
                          max_pushes=args.max_pushes, policy=args.policy, ladder_taehv=args.ladder_taehv,
                          park_after_s=args.park_after,
                          park_max_bytes=int(args.park_max_gb * 2**30), parked_timeout_s=args.parked_timeout,
                          migrate_to=args.migrate_to, max_blob_bytes=max(1, int(args.max_blob_gb * 2**30)),
                          resume_timeout_s=args.resume_timeout, drift_watchdog=args.drift_watchdog,
                          max_reference_bytes=max(1, int(args.max_reference_mb * 2**20)),
                          **conditioning_defaults(args, preset))


def conditioning_defaults(args, preset) -> dict:
    """The VACE defaults of new sessions: ``--reference`` images (read and validated before the model loads),
    ``--reference-strength``, ``--control``; a ``--preset``'s conditioning where these flags are not given."""
    from wanstream.api.conditioning import read_reference
    cond = preset.conditioning if preset is not None else None
    refs = [read_reference(path) for path in args.reference] if args.reference else None
    if refs is None and cond is not None and cond.reference is not None:
        refs = [cond.image(preset.folder)]
    control = args.control or (cond.control if cond is not None and cond.control else None) or "none"
    given = args.reference or args.control
    strength = cond.strength if cond is not None and not given else args.reference_strength
    return {"default_reference": refs, "default_strength": strength, "default_control": control}


def midi_ports(args) -> list[str] | None:
    names = getattr(args, "midi", None)
    if not names:
        return None
    return ["*"] if "all" in names else list(names)


def check_live(settings: ServerSettings) -> None:
    """ValueError naming what is missing for --midi / --link (checked before the model loads)."""
    if settings.midi_ports:
        from wanstream.server.midi import available
        reason = available()
        if reason is not None:
            raise ValueError(f"--midi: {reason}")
        import mido
        there = mido.get_input_names()
        missing = [n for n in settings.midi_ports if n != "*" and n not in there]
        if missing:
            raise ValueError(f"--midi: no MIDI input {missing[0]!r} (inputs here: {', '.join(there) or 'none'})")
    if settings.link:
        try:
            import aalink  # noqa: F401
        except ImportError:
            raise ValueError("--link needs the aalink package (pip install 'wanstream[link]')") from None


def main(argv: list[str] | None = None) -> int:
    from wanstream.core.errors import CheckpointError
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
