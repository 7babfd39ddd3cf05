"""argparse value types shared by every command (each rejects a bad value with a message naming the rule), and
the parser class every command uses (its help shows each option's default)."""

from __future__ import annotations

import argparse
from typing import Callable

from wanstream.core.config import MAX_SEED, check_seed
from wanstream.core.geometry import parse_resolution


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after an option's help, unless the help already states its default or there is none
    worth showing (flags, ``None``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with :class:`_Formatter` (defaults in the help)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


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


def seed(text: str) -> int:
    """A seed in the one documented range, ``0 .. 2**32 - 1``."""
    try:
        return check_seed(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed must be an integer in 0..{MAX_SEED}, got {text!r}") from None


def resolution(text: str) -> tuple[int, int]:
    """``WxH`` with positive multiples of 16."""
    try:
        return parse_resolution(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_backbone_arg(p) -> None:
    """``--backbone``: which causal model of a folder to load (core/backbones.py; the layout names one)."""
    from wanstream.core.backbones import BACKBONES
    p.add_argument("--backbone", choices=list(BACKBONES), default=None,
                   help="which generator of the model folder to run (default: the one its layout holds; "
                        "longlive-infinite: LongLive with window-slot RoPE positions for unbounded runs)")


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
