"""Run a model before and after a rewrite on the same inputs and report each output's drift.

Both models run on ONNX Runtime CPU with graph optimizations off, so the comparison sees the
functions the two graphs compute and not fusion choices: a rewrite that changes nothing
(``--method none``, ``tggbc --r 0``) reproduces every output bit for bit (``exact``).

Inputs are given (``.npz`` by input name) or seeded random: float inputs ~ N(0, 1), bool
inputs all False (a random padding mask could hide every key), integer inputs 0. Symbolic
dimensions become 1. An input whose shape differs between the models (GPQ shrinks
StreamPETR's propagated queries) gets its own random values; outputs whose shapes differ
are reported as not comparable.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from edgeprune.errors import ParameterError
from edgeprune.graph.run import cpu_session, fits_declared as _fits, random_inputs  # noqa: F401 (re-exported)
from edgeprune.io import read_npz

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class OutputDrift:
    """One output compared: ``max_rel`` is max |a - b| over max |a| (the output's scale)."""

    name: str
    shape_before: tuple[int, ...]
    shape_after: tuple[int, ...] | None
    max_abs: float | None         # None: not comparable (shape changed or output missing)
    max_rel: float | None
    exact: bool
    nonfinite: int = 0               # NaN/inf entries in the rewritten output where the input model has none

    def describe(self) -> str:
        if self.max_abs is None:
            after = "missing" if self.shape_after is None else f"shape {list(self.shape_after)}"
            return f"{self.name}: not compared (shape {list(self.shape_before)} -> {after})"
        tag = "exact" if self.exact else f"max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g}"
        bad = f", {self.nonfinite} non-finite values" if self.nonfinite else ""
        return f"{self.name} {list(self.shape_before)}: {tag}{bad}"


@dataclass(frozen=True)
class VerifyReport:
    """Drift of every output of the input model, in output order."""

    outputs: tuple[OutputDrift, ...]
    inputs: str                      # "random (seed 0)" or the file / "given"

    @property
    def exact(self) -> bool:
        return all(o.exact for o in self.outputs)

    @property
    def max_abs(self) -> float | None:
        values = [o.max_abs for o in self.outputs if o.max_abs is not None]
        return max(values) if values else None

    def lines(self) -> list:
        return [f"  {o.describe()}" for o in self.outputs]


def session(path: str | os.PathLike) -> Any:
    """A CPU session without graph optimizations (see the module docstring)."""
    return cpu_session(path, optimize=False)


def load_inputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Arrays of an ``.npz`` file by name (finite; see :func:`edgeprune.io.read_npz`)."""
    return read_npz(path, "inputs file", "give an .npz with one array per model input")


def check_given_inputs(sess: Any, given: Mapping[str, np.ndarray]) -> None:
    """Given arrays must name exactly the model's inputs, each with a fitting shape.

    Anything else used to be replaced by random data while the report said "given".
    """
    declared = {meta.name: meta.shape for meta in sess.get_inputs()}
    problems = [f"{n} missing (model: {list(declared[n])})" for n in declared if n not in given]
    problems += [f"{n} {list(np.shape(given[n]))} (model: {list(declared[n])})" for n in declared
                 if n in given and not _fits(np.shape(given[n]), declared[n])]
    problems += [f"{n} is not a model input" for n in given if n not in declared]
    if problems:
        raise ParameterError(f"--inputs does not match the model's inputs: {'; '.join(problems)}; "
                             "save one array per input name with the model's shape")


def output_drift(name: str, ref: np.ndarray, got: np.ndarray | None) -> OutputDrift:
    if got is None or got.shape != ref.shape:
        return OutputDrift(name, ref.shape, None if got is None else got.shape, None, None, False)
    a, b = ref.astype(np.float64), got.astype(np.float64)
    finite = np.isfinite(a)
    bad = int(np.count_nonzero(finite & ~np.isfinite(b)))
    both = finite & np.isfinite(b)
    diff = np.abs(a - b)[both]
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(a[both]).max()) if diff.size else 0.0
    exact = bad == 0 and np.array_equal(ref, got, equal_nan=True)
    return OutputDrift(name, ref.shape, got.shape, max_abs, max_abs / scale if scale > 0 else max_abs, exact, bad)


def compare_models(before: str | os.PathLike, after: str | os.PathLike, *, seed: int = 0,
                   inputs: Mapping[str, np.ndarray] | None = None, label: str | None = None) -> VerifyReport:
    """Run both models (paths) on the same inputs; drift of each output of ``before``."""
    s_before, s_after = session(before), session(after)
    if inputs is not None:
        check_given_inputs(s_before, inputs)
    feeds = random_inputs(s_before, seed, inputs)
    feeds_after = random_inputs(s_after, seed, feeds)
    names = [o.name for o in s_before.get_outputs()]
    ref = dict(zip(names, s_before.run(names, feeds)))
    after_names = [o.name for o in s_after.get_outputs()]
    got = dict(zip(after_names, s_after.run(after_names, feeds_after)))
    drifts = tuple(output_drift(n, ref[n], got.get(n)) for n in names)
    for d in drifts:
        log.debug("verify %s", d.describe())
    return VerifyReport(drifts, label or ("given" if inputs is not None else f"random (seed {seed})"))
