"""The ``lmc`` console script: imports the command line inside a guard, so Ctrl-C while Python is still
loading it (click, numpy, onnx) is one line and exit 130, not a traceback."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from lmc.compiler.cli import main as run
    except KeyboardInterrupt:
        print("lmc: interrupted", file=sys.stderr)
        sys.exit(130)
    run()
