"""Check an exported graph against the PyTorch model it came from.

Both run on the same seeded inputs (ONNX on ONNX Runtime's CPU provider); per output we
report shape match, max absolute and max relative difference, and pass/fail at an
absolute tolerance (default 1e-4, which fp32 decoders must meet).

Relative difference is ``|onnx - torch| / max(|torch|, tolerance)`` per element: elements
smaller than the tolerance are measured against the tolerance, so near-zero values do not
inflate it. Pass/fail uses the absolute difference only.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from edgeprune import _lazy
from edgeprune.errors import ValidationError
from edgeprune.graph.run import PROVIDER, cpu_session, run_all

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class OutputCheck:
    """One output compared."""

    name: str
    reference_shape: tuple[int, ...] | None   # None: the reference lacks this output
    onnx_shape: tuple[int, ...] | None        # None: the ONNX model lacks this output
    max_abs: float
    max_rel: float
    passed: bool

    @property
    def shape_match(self) -> bool:
        return self.reference_shape is not None and self.reference_shape == self.onnx_shape


@dataclass(frozen=True)
class ValidationReport:
    """Per-output comparison of an ONNX model with its reference at one tolerance."""

    outputs: tuple[OutputCheck, ...]
    tolerance: float
    reference: str = "torch"
    provider: str = PROVIDER

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(check.passed for check in self.outputs)

    def failures(self) -> list[str]:
        return [check.name for check in self.outputs if not check.passed]

    def format(self) -> str:
        """A plain-text table, one row per output, and a verdict line."""
        def shape(s: tuple[int, ...] | None) -> str:
            return "missing" if s is None else "x".join(map(str, s)) or "scalar"
        header = ("output", f"{self.reference} shape", "onnx shape", "max abs", "max rel", "result")
        rows = [(c.name, shape(c.reference_shape), shape(c.onnx_shape), f"{c.max_abs:.3e}",
                 f"{c.max_rel:.3e}", "pass" if c.passed else "FAIL") for c in self.outputs]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
        verdict = "PASS" if self.passed else f"FAIL ({', '.join(self.failures()) or 'no outputs'})"
        lines.append(f"validation vs {self.reference} on ONNX Runtime {self.provider}, "
                     f"max abs <= {self.tolerance:g}: {verdict}")
        return "\n".join(lines)


class ExportValidationError(ValidationError):
    """The exported graph does not reproduce the reference; ``report`` says where."""

    def __init__(self, report: ValidationReport, what: str) -> None:
        super().__init__(f"{what} differs from {report.reference} beyond {report.tolerance:g} on "
                         f"{', '.join(report.failures()) or 'every output'}; see the report above "
                         "(use --tolerance to loosen, or --no-validate to keep the file anyway)")
        self.report = report


def _compare_one(name: str, ref: np.ndarray | None, got: np.ndarray | None, tolerance: float) -> OutputCheck:
    ref_shape = None if ref is None else tuple(ref.shape)
    got_shape = None if got is None else tuple(got.shape)
    if ref is None or got is None or ref_shape != got_shape:
        return OutputCheck(name, ref_shape, got_shape, float("inf"), float("inf"), False)
    if ref.size == 0:
        return OutputCheck(name, ref_shape, got_shape, 0.0, 0.0, True)
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    with np.errstate(invalid="ignore"):                               # inf - inf is handled below
        diff = np.abs(got64 - ref64)
    same_nonfinite = (~np.isfinite(ref64)) & (ref64 == got64)       # equal infinities
    diff = np.where(same_nonfinite, 0.0, diff)
    diff = np.where(np.isnan(diff), np.inf, diff)                     # NaN on one side only
    max_abs = float(diff.max())
    max_rel = float((diff / np.maximum(np.abs(np.where(same_nonfinite, 1.0, ref64)), tolerance)).max())
    return OutputCheck(name, ref_shape, got_shape, max_abs, max_rel, max_abs <= tolerance)


def compare_outputs(reference: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray],
                    tolerance: float = DEFAULT_TOLERANCE, reference_label: str = "torch") -> ValidationReport:
    """Compare every output of ``reference`` (then any extra of ``actual``) by name."""
    names = list(reference) + [n for n in actual if n not in reference]
    checks = tuple(_compare_one(n, reference.get(n), actual.get(n), tolerance) for n in names)
    return ValidationReport(checks, tolerance, reference=reference_label)


def ort_session(path: str | os.PathLike) -> Any:
    """An ONNX Runtime CPU session for ``path`` (external data is found next to it)."""
    return cpu_session(path)


def run_torch(model: Any, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Run ``model(*inputs)`` without gradients -> ``{output name: array}``."""
    torch = _lazy.require("torch")
    with torch.no_grad():
        outputs = model(*inputs.values())
    return {name: out.detach().cpu().numpy() for name, out in zip(model.output_names(), outputs)}


def validate_against_torch(model: Any, session: Any, *, batch: int = 1, seed: int = 1,
                           tolerance: float = DEFAULT_TOLERANCE) -> ValidationReport:
    """Run ``model`` (torch, ``.example_inputs``/``.output_names``) and ``session`` on the same
    seeded inputs and compare every output."""
    inputs = model.example_inputs(batch=batch, seed=seed)
    feeds = {name: tensor.detach().cpu().numpy() for name, tensor in inputs.items()}
    reference = run_torch(model, inputs)
    report = compare_outputs(reference, run_all(session, feeds), tolerance)
    log.debug("validation:\n%s", report.format())
    return report
