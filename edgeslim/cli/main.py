"""``edgeslim COMMAND ...``: the parser, built from the command modules, and the dispatch of a command line to its
module's ``run``.

A command is one module in this package with ``HELP`` (its line in ``edgeslim --help``), ``add_arguments(parser)``
(its options, mostly groups from ``args``) and ``run(args) -> int`` (options -> configs -> a job -> its printer), plus
its entry in ``COMMANDS``. Every user-facing problem ends in one line ``edgeslim: error: ...`` and exit status 2."""

from __future__ import annotations

import argparse
import sys

from ..errors import EdgeslimError
from . import analyze, demo, export, factorize, inspect, mixed, plan, prune, qat, quantize, sensitivity
from .args import HelpFormatter
from .checks import check_numbers, check_out

__all__ = ["COMMANDS", "build_parser", "main"]

# command name -> its module (HELP, add_arguments, run), in the order of `edgeslim --help`
COMMANDS = {"demo": demo, "inspect": inspect, "quantize": quantize, "analyze": analyze, "sensitivity": sensitivity,
            "mixed": mixed, "qat": qat, "prune": prune, "factorize": factorize, "plan": plan, "export": export}


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    parser = argparse.ArgumentParser(prog="edgeslim", description="Make CNNs small and fast for embedded devices.")
    try:
        parser.add_argument("--version", action="version", version=f"edgeslim {version('edgeslim')}")
    except PackageNotFoundError:  # running from a source tree that was not installed
        parser.add_argument("--version", action="version", version="edgeslim (not installed)")
    sub = parser.add_subparsers(dest="command", required=True,
                                parser_class=lambda **kw: argparse.ArgumentParser(
                                    formatter_class=HelpFormatter, **kw))
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.HELP))
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    from ..api import FloatIslandWarning

    if issubclass(category, FloatIslandWarning):
        print(f"edgeslim: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """The ``edgeslim`` command (``argv`` None: this process's command line, and the process is the command's:
    ``cpu.keep_freed_memory`` tunes its allocator)."""
    if argv is None:
        from ..cpu import keep_freed_memory

        keep_freed_memory()
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line, for the reports' provenance
    import warnings

    warnings.showwarning = _show_warning
    from ..io.staging import sigterm_as_interrupt, untouched_on_failure

    try:  # SIGTERM cleans up staging folders as Ctrl-C does; a failed run removes the --out it created
        with sigterm_as_interrupt(), untouched_on_failure(getattr(args, "out", None)):
            check_out(args)
            check_numbers(args)
            return COMMANDS[args.command].run(args)
    except EdgeslimError as exc:
        print(f"edgeslim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgeslim: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a file system refusal the checks did not foresee (a read-only or special --out, ...)
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"edgeslim: error: {exc.strerror or exc}{where}: check the paths and their permissions", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - never a traceback; EDGESLIM_DEBUG=1 shows it
        import os

        if os.environ.get("EDGESLIM_DEBUG"):
            raise
        print(f"edgeslim: error: internal error ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
              "rerun with EDGESLIM_DEBUG=1 for the traceback and report it", file=sys.stderr)
        return 2
