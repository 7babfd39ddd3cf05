"""Parked sessions of a server: their host memory is bounded, the oldest expire first, all of it counted.

A session without input for ``park_after_s`` parks its stream (:mod:`wanstream.engine.parking`: every tensor of its
state in host memory, its cache rows back to the pool) and resumes it on its next frame, exactly where it was. The
:class:`ParkingLot` holds what the parked states weigh: when a new one would take the total over
``park_max_bytes``, the sessions parked longest ago are closed (reason ``parked_expired``, the client is told why)
until it fits; a state larger than the whole bound is not parked (the stream stays on the device).

``/metrics``: ``wanstream_server_parked_streams``, ``wanstream_server_parked_bytes``,
``wanstream_server_{parks,resumes,parked_expired,parks_refused}_total`` and the limit ``park_max_bytes``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

EXPIRED_MESSAGE = ("This stream was parked (no input for a while) and has expired: the server's memory for parked "
                   "streams was needed for more recently parked ones. Start the stream again.")


class ParkingLot:
    def __init__(self, totals, max_bytes: int):
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._parked: OrderedDict[str, tuple[object, int]] = OrderedDict()     # session id → (session, bytes)
        self.counts = {"parks": 0, "resumes": 0, "parked_expired": 0, "parks_refused": 0}
        totals.gauge("server_parked_streams", "Streams parked in host memory now", lambda: len(self._parked))
        totals.gauge("server_parked_bytes", "Host bytes held by parked streams", lambda: self.bytes)
        docs = {"parks": "Streams parked (no input for park_after_s)",
                "resumes": "Parked streams resumed by new input",
                "parked_expired": "Parked streams closed because park_max_bytes was reached (oldest first)",
                "parks_refused": "Parks refused: one stream's state is larger than park_max_bytes"}
        for key, doc in docs.items():
            totals.gauge(f"server_{key}", doc, lambda key=key: self.counts[key], counter=True)
        totals.limits(park_max_bytes=max_bytes)

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(n for _, n in self._parked.values())

    def __len__(self) -> int:
        return len(self._parked)

    def fits(self, nbytes: int) -> bool:
        """A state of ``nbytes`` may be parked at all (counted as refused otherwise)."""
        if nbytes > self.max_bytes:
            with self._lock:
                self.counts["parks_refused"] += 1
            return False
        return True

    def add(self, session, nbytes: int) -> list:
        """``session`` parked a state of ``nbytes``; returns the sessions to expire (oldest first) so that the total
        stays within the bound (the caller closes them)."""
        with self._lock:
            self._parked[session.id] = (session, nbytes)
            self.counts["parks"] += 1
            total = sum(n for _, n in self._parked.values())
            victims = []
            for sid, (other, n) in list(self._parked.items()):
                if total <= self.max_bytes:
                    break
                if other is session:
                    continue
                del self._parked[sid]
                total -= n
                victims.append(other)
                self.counts["parked_expired"] += 1
            return victims

    def remove(self, session, resumed: bool = False) -> None:
        with self._lock:
            if self._parked.pop(session.id, None) is not None and resumed:
                self.counts["resumes"] += 1
