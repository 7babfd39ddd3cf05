"""The command line answers at once: building the parser, ``--help`` and argument errors import no torch,
diffusers or transformers; every option says what it does; seeds have one range everywhere."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from wanstream.cli.main import COMMANDS, build_parser

HEAVY = ("torch", "diffusers", "transformers", "numpy", "av", "fastapi", "aiortc", "pydantic")


def _loaded_after(code: str) -> list[str]:
    probe = (f"import sys\n{code}\n"
             f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    return eval(out.stdout.strip().splitlines()[-1])


def test_building_the_parser_imports_nothing_heavy():
    assert _loaded_after("from wanstream.cli.main import build_parser; build_parser()") == []


@pytest.mark.parametrize("argv", [["--help"], ["v2v", "--help"], ["serve", "--help"], ["bench", "--help"],
                                  ["eval", "--help"], ["v2v", "a.mp4", "-o", "b.mp4", "--model", "m", "--seed", "-1"],
                                  ["t2v", "-o", "x.mp4", "--model", "m", "--steps", "9"], ["nonsense"]])
def test_help_and_argument_errors_import_nothing_heavy(argv):
    code = ("from wanstream.cli.main import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass")
    assert _loaded_after(code) == []


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_is_registered_and_every_option_has_help():
    subs = _subparsers(build_parser())
    assert set(subs) == set(COMMANDS)
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, p in subs.items() for a in p._actions
               if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not missing, f"options without help: {missing}"


def test_help_shows_defaults():
    text = _subparsers(build_parser())["v2v"].format_help()
    assert "(default: 2)" in text and "(default: 0.8)" in text          # --steps, --noise-scale


@pytest.mark.parametrize("value,ok", [("0", True), ("4294967295", True), ("-1", False), ("4294967296", False),
                                      ("99999999999999999999999", False), ("1.5", False)])
def test_seed_range_is_one_rule_on_every_command(value, ok, capsys):
    parser = build_parser()
    for argv in (["v2v", "a.mp4", "-o", "b.mp4", "--model", "m"], ["t2v", "-o", "b.mp4", "--model", "m"],
                 ["clip", "c.mp4"], ["bench", "--model", "m"]):
        if ok:
            assert parser.parse_args(argv + ["--seed", value]).seed == int(value)
        else:
            with pytest.raises(SystemExit):
                parser.parse_args(argv + ["--seed", value])
            assert "0..4294967295" in capsys.readouterr().err


def test_library_seed_rule_matches():
    from wanstream.core.config import MAX_SEED, StreamSettings
    assert StreamSettings(seed=MAX_SEED).seed == MAX_SEED
    for bad in (-1, MAX_SEED + 1, 2 ** 70, 1.5, True):
        with pytest.raises(ValueError, match="seed must be an integer"):
            StreamSettings(seed=bad)
