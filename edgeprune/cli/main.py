"""``edgeprune`` entry point: dispatches to one module per subcommand.

A subcommand module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. Adding a command = one new module + one entry in ``COMMANDS`` (the module
name with ``_`` where the command has ``-``: ``train_demo`` -> ``train-demo``).
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
from typing import NoReturn, Sequence

from edgeprune import __version__
from edgeprune.cli.signals import Terminated, signals_as_interrupts
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
    "sweep",
    "train_demo",
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


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line and a hint, not the whole usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


VERBOSE_HELP = "debug logging and full tracebacks"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="edgeprune",
        description="Export, prune and benchmark PETR-family 3D detectors as ONNX on edge boards.",
    )
    parser.add_argument("--version", action="version", version=f"edgeprune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = _load(name)
        cmd = sub.add_parser(module.NAME, help=module.HELP, description=module.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(cmd)
        # -v after the subcommand too; SUPPRESS keeps a -v given before it
        cmd.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
        cmd.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.command is None:
        parser.print_help()
        return 2
    with signals_as_interrupts():
        try:
            return _run(args)
        except Terminated as exc:            # SIGTERM/SIGHUP, after the same cleanup as Ctrl-C
            print(f"edgeprune {args.command}: terminated ({exc})", file=sys.stderr)
            return exc.exit_code


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    if args.verbose:
        log.exception("error")
    print(f"edgeprune {args.command}: {message}", file=sys.stderr)
    return code


def _run(args: argparse.Namespace) -> int:
    """The command, with every failure as one line (a traceback with -v) and its exit code."""
    try:
        return int(args._module.run(args) or 0)
    except UserError as exc:
        return _fail(args, f"error: {exc}", 2)
    except EdgepruneError as exc:
        return _fail(args, f"{type(exc).__name__}: {exc}", 1 if not isinstance(exc, InternalError) else 3)
    except BrokenPipeError:                      # e.g. `edgeprune export --list-models | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:                       # disk full, read-only, name too long, permission ...
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(args, f"error: {where}{exc.strerror or exc}", 2)
    except Terminated:
        raise
    except KeyboardInterrupt:
        print(f"edgeprune {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not _is_decode_error(exc):
            raise
        return _fail(args, f"error: cannot read a model or data file ({type(exc).__name__}: {_first_line(exc)})", 2)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_decode_error(exc: BaseException) -> bool:
    """protobuf's DecodeError and onnx/onnxruntime load failures, told apart without importing them
    (they are optional on boards): the libraries' own modules raise them."""
    module = type(exc).__module__ or ""
    return module.split(".")[0] in ("google", "onnx", "onnxruntime") and (
        "Decode" in type(exc).__name__ or "Protobuf" in type(exc).__name__ or module.startswith("onnx.checker"))


if __name__ == "__main__":
    sys.exit(main())
