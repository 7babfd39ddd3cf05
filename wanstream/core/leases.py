"""Cache-row leases, as host integers (no torch): the one home of how streams' rows are placed in a shared pool.

A stream borrows ``rows`` contiguous cache rows and one prompt slot. Leases stay packed in the order the streams
joined: a new lease goes after the last, a stream that leaves is compacted out once, a stream whose row count
changes (a step change, a reset) is re-laid in place and the leases after it move. So when every stream runs in one
call — the steady state — the call's rows and prompt slots are one contiguous slice each.

:class:`LeaseTable` keeps the leases and returns the :class:`Move` s that keep them packed, in an order that never
overwrites a lease before it moved; the storage (``models.kv_cache.KVPool``) copies its tensors accordingly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Iterator


@dataclass
class Lease:
    """The rows and the prompt slot a stream borrows."""

    stream: Hashable
    row: int       # first pool row
    rows: int      # rows (the stream's stream-batch levels, or 1)
    slot: int      # prompt K/V slot


@dataclass(frozen=True)
class Move:
    """A lease moves: ``rows`` rows from ``src_row`` to ``dst_row``, its prompt slot from ``src_slot`` to
    ``dst_slot`` (either may stay)."""

    src_row: int
    dst_row: int
    rows: int
    src_slot: int
    dst_slot: int


class LeaseTable:
    """The leases of one pool (see the module docstring). A mapping of stream → :class:`Lease`."""

    def __init__(self) -> None:
        self._leases: dict[Hashable, Lease] = {}

    def __getitem__(self, stream: Hashable) -> Lease:
        return self._leases[stream]

    def __contains__(self, stream: Hashable) -> bool:
        return stream in self._leases

    def __len__(self) -> int:
        return len(self._leases)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._leases)

    def values(self):
        return self._leases.values()

    def get(self, stream: Hashable, default=None):
        return self._leases.get(stream, default)

    @property
    def used_rows(self) -> int:
        return sum(lease.rows for lease in self._leases.values())

    def acquire(self, stream: Hashable, rows: int) -> Lease:
        """A new lease after the last one (the storage must then hold ``used_rows`` rows, ``len`` slots)."""
        if stream in self._leases:
            raise ValueError(f"stream {stream!r} already holds cache rows")
        if rows < 1:
            raise ValueError(f"a stream needs at least one cache row, got {rows}")
        lease = Lease(stream, self.used_rows, rows, len(self._leases))
        self._leases[stream] = lease
        return lease

    def release(self, stream: Hashable) -> list[Move]:
        """Give a stream's lease back; the moves that pack the leases after it."""
        if self._leases.pop(stream, None) is None:
            return []
        return self._repack()

    def resize(self, stream: Hashable, rows: int) -> list[Move]:
        """A stream's lease becomes ``rows`` rows; the moves that keep the leases packed (the resized lease's own
        content is the caller's: its rows move with it, then the caller re-lays them)."""
        if rows < 1:
            raise ValueError(f"a stream needs at least one cache row, got {rows}")
        self._leases[stream].rows = rows
        return self._repack()

    def _repack(self) -> list[Move]:
        """Place the leases packed, in lease order. Leases that move down go first (ascending), then those that move
        up (descending), so no lease is overwritten before it moved."""
        targets, row = [], 0
        for slot, lease in enumerate(self._leases.values()):
            targets.append((lease, row, slot))
            row += lease.rows
        down = [t for t in targets if t[1] < t[0].row or t[2] < t[0].slot]
        up = [t for t in targets if t[1] > t[0].row]
        moves = []
        for lease, row, slot in down + up[::-1]:
            if row != lease.row or slot != lease.slot:
                moves.append(Move(lease.row, row, lease.rows, lease.slot, slot))
            lease.row, lease.slot = row, slot
        return moves
