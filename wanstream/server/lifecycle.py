"""Readiness, capacity and the SIGTERM drain of ``wanstream serve`` (for load balancers and orchestrators).

``GET /api/ready`` is 200 while the server would admit one more stream and 503 otherwise, with the reason
(``full`` / ``draining`` / ``worker_unhealthy`` / ``worker_stuck``); ``/api/health`` stays liveness only.
:func:`export_capacity` puts the same numbers in ``/metrics``.

:class:`DrainingServer` is uvicorn's server with one change to its signal handling: the first ``SIGTERM``
starts a drain instead of a shutdown — new streams are refused (``/api/ready`` 503 ``draining``; a new stream
gets the error code ``draining``), running streams go on until they end or ``drain_grace_s`` has passed, then
the remaining streams are told why and closed, and the server shuts down; the process exits 0. A second
``SIGTERM`` (or ``SIGINT``, Ctrl+C) during the drain shuts down at once, as uvicorn does. With ``migrate_to``
the drain first moves the WebSocket streams to a peer with room (:mod:`.migration`; tried again every
``MIGRATE_RETRY_S`` while streams remain), so it ends as soon as they have moved instead of waiting out the grace.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import uvicorn

from wanstream.server.sessions import SessionManager

log = logging.getLogger("wanstream.server")


def export_capacity(manager: SessionManager) -> None:
    """Capacity and load gauges in ``/metrics`` (read at every scrape)."""
    g = manager.totals.gauge
    g("server_streams_active", "Streams being served now", lambda: manager.count)
    g("server_streams_max", "Most streams served at once (--max-sessions)", lambda: manager.settings.max_sessions)
    g("server_streams_free", "Streams the server would still admit (0 while draining)",
      lambda: manager.capacity()["free"])
    g("server_ready", "1 while the server admits one more stream (GET /api/ready is 200)",
      lambda: float(manager.readiness()[0] is None))
    g("server_draining", "1 after SIGTERM: new streams are refused, running ones finish",
      lambda: float(manager.draining))
    g("server_predicted_fps_per_stream_next", "Frames/s each stream would get with one more stream, from the "
      "engine's measured tick latency (NaN before the first tick)",
      lambda: float("nan") if (fps := manager.predicted_stream_fps()) is None else fps)


class DrainingServer(uvicorn.Server):
    """uvicorn's server; SIGTERM drains (see the module docstring). ``begin_drain()`` does the same without a
    signal (tests, or a server that does not run on the main thread)."""

    CLOSE_WAIT_S = 3.0          # after the grace: for the closed streams' WebSockets to send the notice and close
    MIGRATE_RETRY_S = 2.0       # while draining with a migration target: try moving the remaining streams again

    def __init__(self, config: uvicorn.Config, manager: SessionManager, grace_s: float,
                 clock=time.monotonic):
        super().__init__(config)
        self.manager = manager
        self.grace_s = grace_s
        self.clock = clock
        self.drain_requested = False
        self.drain_deadline: float | None = None
        self.ended_at: float | None = None          # when the grace ended the remaining streams
        self._migrating = None                       # the drain's migration task
        self._next_migration = 0.0

    def handle_exit(self, sig: int, frame) -> None:
        # a signal handler: set a flag only (the next tick, within 0.1 s, starts the drain). Not recorded as a
        # captured signal, so uvicorn does not re-raise it after the shutdown and the process exits 0.
        if sig == signal.SIGTERM and not self.drain_requested and not self.should_exit:
            self.drain_requested = True
            return
        super().handle_exit(sig, frame)

    def begin_drain(self) -> None:
        self.drain_requested = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_requested and not self.should_exit:
            now = self.clock()
            if self.drain_deadline is None:
                self.drain_deadline = now + self.grace_s
                self.manager.start_drain()
                log.info("SIGTERM: draining for up to %g s", self.grace_s)
            if self.ended_at is not None:
                if not self.server_state.connections or now >= self.ended_at + self.CLOSE_WAIT_S:
                    self.should_exit = True
            elif self._migration_due(now):
                self._migrating = asyncio.ensure_future(self.manager.migrations.migrate_all("draining"))
                self._next_migration = now + self.MIGRATE_RETRY_S
            elif self.manager.count == 0:
                log.info("drained: no stream left, shutting down")
                self.should_exit = True
            elif now >= self.drain_deadline:
                log.info("drain grace of %g s over: closing %d streams", self.grace_s, self.manager.count)
                self.ended_at = now
                self.manager.end_all("draining", f"The server is shutting down (drain grace of {self.grace_s:g} s "
                                                 f"over). Connect again to be served by another server.")
        return await super().on_tick(counter)

    def _migration_due(self, now: float) -> bool:
        m = self.manager
        if m.settings.migrate_to is None or m.count == 0 or getattr(m, "migrations", None) is None:
            return False
        return (self._migrating is None or self._migrating.done()) and now >= self._next_migration
