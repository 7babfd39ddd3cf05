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


TAEHV_ENDS = ("encode", "decode", "both")


def add_taehv_arg(p: argparse.ArgumentParser) -> None:
    """``--taehv [encode|decode|both]``: the TAEHV tiny autoencoder at one end of the stream or both (alone:
    ``decode``, the flag's older meaning). Pass the command line through :func:`taehv_argv` first."""
    p.add_argument("--taehv", nargs="?", const="decode", choices=TAEHV_ENDS, default=None,
                   metavar="{encode,decode,both}",
                   help="the TAEHV tiny autoencoder (ckpts/taew2_1.pth) at the encode end, the decode end or both, "
                        "instead of the Wan VAE (alone: decode)")


def taehv_argv(argv: list[str]) -> list[str]:
    """``--taehv`` followed by anything but ``encode|decode|both`` (``--taehv in.mp4``) stays the bare flag
    (``--taehv=decode``) instead of taking that argument as its value."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--taehv" and (i + 1 == len(out) or out[i + 1] not in TAEHV_ENDS):
            out[i] = "--taehv=decode"
    return out


def autoencoders(taehv: str | None) -> tuple[str, str]:
    """``(encoder, decoder)``, each ``vae`` or ``taehv``, for a ``--taehv`` value."""
    return ("taehv" if taehv in ("encode", "both") else "vae", "taehv" if taehv in ("decode", "both") else "vae")
