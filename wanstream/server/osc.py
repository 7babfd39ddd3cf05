"""OSC control (``wanstream serve --osc-port N``): TouchDesigner, Resolume, Max or any OSC sender steers a stream.

One UDP socket on the server's ``--host``, served by one thread (python-osc's ``BlockingOSCUDPServer``); it
starts and stops with the app. Addresses name the stream and the parameter::

    /wanstream/<session-id>/<param> <secret> <value...>      the stream's secret as the first argument, or
    /wanstream/<session-id>/<secret>/<param> <value...>      in the address (for senders of bare numbers)

The secret is the one the stream was given in its ``ready`` message (the same authority as the HTTP API's
``X-Stream-Secret``); the admin token works for every stream. UDP has no sessions or authentication, so each
message carries the secret: a message for an unknown stream, or without the right secret, changes nothing.

``<param>``: ``prompt``, ``prompts`` (text, weight pairs), ``blend`` (new weights of the current blend, in
order), ``transition``, ``steps``, ``noise_scale``, ``noise_controller``, ``seed``, ``reset``,
``lora/<name>`` (see docs/integrations.md). The arguments become a :class:`~.params.ParamsUpdate` and go through
:meth:`~wanstream.server.session.Session.apply`, so the rules (types, ranges, LoRA names) are those of the HTTP and WebSocket
API. The only OSC-specific conversions: a whole float is an integer for ``steps`` / ``transition`` / ``seed``
and 0 / 1 are booleans for ``noise_controller`` (controllers send floats). Bundles are applied at once, in order
(time tags are ignored: a future time tag must not hold the thread).

Who may steer: OSC is plain UDP, with no connection and no ``--token`` — the access token is never enough here.
Every message must carry the stream's secret (or the admin token), which only a holder of the token can learn
(it comes with the stream, over the token-guarded API). Anyone who can see the traffic can read that secret, as
for plain HTTP, and a source address proves nothing: OSC is for a trusted network (or loopback), and it is off
unless ``--osc-port`` is given.

Bounds: a token bucket per source address (``osc_rate`` / ``osc_burst``, at most ``osc_max_sources`` addresses
tracked), datagrams up to 64 KiB, bundles nested at most ``MAX_BUNDLE_DEPTH`` deep. Every message dropped is
counted in ``wanstream_osc_dropped_total{reason}`` (``rate_limited``, ``malformed``, ``bad_address``,
``unknown_stream``, ``forbidden``, ``invalid``); applied ones in ``wanstream_osc_applied_total``. A dropped
datagram writes no log line (python-osc's own warnings about garbage are silenced); a failure nobody foresaw
writes one short line, never a traceback.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path

from prometheus_client.core import CounterMetricFamily
from pydantic import ValidationError
from pythonosc import osc_packet
from pythonosc.osc_server import BlockingOSCUDPServer

from wanstream.api.params import ParamsUpdate
from wanstream.server.auth import Caller, same_secret
from wanstream.server.protocol import describe_errors
from wanstream.server.session import TokenBucket
from wanstream.server.sessions import SessionManager

log = logging.getLogger("wanstream.server.osc")

PREFIX = "wanstream"
DROP_REASONS = ("rate_limited", "malformed", "bad_address", "unknown_stream", "forbidden", "invalid")
MAX_DATAGRAM = 65535
MAX_BUNDLE_DEPTH = 8                            # python-osc parses nested bundles recursively
_BUNDLE = b"#bundle\x00"
_INT_FIELDS = {"transition": "transition_chunks", "steps": "steps", "seed": "seed"}
_SIMPLE = {"prompt": "prompt", "noise_scale": "noise_scale", "noise_controller": "noise_controller", **_INT_FIELDS}
CONDITIONING = frozenset({"control", "vace_strength"})      # VACE (server/conditioning.py), not ParamsUpdate
PARAMS = frozenset({*_SIMPLE, "prompts", "blend", "reset", "lora", *CONDITIONING})


class OSCError(Exception):
    """A message that is dropped; ``reason`` is its counter label."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _number_as_int(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _number_as_bool(value):
    if not isinstance(value, bool) and isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    return value


def _one(param: str, args: list):
    if len(args) != 1:
        raise OSCError("invalid", f"{param} takes one argument, got {len(args)}")
    return args[0]


