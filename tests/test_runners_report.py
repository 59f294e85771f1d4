"""Table, JSON, CSV and PNG outputs of a real benchmark run."""
from __future__ import annotations

import csv
import hashlib
import json

import pytest

from _runner_models import matmul_chain
from edgeprune.errors import OutputPathError
from edgeprune.runners.bench import BenchOptions, benchmark
from edgeprune.runners.report import CSV_COLUMNS, format_table, write_csv, write_json, write_plot


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    a, b = d / "a.onnx", d / "b.onnx"
    matmul_chain(a, 48, layers=2)
    matmul_chain(b, 16, layers=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEPRUNE_CONFIG_DIR", str(d / "config"))      # no user profile for "local"
        return benchmark([a, b], BenchOptions(warmup=2, repeats=12, threads=1, free_dims={"batch": 2}))


def test_json_round_trip_has_raw_samples_and_environment(report, tmp_path):
    path = write_json(report, tmp_path / "r.json")
    data = json.loads(path.read_text())
    assert data["device"] == "local" and data["env"]["ort_version"] == report.env["ort_version"]
    assert data["env"]["threads"] == 1 and data["env"]["providers_used"] == ["CPUExecutionProvider"]
    for entry, m in zip(data["models"], report.models):
        assert entry["samples_ms"] == list(m.samples_ms) and entry["warmup_ms"] == list(m.warmup_ms)
        assert entry["sha256"] == hashlib.sha256(open(entry["path"], "rb").read()).hexdigest()
        assert entry["stats"]["median"] == m.stats.median and entry["stats"]["n"] == 12
    (sp,) = data["speedups"]
    assert sp["name"] == "b" and sp["baseline"] == "a" and sp["ci_low"] <= sp["ratio"] <= sp["ci_high"]
    assert data["request"]["repeats"] == 12


def test_csv_round_trip_is_exact(report, tmp_path):
    path = write_csv(report, tmp_path / "r.csv")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 2 * (2 + 12)
    for m in report.models:
        timed = [r for r in rows if r["model"] == m.name and r["phase"] == "timed"]
        warm = [r for r in rows if r["model"] == m.name and r["phase"] == "warmup"]
        assert [float(r["latency_ms"]) for r in timed] == list(m.samples_ms)      # exact, not rounded
        assert [float(r["start_s"]) for r in timed] == list(m.sample_start_s)
        assert [float(r["latency_ms"]) for r in warm] == list(m.warmup_ms)
        assert {r["sha256"] for r in timed} == {m.sha256} and {r["threads"] for r in timed} == {"1"}
    assert {r["ort_version"] for r in rows} == {report.env["ort_version"]} and {r["device"] for r in rows} == {"local"}


def test_table_has_one_row_per_model_with_parsable_figures(report):
    lines = format_table(report).splitlines()
    rows = [line.split() for line in lines[3:]]
    assert [r[0] for r in rows] == ["a", "b"]
    assert float(rows[0][3]) == pytest.approx(report.models[0].stats.median, rel=1e-2, abs=1e-3)
    assert rows[0][-1] == "baseline" and rows[1][-3] == f"{report.speedups[0].ratio:.2f}x"


def test_plot_is_a_png(report, tmp_path):
    pytest.importorskip("matplotlib")
    path = write_plot(report, tmp_path / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert [p.name for p in tmp_path.iterdir()] == ["r.png"]        # no temporary left behind


def test_unwritable_output_leaves_nothing(report, tmp_path):
    with pytest.raises(OutputPathError):
        write_json(report, tmp_path / "missing-dir" / "r.json")
    assert list(tmp_path.iterdir()) == []
