"""Validation of exports against torch: the comparison itself and the gate in export_onnx."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from edgeprune.export.exporter import export_onnx
from edgeprune.export.validate import ExportValidationError, compare_outputs


def test_compare_outputs_measures_abs_and_rel_difference() -> None:
    ref = {"a": np.array([1.0, -2.0, 0.0], np.float32), "b": np.ones((2, 2), np.float32)}
    got = {"a": np.array([1.0, -2.0005, 0.00002], np.float32), "b": np.ones((2, 2), np.float32)}
    report = compare_outputs(ref, got, tolerance=1e-4)
    a, b = report.outputs
    assert a.shape_match and a.max_abs == pytest.approx(5e-4, rel=1e-3)
    # per element |d| / max(|ref|, tol): 5e-4 / 2 = 2.5e-4 and 2e-5 / 1e-4 = 0.2 (near zero: vs tol)
    assert a.max_rel == pytest.approx(0.2, rel=1e-3)
    assert not a.passed and b.passed and b.max_abs == 0.0
    assert not report.passed and report.failures() == ["a"]
    assert compare_outputs(ref, got, tolerance=1e-3).passed
    table = report.format().splitlines()
    assert len(table) == 4 and table[1].split()[0] == "a" and table[1].split()[-1] == "FAIL"


def test_compare_outputs_fails_on_shape_nan_and_missing_outputs() -> None:
    ref = {"s": np.zeros((2, 3), np.float32), "n": np.zeros(3, np.float32), "m": np.zeros(1, np.float32)}
    got = {"s": np.zeros((3, 2), np.float32), "n": np.array([0, np.nan, 0], np.float32), "x": np.zeros(1)}
    checks = {c.name: c for c in compare_outputs(ref, got).outputs}
    assert not checks["s"].shape_match and not checks["s"].passed
    assert checks["n"].shape_match and checks["n"].max_abs == np.inf and not checks["n"].passed
    assert checks["m"].onnx_shape is None and not checks["m"].passed
    assert checks["x"].reference_shape is None and not checks["x"].passed
    inf = np.array([np.inf, 1.0], np.float32)
    assert compare_outputs({"i": inf}, {"i": inf.copy()}).passed      # equal infinities agree


class TraceDiffers(nn.Module):
    """Adds 1e-3 only while being exported, so the ONNX graph differs from eager torch."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> tuple[Tensor]:
        y = self.proj(x)
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            y = y + 1e-3
        return (y,)

    def example_inputs(self, batch: int = 1, seed: int = 0) -> dict[str, Tensor]:
        return {"x": torch.randn((batch, 8), generator=torch.Generator().manual_seed(seed))}

    def output_names(self) -> list[str]:
        return ["y"]

    def input_names(self) -> list[str]:
        return ["x"]


def test_failing_validation_raises_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    with pytest.raises(ExportValidationError) as info:
        export_onnx(TraceDiffers().eval(), out, record_structure=False)
    (check,) = info.value.report.outputs
    assert check.shape_match and check.max_abs == pytest.approx(1e-3, rel=1e-2) and not check.passed
    assert list(tmp_path.iterdir()) == []                 # no output file, no staging directory
    report = export_onnx(TraceDiffers().eval(), out, record_structure=False, tolerance=2e-3)
    assert report.validation.passed and out.is_file()
    skipped = export_onnx(TraceDiffers().eval(), tmp_path / "n.onnx", record_structure=False, validate=False)
    assert skipped.validation is None and skipped.path.is_file()
