"""argparse value types shared by every command: each rejects a bad value with a message naming the rule."""

from __future__ import annotations

import argparse
from typing import Callable


def int_in(lo: int, hi: int | None = None, what: str = "value") -> Callable[[str], int]:
    """An integer in ``lo..hi`` (no upper bound when ``hi`` is None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = lo - 1
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{what} must be an integer in {lo}..{hi if hi is not None else 'inf'}, "
                                             f"got {text!r}")
        return value
    return parse


def float_in(lo: float, hi: float | None = None, what: str = "value") -> Callable[[str], float]:
    """A number in ``(lo, hi]`` (no upper bound when ``hi`` is None)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = lo
        if not value > lo or (hi is not None and value > hi):
            upper = f"{hi:g}" if hi is not None else "inf"
            raise argparse.ArgumentTypeError(f"{what} must be in ({lo:g}, {upper}], got {text!r}")
        return value
    return parse


def resolution(text: str) -> tuple[int, int]:
    """``WxH`` with positive multiples of 16."""
    from .io.video import parse_resolution
    try:
        return parse_resolution(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
