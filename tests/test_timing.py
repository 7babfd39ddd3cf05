"""The one section timer (``engine.timing.PhaseTimer``): ticks, and sections recorded between ticks (their own
tick, or with ``carry`` counted in the next one — a pipeline stage's encode belongs to its next call)."""

from __future__ import annotations

import time

from wanstream.engine.timing import PhaseTimer


def _record(timer: PhaseTimer, name: str, seconds: float = 0.002) -> None:
    with timer.section(name):
        time.sleep(seconds)


def test_ticks_and_a_section_between_ticks_opens_its_own():
    timer = PhaseTimer("cpu")
    timer.start(rows=2)
    _record(timer, "dit")
    _record(timer, "dit")
    timer.end()
    _record(timer, "encode")           # between ticks: a tick of its own
    timer.start(rows=1)
    _record(timer, "decode")
    timer.end()
    ticks = timer.ticks()
    assert [(info, sorted(secs)) for info, secs in ticks] == [({"rows": 2}, ["dit"]), ({}, ["encode"]),
                                                             ({"rows": 1}, ["decode"])]
    assert ticks[0][1]["dit"] >= 0.004
    assert timer.ticks() == []         # handed out once


def test_carry_counts_a_section_between_ticks_in_the_next_tick():
    timer = PhaseTimer("cpu", keep=4, carry=True)
    _record(timer, "busy")             # rank 0's encode, before its call
    timer.start()
    with timer.section("busy"):
        _record(timer, "dit")
    timer.end()
    timer.start()                      # nothing carried into the second call
    _record(timer, "busy")
    timer.end()
    (_, first), (_, second) = timer.ticks()
    assert sorted(first) == ["busy", "dit"] and first["busy"] >= first["dit"] + 0.002
    assert sorted(second) == ["busy"]
