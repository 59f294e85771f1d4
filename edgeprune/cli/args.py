"""Reusable argument groups (Polygraphy's pattern): each option set is defined once here.

A subcommand calls ``add_<group>_arguments(parser_or_group, ...)`` for the options it shares
with others, so a flag keeps one name, type, meaning and help text everywhere. Each group
lives in its own clearly separated function (with a helper that reads the parsed values
back when they need interpreting); add new groups the same way.
"""
from __future__ import annotations

import argparse
from typing import Any, Protocol


class ArgumentTarget(Protocol):
    """An ``argparse.ArgumentParser`` or one of its argument groups."""

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action: ...


# ---------------------------------------------------------------- timing options
# --warmup, --repeats, --time-budget, --threads: used by `edgeprune bench`, `edgeprune demo`
# and the scripts in benchmarks/.

BUDGET_REPEATS = 1_000_000   # cap on repeats when only --time-budget bounds the run


def add_timing_arguments(target: ArgumentTarget, *, warmup: int = 5, repeats: int = 50,
                         time_budget: bool = True, budget_lifts_repeats: bool = False,
                         threads_default: str = "ORT's") -> None:
    """Add the timing options to ``target`` (a parser or an argument group).

    ``warmup``/``repeats`` are the defaults. ``time_budget`` adds ``--time-budget``; with
    ``budget_lifts_repeats`` an unset ``--repeats`` means "no limit" when a budget is given
    (the parsed value is then None: read it with :func:`timing_repeats`), otherwise
    ``--repeats`` stays the upper bound. ``threads_default`` says in the help where the
    thread count comes from when ``--threads`` is not given.
    """
    target.add_argument("--warmup", type=int, default=warmup, help=f"untimed runs per model first (default {warmup})")
    if budget_lifts_repeats:
        target.add_argument("--repeats", type=int, default=None,
                            help=f"timed runs per model (default {repeats}; with --time-budget: no limit)")
    else:
        bound = "; upper bound with --time-budget" if time_budget else ""
        target.add_argument("--repeats", type=int, default=repeats,
                            help=f"timed runs per model (default {repeats}{bound})")
    if time_budget:
        target.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                            help="stop after the round that passes this many seconds (at least 3 runs each)")
    target.add_argument("--threads", type=int, default=None,
                        help=f"ORT intra-op threads (default: {threads_default})")


def timing_repeats(args: argparse.Namespace, default: int) -> int:
    """``--repeats`` as given; unset: ``default``, or no limit (``BUDGET_REPEATS``) with a time budget."""
    if args.repeats is not None:
        return args.repeats
    return BUDGET_REPEATS if getattr(args, "time_budget", None) is not None else default
