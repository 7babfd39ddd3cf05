"""The ``wanstream`` command line — the only home of argparse. Parsing imports no torch, diffusers or
transformers (tests/test_cli_fast.py checks); every command imports what it needs when it runs."""

from wanstream.cli.main import main

__all__ = ["main"]
