"""The settings a sweep covers: the grid of ``--method x --r x --n x --k x --precision``, checked up front.

A :class:`Setting` is one rewrite of the input model. The grid always holds the unpruned
baseline (``method="none"``, fp32; its fp16 copy too when fp16 is asked): every mAP drop and
speedup is measured against it. ``--k`` is tgGBC's alone (its top queries); ToMe and random
pruning take r and n, so their settings do not multiply over k. Every setting is validated
against the model's decoder (keys, layers, queries) before the first rewrite, so a bad
value fails in one line instead of after an hour of sweeping.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from edgeprune.errors import ParameterError

BASELINE = "none"
K_METHODS = frozenset({"tggbc"})          # methods that read --k (top queries)
ALL_QUERIES = "all"                       # --k token for k = 0


@dataclass(frozen=True)
class Setting:
    """One rewrite of the input model: method and key counts (0 when they do not apply), precision."""

    method: str
    r: int = 0
    n: int = 0
    k: int = 0
    precision: str = "fp32"
    seed: int = 0                          # random pruning's subset seed (0 for the other methods)

    @property
    def is_baseline(self) -> bool:
        return self.method == BASELINE

    @property
    def id(self) -> str:
        """File-name-safe and unique: ``tggbc-r528-n2-k175-fp32``, ``random-r528-n2-s0-fp32``, ``none-fp32``."""
        if self.is_baseline:
            return f"{BASELINE}-{self.precision}"
        k = f"-k{self.k}" if self.method in K_METHODS else ""
        seed = f"-s{self.seed}" if self.method == "random" else ""
        return f"{self.method}-r{self.r}-n{self.n}{k}{seed}-{self.precision}"

    def passes(self) -> list[Any]:
        """The registry's pass for this setting, built as ``rewrite --method ... --r --n --k --seed`` would."""
        from edgeprune.passes import registry

        cls = registry.get_method(self.method)
        if self.is_baseline:
            return [cls()]
        args = argparse.Namespace(r=self.r, n=self.n, k=self.k if self.method in K_METHODS else None, seed=self.seed)
        return [cls.from_args(args)]

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), id=self.id)


@dataclass(frozen=True)
class DecoderSize:
    """What the settings are checked against: the model's decoder as discovery sees it."""

    num_keys: int
    num_layers: int
    num_queries: int


# --------------------------------------------------------------------------- parsing the lists
def _tokens(text: str, flag: str, example: str) -> list[str]:
    tokens = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in tokens):
        raise ParameterError(f"{flag} {text!r}: give a comma-separated list without empty items, e.g. {flag} {example}")
    return tokens


def _int(token: str, flag: str, low: int) -> int:
    try:
        value = int(token)
    except ValueError:
        raise ParameterError(f"{flag}: {token!r} is not a whole number") from None
    if value < low:
        raise ParameterError(f"{flag}: {value} must be >= {low}")
    return value


def parse_r(text: str, num_keys: int) -> list[int]:
    """``--r``: key counts, or percentages of the model's keys (``50%`` of 1056 keys -> 528)."""
    values = []
    for token in _tokens(text, "--r", "25%,50%,528"):
        if token.endswith("%"):
            try:
                share = float(token[:-1])
            except ValueError:
                raise ParameterError(f"--r: {token!r} is not a percentage such as 50%") from None
            if not 0 < share < 100:
                raise ParameterError(f"--r: {token} must be a share of the keys between 0% and 100% (exclusive)")
            values.append(int(round(num_keys * share / 100)))
        else:
            values.append(_int(token, "--r", 1))
    return _unique(values)


def parse_n(text: str) -> list[int]:
    return _unique([_int(t, "--n", 1) for t in _tokens(text, "--n", "1,2")])


def parse_k(text: str) -> list[int]:
    """``--k``: top-query counts; ``all`` (or 0) = every query."""
    return _unique([0 if t == ALL_QUERIES else _int(t, "--k", 0) for t in _tokens(text, "--k", "50,175,all")])


def parse_names(text: str, flag: str, available: Sequence[str]) -> list[str]:
    names = _unique(_tokens(text, flag, ",".join(available[:2])))
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ParameterError(f"{flag} {','.join(unknown)}: unknown; available: {', '.join(available)}")
    return names


def _unique(values: list[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


# --------------------------------------------------------------------------- the grid
def build_grid(methods: Sequence[str], rs: Sequence[int], ns: Sequence[int], ks: Sequence[int],
               precisions: Sequence[str], seed: int = 0) -> list[Setting]:
    """Baseline(s) first, then every method x r x n (x k for tgGBC) x precision, in the order given."""
    grid = [Setting(BASELINE, precision="fp32")] + [Setting(BASELINE, precision=p) for p in precisions if p != "fp32"]
    for method in methods:
        for r in rs:
            for n in ns:
                for k in (ks if method in K_METHODS else [0]):
                    grid += [Setting(method, r, n, k, p, seed if method == "random" else 0) for p in precisions]
    return _unique(grid)


def check_grid(grid: Sequence[Setting], size: DecoderSize) -> None:
    """Raise ParameterError (naming the setting and the fix) for a value the model cannot run with."""
    from edgeprune.methods.tggbc import TgGBCConfig
    from edgeprune.methods.tome import ToMeConfig

    for s in grid:
        if s.is_baseline:
            continue
        if s.r >= size.num_keys:
            raise ParameterError(f"--r {s.r} is not smaller than the model's {size.num_keys} keys; give --r values "
                                 f"below {size.num_keys} (or percentages such as 50%)")
        if s.n >= size.num_layers:
            raise ParameterError(f"--n {s.n}: pruning after layer {s.n} feeds no later layer; this model has "
                                 f"{size.num_layers} decoder layers, so --n must be in [1, {size.num_layers - 1}]")
        try:
            if s.method == "tome":
                ToMeConfig(s.r, s.n).validate(size.num_keys, size.num_layers)
            else:
                TgGBCConfig(s.r, s.n, s.k).validate(size.num_keys, size.num_layers, size.num_queries)
        except ParameterError as exc:
            raise ParameterError(f"setting {s.id}: {exc}") from None


def decoder_size(model: str) -> DecoderSize:
    """Keys, layers and queries of ``model``'s decoder (discovery, as the rewrites will see it)."""
    from edgeprune.graph.files import load_model
    from edgeprune.passes.discovery.discover import discover

    structure = discover(load_model(model))
    return DecoderSize(structure.num_keys, structure.num_layers, structure.num_queries)
