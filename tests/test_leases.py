"""Lease placement (pure, no torch): leases stay packed in join order, and the moves never overwrite a lease
before it moved — replayed on a plain list standing in for the storage."""

from __future__ import annotations

import random

import pytest

from wanstream.core.leases import LeaseTable


def _replay(storage: list, slots: list, moves) -> None:
    for m in moves:
        storage[m.dst_row: m.dst_row + m.rows] = list(storage[m.src_row: m.src_row + m.rows])
        if m.dst_slot != m.src_slot:
            slots[m.dst_slot] = slots[m.src_slot]


def test_acquire_release_resize_keep_leases_packed_and_contents_intact():
    rng = random.Random(0)
    table, storage, slots = LeaseTable(), [None] * 64, [None] * 16
    owned: dict = {}
    for step in range(300):
        live = list(table)
        op = rng.choice(["acquire", "release", "resize"] if live else ["acquire"])
        if op == "acquire" and len(table) < 12:
            sid, rows = step, rng.randint(1, 4)
            lease = table.acquire(sid, rows)
            storage[lease.row: lease.row + rows] = [(sid, r) for r in range(rows)]
            slots[lease.slot] = sid
            owned[sid] = rows
        elif op == "release" and live:
            sid = rng.choice(live)
            _replay(storage, slots, table.release(sid))
            owned.pop(sid)
        elif op == "resize" and live:
            sid, rows = rng.choice(live), rng.randint(1, 4)
            _replay(storage, slots, table.resize(sid, rows))
            lease = table[sid]
            storage[lease.row: lease.row + rows] = [(sid, r) for r in range(rows)]     # the caller re-lays them
            owned[sid] = rows
        row = 0
        for slot, sid in enumerate(table):                      # packed, in join order
            lease = table[sid]
            assert (lease.row, lease.slot, lease.rows) == (row, slot, owned[sid])
            assert storage[row: row + lease.rows] == [(sid, r) for r in range(lease.rows)]
            assert slots[slot] == sid
            row += lease.rows
        assert table.used_rows == row


def test_bad_leases_are_refused():
    table = LeaseTable()
    table.acquire("a", 2)
    with pytest.raises(ValueError, match="already holds"):
        table.acquire("a", 1)
    with pytest.raises(ValueError, match="at least one"):
        table.acquire("b", 0)
    assert table.release("nobody") == []
