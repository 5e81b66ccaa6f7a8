"""The command line ``edgeslim``: ``main`` parses and dispatches (``cli.main``), shared option groups live in
``cli.args``, and each command is one module (``cli.quantize``, ``cli.mixed``, ...) with its own printer."""

from .main import build_parser, main

__all__ = ["main", "build_parser"]
