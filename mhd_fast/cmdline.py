"""What every command of the command line shares (``cli`` and ``sweep`` both import it, and it
imports neither): the program's name and a parser whose errors are one line."""
from __future__ import annotations

import argparse
import sys

PROG = "mhd-fast"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: 'mhd-fast: error: ...' and exit status 2, no usage dump."""

    def error(self, message: str):  # noqa: D401  (argparse's hook)
        sys.stderr.write(f"{PROG}: error: {message}\n")
        raise SystemExit(2)
