"""``edgeprune`` entry point: dispatches to one module per subcommand.

A subcommand module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. Adding a command = one new module + one entry in ``COMMANDS``.
Modules must import heavy dependencies (torch, onnx) inside ``run`` so that
``edgeprune --help`` works on a board with only the runtime install.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from types import ModuleType
from typing import Sequence

from edgeprune import __version__
from edgeprune.errors import EdgepruneError, InternalError, UserError

# Order is the order shown in --help.
COMMANDS: tuple[str, ...] = (
    "demo",
    "export",
    "inspect",
    "rewrite",
    "bench",
    "devices",
    "wheelhouse",
    "dataset",
    "eval",
    "compare",
)

log = logging.getLogger("edgeprune")


def _load(name: str) -> ModuleType:
    return importlib.import_module(f"edgeprune.cli.{name}_cmd")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (tests swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(verbose: bool) -> None:
    """One handler on the ``edgeprune`` logger; records still propagate (pytest's caplog sees them)."""
    for handler in [h for h in log.handlers if isinstance(h, _StderrHandler)]:
        log.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeprune",
        description="Export, prune and benchmark PETR-family 3D detectors as ONNX on edge boards.",
    )
    parser.add_argument("--version", action="version", version=f"edgeprune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = _load(name)
        cmd = sub.add_parser(module.NAME, help=module.HELP, description=module.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(cmd)
        cmd.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._module.run(args) or 0)
    except UserError as exc:
        if args.verbose:
            log.exception("error")
        print(f"edgeprune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except EdgepruneError as exc:
        if args.verbose:
            log.exception("error")
        print(f"edgeprune {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1 if not isinstance(exc, InternalError) else 3
    except BrokenPipeError:                      # e.g. `edgeprune export --list-models | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"edgeprune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
