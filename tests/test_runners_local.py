"""LocalRunner life cycle and the benchmark() Python API on real ONNX Runtime sessions."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from _runner_models import matmul_chain
from edgeprune.errors import DeviceError, InternalError, ParameterError
from edgeprune.runners import get_runner
from edgeprune.runners.bench import (
    BenchOptions, benchmark, build_request, provider_name, run_bench, with_device_defaults,
)
from edgeprune.runners.local import LocalRunner
from edgeprune.runners.results import ModelSpec, build_report, raise_for_error


pytestmark = pytest.mark.usefixtures("no_user_profiles")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A 64-wide and a 512-wide chain: the big one does 64x the FLOPs of the small one."""
    d = tmp_path_factory.mktemp("local")
    small, big = d / "small.onnx", d / "big.onnx"
    matmul_chain(small, 64, layers=2)
    matmul_chain(big, 512, layers=2)
    return big, small


def test_life_cycle_is_explicit(pair):
    runner = LocalRunner()
    with pytest.raises(InternalError, match="life cycle"):
        runner.run({"models": []})
    with runner:
        assert runner.is_active
        with pytest.raises(InternalError):
            runner.activate()
    assert not runner.is_active
    with pytest.raises(InternalError):
        runner.deactivate()


def test_progress_callback_counts_runs(pair):
    big, small = pair
    seen = []
    with LocalRunner(progress=lambda done, total: seen.append((done, total))) as runner:
        res = runner.run(build_request([ModelSpec("a", str(small)), ModelSpec("b", str(small))],
                                       BenchOptions(warmup=0, repeats=3, free_dims={"batch": 2})))
    assert res["error"] is None and seen == [(i, 6) for i in range(1, 7)]


def test_benchmark_reports_speedup_of_a_64x_smaller_model(pair):
    big, small = pair
    report = benchmark([big, small], BenchOptions(warmup=2, repeats=30, free_dims={"batch": 32}))
    assert [m.name for m in report.models] == ["big", "small"] and report.interleaved
    (sp,) = report.speedups
    assert sp.name == "small" and sp.baseline == "big" and sp.paired
    assert sp.ci_low <= sp.ratio <= sp.ci_high
    assert sp.ci_low > 1.0        # 64x fewer FLOPs: faster beyond any noise
    assert report.models[0].sha256 == hashlib.sha256(big.read_bytes()).hexdigest()
    for m in report.models:
        assert m.stats.n == 30 and m.stats.median == float(np.median(m.samples_ms))
        assert m.spec.precision == "fp32"


def test_sequential_runs_use_unpaired_bootstrap(pair):
    big, small = pair
    report = benchmark([small, small], BenchOptions(warmup=0, repeats=5, interleave=False, free_dims={"batch": 1}))
    assert not report.interleaved and not report.speedups[0].paired
    assert [m.name for m in report.models] == ["small", "small#2"]


def test_agent_errors_become_user_errors(pair):
    big, _ = pair
    with pytest.raises(DeviceError, match="MissingProvider"):
        benchmark([big], BenchOptions(providers=(("CUDAExecutionProvider", {}),), free_dims={"batch": 1}))
    with pytest.raises(ParameterError, match="batch"):
        benchmark([big], BenchOptions(repeats=2))
    with pytest.raises(InternalError, match="protocol version"):
        raise_for_error({"agent_version": 99}, "board")


def test_options_are_validated():
    with pytest.raises(ParameterError, match="--repeats"):
        BenchOptions(repeats=0).validate()
    with pytest.raises(ParameterError, match="--time-budget"):
        BenchOptions(time_budget_s=-1.0).validate()
    with pytest.raises(ParameterError, match="--free-dim"):
        BenchOptions(free_dims={"batch": 0}).validate()


def test_provider_aliases():
    assert provider_name("cuda") == "CUDAExecutionProvider" and provider_name("trt") == "TensorrtExecutionProvider"
    assert provider_name("MyExecutionProvider") == "MyExecutionProvider"


def _with_defaults(device: str, options: BenchOptions):
    runner = get_runner(device)
    return runner, with_device_defaults(options, runner.profile)


def test_local_device_takes_defaults_from_the_local_profile(pair, tmp_path, monkeypatch):
    big, small = pair
    runner, options = _with_defaults("local", BenchOptions())
    assert isinstance(runner, LocalRunner)
    assert options.providers == (("CPUExecutionProvider", {}),) and options.threads is None
    (tmp_path / "config" / "devices").mkdir(parents=True)
    (tmp_path / "config" / "devices" / "local.json").write_text(json.dumps({"transport": "local", "threads": 1}))
    _, options = _with_defaults("local", BenchOptions())
    assert options.threads == 1
    _, options = _with_defaults("local", BenchOptions(threads=2))      # the command line wins
    assert options.threads == 2
    runner, options = _with_defaults("local", BenchOptions(repeats=2, free_dims={"batch": 1}))
    with runner:
        report = run_bench([ModelSpec("small", str(small))], options, runner)
    assert report.env["threads"] == 1 and report.request["threads"] == 1
    report = benchmark([small], BenchOptions(repeats=2, free_dims={"batch": 1}), device="local")
    assert report.env["threads"] == 1 and report.device == "local"


def test_build_report_rejects_mismatched_answers(pair):
    big, _ = pair
    with LocalRunner() as runner:
        req = build_request([ModelSpec("big", str(big))], BenchOptions(repeats=3, free_dims={"batch": 1}))
        res = runner.run(req)
    with pytest.raises(InternalError, match="returned 1 models for 2"):
        build_report(res, [ModelSpec("a", str(big)), ModelSpec("b", str(big))], device="local", request=req)


def test_fp16_copies_are_removed_after_the_benchmark_also_on_error(pair, tmp_path, monkeypatch):
    import tempfile

    big, small = pair
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))     # where TemporaryDirectory creates its dirs
    report = benchmark([small], BenchOptions(repeats=2, free_dims={"batch": 1}), precision="both")
    assert [m.spec.precision for m in report.models] == ["fp32", "fp16"]
    assert not Path(report.models[1].spec.path).exists() and list(scratch.iterdir()) == []
    with pytest.raises(DeviceError, match="no-such-board"):     # fails after the conversion
        benchmark([small], BenchOptions(repeats=2), precision="fp16", device="no-such-board")
    assert list(scratch.iterdir()) == []