def to_update(param: list[str], args: list, current) -> ParamsUpdate:
    """The :class:`ParamsUpdate` an OSC message asks for (``param``: the address after the stream part;
    ``current``: the stream's :class:`~.params.SessionParams`, for ``blend``). :class:`OSCError` otherwise."""
    name = param[0] if param else ""
    if name == "lora" and len(param) == 2:
        body = {"lora": {param[1]: _one("lora", args)}}
    elif len(param) != 1 or name not in PARAMS or name == "lora":
        raise OSCError("bad_address", f"unknown parameter {'/'.join(param)[:64]!r} (one of "
                                      f"{', '.join(sorted(PARAMS - {'lora'}))}, lora/<name>)")
    elif name in _SIMPLE:
        value = _one(name, args)
        value = _number_as_int(value) if name in _INT_FIELDS else value
        value = _number_as_bool(value) if name == "noise_controller" else value
        body = {_SIMPLE[name]: value}
    elif name == "prompts":
        if not args or len(args) % 2:
            raise OSCError("invalid", "prompts takes text, weight pairs")
        body = {"prompts": [{"text": t, "weight": w} for t, w in zip(args[::2], args[1::2])]}
    elif name == "blend":
        blend = current.prompts or []
        if len(args) != len(blend):
            raise OSCError("invalid", f"blend takes one weight per prompt of the current blend ({len(blend)})")
        body = {"prompts": [{"text": p.text, "weight": w} for p, w in zip(blend, args)]}
    else:  # reset: no argument, or a true one (a button's press; its release, 0 / false, is ignored)
        if len(args) > 1:
            raise OSCError("invalid", f"reset takes at most one argument, got {len(args)}")
        if args and not _number_as_bool(args[0]):
            return ParamsUpdate()
        body = {"reset": True}
    try:
        return ParamsUpdate.model_validate(body)
    except ValidationError as exc:
        raise OSCError("invalid", describe_errors(exc.errors())) from None


def bundle_depth_ok(data: bytes, limit: int = MAX_BUNDLE_DEPTH) -> bool:
    """False when bundles nest deeper than ``limit`` (walked without recursion, without copies). Malformed
    element sizes end the walk: the parser refuses those."""
    view = memoryview(data)
    todo = [(0, len(data), 0)]                  # (start, end, depth) of each bundle to look into
    while todo:
        start, end, depth = todo.pop()
        if view[start:start + 8] != _BUNDLE:
            continue
        if depth >= limit:
            return False
        i = start + 16                          # "#bundle\0" and the 8-byte time tag
        while i + 4 <= end:
            size = int.from_bytes(view[i:i + 4], "big", signed=True)
            i += 4
            if size < 0 or i + size > end:
                break
            todo.append((i, i + size, depth + 1))
            i += size
    return True


class _QuietPythonOSC(logging.Filter):
    """python-osc warns on the root logger about every garbage type tag or datagram: a log flood any sender can
    cause. Those datagrams are counted (``malformed``) instead."""

    _here = str(Path(osc_packet.__file__).parent)

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.pathname.startswith(self._here)


