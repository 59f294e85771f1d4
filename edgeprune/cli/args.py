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


# ---------------------------------------------------------------- key-count options
# --r, --n, --k: how many keys are pruned (tgGBC) or merged (ToMe), over how many layers, and
# tgGBC's top queries. Used by `edgeprune rewrite`, `edgeprune inspect` and `edgeprune demo`;
# the passes read them back in ``from_args`` (``args.r``, ``args.n``, ``args.k``).

def add_key_count_arguments(target: ArgumentTarget, *, r: int | None = None, n: int | None = None,
                            k: int | None = None, k_default: str = "default 0") -> None:
    """Add ``--r``/``--n``/``--k`` with the given defaults (None: "not given", for a pass to
    require or default itself; ``k_default`` then says in the help what that means)."""
    def default(value: int | None, otherwise: str) -> str:
        return f"default {value}" if value is not None else otherwise

    target.add_argument("--r", "--keys-pruned", dest="r", type=int, default=r, metavar="R",
                        help=f"keys (image tokens) pruned or merged in total ({default(r, 'required to prune')})")
    target.add_argument("--n", "--pruning-layers", dest="n", type=int, default=n, metavar="N",
                        help=f"number of decoder layers that prune, from the first ({default(n, 'default 1')})")
    target.add_argument("--k", "--top-queries", dest="k", type=int, default=k, metavar="K",
                        help=f"tgGBC: top queries whose attention scores the keys, 0 = all ({default(k, k_default)})")


# ---------------------------------------------------------------- input-data options
# --inputs, --seed: the arrays a model is run on. Used by `edgeprune rewrite` (verification)
# and `edgeprune bench`.

def add_input_arguments(target: ArgumentTarget, *, purpose: str = "inputs") -> None:
    """Add ``--inputs X.npz`` and ``--seed``; ``purpose`` names what the arrays are for in the help."""
    target.add_argument("--inputs", default=None, metavar="X.npz",
                        help=f"{purpose}: arrays by input name (default: seeded random data)")
    target.add_argument("--seed", type=int, default=0, help=f"seed of the random {purpose} (default 0)")


# ---------------------------------------------------------------- calibration options
# --calib, --data: what a model is calibrated on. Used by `edgeprune rewrite`: GPQ's one-shot
# ranking (--keep-queries K --calib X.npz) and static int8 (--precision int8).

def add_calibration_arguments(target: ArgumentTarget) -> None:
    """Add ``--calib X.npz`` and ``--data DIR`` (read back by the passes' ``from_args``)."""
    target.add_argument("--calib", dest="calib", default=None, metavar="X.npz",
                        help="calibration inputs by input name, [B, ...] or [S, B, ...] (GPQ --keep-queries, "
                             "--precision int8 on a decoder)")
    target.add_argument("--data", dest="data", default=None, metavar="DIR",
                        help="--precision int8 on a whole-model export: calibrate on this dataset's scenes "
                             "(edgeprune dataset synth)")