class OSCCounters:
    """``wanstream_osc_applied_total`` and ``wanstream_osc_dropped_total{reason}`` (a Prometheus collector)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.applied = 0
        self.dropped = dict.fromkeys(DROP_REASONS, 0)

    def drop(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self.dropped[reason] += n

    def apply(self) -> None:
        with self._lock:
            self.applied += 1

    def collect(self):
        with self._lock:
            applied, dropped = self.applied, dict(self.dropped)
        c = CounterMetricFamily(f"{PREFIX}_osc_applied", "OSC messages applied to a stream")
        c.add_metric([], applied)
        yield c
        c = CounterMetricFamily(f"{PREFIX}_osc_dropped", "OSC messages dropped, by reason", labels=["reason"])
        for reason, n in dropped.items():
            c.add_metric([reason], n)
        yield c


class _Server(BlockingOSCUDPServer):
    """One thread, one datagram at a time; the :class:`OSCControl` is the "dispatcher" python-osc calls."""

    max_packet_size = MAX_DATAGRAM

    def verify_request(self, request, client_address) -> bool:
        return True                             # every datagram reaches handle_packet (malformed ones are counted)


class OSCControl:
    """The OSC endpoint of a server: ``start()`` binds ``settings.host:settings.osc_port`` (0: any free port, see
    ``port``) and serves on a thread; ``stop()`` closes it. ``handle_packet`` is the whole receive path."""

    def __init__(self, manager: SessionManager, settings=None):
        self.manager = manager
        self.settings = settings or manager.settings
        self.counters = OSCCounters()
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        manager.totals.registry.register(self.counters)
        manager.totals.limits(osc_rate=self.settings.osc_rate, osc_burst=self.settings.osc_burst,
                              osc_max_sources=self.settings.osc_max_sources)

    @property
    def port(self) -> int | None:
        return self._server.server_address[1] if self._server is not None else None

    def start(self) -> None:
        host = self.settings.host if self.settings.host != "localhost" else "127.0.0.1"
        self._server = _Server((host, self.settings.osc_port), self)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="wanstream-osc", daemon=True)
        self._quiet = _QuietPythonOSC()
        logging.getLogger().addFilter(self._quiet)
        self._thread.start()
        log.info("OSC control on udp %s:%d", host, self.port)

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
        self._server = None
        logging.getLogger().removeFilter(self._quiet)

    # ------------------------------------------------------------------ python-osc's dispatcher interface
    def call_handlers_for_packet(self, data: bytes, client_address) -> list:
        try:
            self.handle_packet(data, client_address[0])
        except Exception as exc:  # noqa: BLE001 - one bad datagram must never end the OSC thread
            # one short line, no traceback: a sender must not be able to flood the log with stacks
            log.warning("OSC datagram from %s dropped: %s: %.120s", client_address[0], type(exc).__name__, exc)
            self.counters.drop("malformed")
        return []                               # no replies

    # ------------------------------------------------------------------ receive path
    def _bucket(self, source: str) -> TokenBucket:
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self.settings.osc_max_sources:
                self._buckets.popitem(last=False)
            bucket = self._buckets[source] = TokenBucket(self.settings.osc_rate, self.settings.osc_burst,
                                                         self.manager.clock)
        self._buckets.move_to_end(source)
        return bucket

    def handle_packet(self, data: bytes, source: str) -> None:
        """One datagram (a message or a bundle) from ``source``: each message costs a token of its source."""
        bucket = self._bucket(source)
        if not bucket.take():
            self.counters.drop("rate_limited")
            return
        if not bundle_depth_ok(data):
            self.counters.drop("malformed")
            return
        try:
            messages = [m.message for m in osc_packet.OscPacket(data).messages]
        except Exception:  # noqa: BLE001 - ParseError, and what python-osc lets through (bad UTF-8, ...)
            self.counters.drop("malformed")
            return
        if not messages:                        # e.g. a bundle whose elements python-osc skipped as broken
            self.counters.drop("malformed")
            return
        for i, msg in enumerate(messages):
            if i and not bucket.take():
                self.counters.drop("rate_limited", len(messages) - i)
                return
            try:
                self.handle(msg.address, list(msg.params))
            except OSCError as exc:
                self.counters.drop(exc.reason)
                log.debug("OSC %s dropped (%s): %s", msg.address[:80], exc.reason, exc)
            else:
                self.counters.apply()

    def _conditioning(self, session, rest: list[str], args: list) -> None:
        """``control <none|edges|depth|flow>`` / ``vace_strength <0..4>``: the session's VACE conditioning."""
        from wanstream.server.conditioning import ConditioningUpdate
        if len(rest) != 1:
            raise OSCError("bad_address", f"unknown parameter {'/'.join(rest)[:64]!r}")
        value = _one(rest[0], args)
        try:
            if rest[0] == "control":
                update = ConditioningUpdate(control=value)
            else:
                update = ConditioningUpdate(strength=float(value) if isinstance(value, (int, float)) else value)
            if update.control in ("depth", "flow", "pose"):
                self.manager.engine.preprocessors.check(update.control)
            session.conditioning.change(strength=update.strength, control=update.control)
        except (ValidationError, ValueError, RuntimeError) as exc:
            message = describe_errors(exc.errors()) if isinstance(exc, ValidationError) else str(exc)
            raise OSCError("invalid", message) from None

    def handle(self, address: str, args: list) -> None:
        """Apply one message (:class:`OSCError` names why it is dropped)."""
        parts = address.split("/")
        if len(parts) < 4 or parts[0] != "" or parts[1] != PREFIX:
            raise OSCError("bad_address", f"addresses are /{PREFIX}/<session-id>/<param>")
        session_id, rest = parts[2], parts[3:]
        if rest[0] in PARAMS:                   # /wanstream/<id>/<param> <secret> <value...>
            if not args or not isinstance(args[0], str):
                raise OSCError("forbidden", "the first argument must be the stream's secret")
            key, args = args[0], args[1:]
        else:                                   # /wanstream/<id>/<secret>/<param> <value...>
            key, rest = rest[0], rest[1:]
        session = self.manager.get(session_id)
        if session is None:
            raise OSCError("unknown_stream", f"no stream {session_id[:64]!r}")
        caller = Caller(token_ok=True, admin=same_secret(key, self.settings.admin_token), secret=key)
        if not caller.controls(session):
            raise OSCError("forbidden", "wrong secret for this stream")
        if rest and rest[0] in CONDITIONING:
            return self._conditioning(session, rest, args)
        update = to_update(rest, args, session.params)
        if not update.model_fields_set:
            return                              # a button's release: nothing to do
        try:
            state = session.apply(update)
        except (ValueError, RuntimeError) as exc:
            raise OSCError("invalid", str(exc)) from None
        session.notify({"type": "params", "ok": True, "params": state.model_dump(), "source": "osc"})
