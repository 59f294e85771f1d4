"""The board agent (edgeprune/runners/agent.py) on real ONNX Runtime sessions."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _runner_models import chain_oracle, matmul_chain, typed_inputs_model, unnamed_dim_model
from edgeprune.runners import agent

AGENT = Path(agent.__file__)
REPO = AGENT.parents[2]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    path = tmp_path_factory.mktemp("agent") / "chain.onnx"
    return path, matmul_chain(path, 16, layers=2)


def _req(*paths, **extra):
    req = {"models": [{"name": f"m{i}", "path": str(p)} for i, p in enumerate(paths)], "warmup": 1, "repeats": 4,
           "inputs": {"seed": 0, "free_dims": {"batch": 3}, "npz": None}}
    req.update(extra)
    return req


def test_outputs_match_numpy_and_result_fields(chain):
    path, weights = chain
    res = agent.run_request(_req(path, return_outputs=True, warmup=2, repeats=5))
    assert res["error"] is None and res["agent_version"] == 1
    m = res["models"][0]
    assert m["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert m["inputs"] == {"x": [[3, 16], "float32"]}
    assert len(m["samples_ms"]) == 5 and len(m["warmup_ms"]) == 2 and all(x > 0 for x in m["samples_ms"])
    x = np.random.RandomState(0).standard_normal((3, 16)).astype(np.float32)   # the documented seeded inputs
    np.testing.assert_allclose(np.array(m["outputs"]["y"]), chain_oracle(x, weights), rtol=1e-4, atol=1e-5)
    env = res["env"]
    assert env["providers_used"][0] == "CPUExecutionProvider" and env["cpu_count"] == os.cpu_count()
    assert env["python"].count(".") == 2 and env["ort_version"]


def test_interleaved_order_is_round_robin(chain):
    path, _ = chain
    res = agent.run_request(_req(path, path, path, repeats=5))
    starts = [m["sample_start_s"] for m in res["models"]]
    order = sorted((t, i) for i, s in enumerate(starts) for t in s)
    assert [i for _, i in order] == [0, 1, 2] * 5


def test_sequential_order(chain):
    path, _ = chain
    res = agent.run_request(_req(path, path, repeats=4, interleave=False))
    a, b = (m["sample_start_s"] for m in res["models"])
    assert max(a) < min(b) and len(a) == len(b) == 4


class _TickingClock:
    """perf_counter for the agent that advances 10 us per reading: the budget rule is tested on a
    timeline of its own, not on how busy the machine is (a loaded CI machine took 3 ms between a
    run's end and the budget check, more than the bounds below allow)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1e-5
        return self.now


def test_time_budget_stops_after_the_round_that_passes_it(chain, monkeypatch):
    path, _ = chain
    budget = 0.15
    monkeypatch.setattr(agent.time, "perf_counter", _TickingClock())
    res = agent.run_request(_req(path, path, repeats=10**7, time_budget_s=budget, warmup=0))
    a, b = res["models"]
    n = len(a["samples_ms"])
    assert n == len(b["samples_ms"]) and 3 <= n < 10**7
    # the last round started before the budget ran out and ended after it
    assert a["sample_start_s"][-1] < budget + 1e-3
    assert b["sample_start_s"][-1] + b["samples_ms"][-1] / 1000.0 >= budget - 1e-3


def test_time_budget_keeps_three_samples_minimum(chain):
    path, _ = chain
    res = agent.run_request(_req(path, repeats=100, time_budget_s=1e-9))
    assert len(res["models"][0]["samples_ms"]) == 3


def test_free_dim_missing_names_it(chain):
    path, _ = chain
    res = agent.run_request(_req(path, inputs={"seed": 0, "free_dims": {}}))
    assert res["error"]["type"] == "InputError"
    assert "'batch'" in res["error"]["message"] and "'x'" in res["error"]["message"]


def test_unnamed_free_dim_needs_input_axis_key(tmp_path):
    path = tmp_path / "unnamed.onnx"
    unnamed_dim_model(path)
    res = agent.run_request(_req(path, inputs={"free_dims": {}}))
    assert res["error"]["type"] == "InputError" and "x:0" in res["error"]["message"]
    res = agent.run_request(_req(path, inputs={"free_dims": {"x:0": 5}}))
    assert res["error"] is None and res["models"][0]["inputs"]["x"] == [[5, 4], "float32"]


def test_npz_inputs_are_used(chain, tmp_path):
    path, weights = chain
    x = np.linspace(-1, 1, 2 * 16, dtype=np.float32).reshape(2, 16)
    np.savez(tmp_path / "in.npz", x=x)
    res = agent.run_request(_req(path, return_outputs=True, inputs={"npz": str(tmp_path / "in.npz")}))
    np.testing.assert_allclose(np.array(res["models"][0]["outputs"]["y"]), chain_oracle(x, weights), rtol=1e-4,
                               atol=1e-6)
    np.savez(tmp_path / "wrong.npz", z=x)
    res = agent.run_request(_req(path, inputs={"npz": str(tmp_path / "wrong.npz")}))
    assert res["error"]["type"] == "InputError" and "'x'" in res["error"]["message"] and "z" in res["error"]["message"]


def test_seed_controls_random_inputs(chain):
    path, _ = chain
    outs = [agent.run_request(_req(path, return_outputs=True, inputs={"seed": s, "free_dims": {"batch": 2}}))
            for s in (1, 1, 2)]
    y = [np.array(r["models"][0]["outputs"]["y"]) for r in outs]
    assert np.array_equal(y[0], y[1]) and not np.array_equal(y[0], y[2])


def test_typed_inputs(tmp_path):
    path = tmp_path / "typed.onnx"
    typed_inputs_model(path)
    res = agent.run_request(_req(path, return_outputs=True))
    assert res["error"] is None
    inputs = res["models"][0]["inputs"]
    assert {k: v[1] for k, v in inputs.items()} == {"a": "float32", "b": "float16", "c": "int64", "d": "bool"}
    rng = np.random.RandomState(0)
    a = rng.standard_normal((2, 3)).astype(np.float32)
    b = rng.standard_normal((2, 3)).astype(np.float16)
    c = rng.randint(0, 2, size=(2, 3))
    expected = a + b.astype(np.float32) + c          # bool mask is all False
    np.testing.assert_allclose(np.array(res["models"][0]["outputs"]["y"]), expected, rtol=1e-6)


def test_profile_rows_cover_every_node(chain):
    path, _ = chain
    res = agent.run_request(_req(path, profile=True))
    rows = res["models"][0]["profile"]
    nodes = [r["node"] for r in rows]
    # ORT drops the Identity; every computing node appears once with its op type
    assert sorted(nodes) == ["/decoder/layers.0/MatMul", "/decoder/layers.0/Relu", "/decoder/layers.1/MatMul",
                             "/decoder/layers.1/Relu"]
    assert [r["op_type"] for r in rows] == [n.rsplit("/", 1)[1] for n in nodes]
    assert all(r["dur_us"] > 0 and r["provider"] == "CPUExecutionProvider" for r in rows)


def test_profile_drops_every_warmup_run():
    """Kernel events of all warm-up runs are dropped: a new session's first runs grow its arena
    (fresh pages), so one warm-up left large Gathers profiled at several times their steady cost."""
    def run_window(start):
        return {"cat": "Session", "name": "model_run", "ts": start, "dur": 90}

    def kernel(start, dur):
        return {"cat": "Node", "name": "g_kernel_time", "ts": start, "dur": dur, "args": {"op_name": "Gather"}}

    events = [run_window(0), kernel(10, 900), run_window(100), kernel(110, 500), run_window(200), kernel(210, 50),
              run_window(300), kernel(310, 70)]
    assert agent._aggregate_events(events, runs=2, warmup=2)[0]["dur_us"] == 60.0
    assert agent._aggregate_events(events, runs=3, warmup=1)[0]["dur_us"] == (500 + 50 + 70) / 3


def test_workers_stop_spinning_between_runs_unless_asked_not_to(chain):
    """Interleaved sessions: each run's thread-pool workers stop spinning when it returns, so
    they do not take the cores of the next model's run (recorded in the environment)."""
    path, _ = chain
    assert agent.run_request(_req(path, path))["env"]["stop_spinning"] is True
    res = agent.run_request(_req(path, path, stop_spinning=False))
    assert res["error"] is None and res["env"]["stop_spinning"] is False


def test_affinity_is_applied_and_restored(chain):
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no sched_getaffinity on this OS")
    path, _ = chain
    before = os.sched_getaffinity(0)
    cpu = min(before)
    res = agent.run_request(_req(path, affinity=[cpu]))
    assert res["env"]["affinity"] == [cpu] and os.sched_getaffinity(0) == before
    res = agent.run_request(_req(path, affinity=[10**5]))
    assert res["error"]["type"] == "BadRequest" and os.sched_getaffinity(0) == before


@pytest.mark.parametrize("request_patch, kind", [
    ({"providers": [["CUDAExecutionProvider", {}]]}, "MissingProvider"),
    ({"models": [{"name": "nope", "path": "/nonexistent/m.onnx"}]}, "ModelNotFound"),
    ({"repeats": 0}, "BadRequest"),
    ({"repeat": 3}, "BadRequest"),
    ({"time_budget_s": "soon"}, "BadRequest"),
    ({"stop_spinning": "yes"}, "BadRequest"),
    ({"inputs": {"npz": "/nonexistent/in.npz"}}, "InputError"),
])
def test_error_kinds(chain, request_patch, kind):
    path, _ = chain
    res = agent.run_request(dict(_req(path), **request_patch))
    assert res["error"]["type"] == kind and res["models"] == []


def test_corrupt_model_is_a_load_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all")
    res = agent.run_request(_req(bad))
    assert res["error"]["type"] == "ModelLoadError" and str(bad) in res["error"]["message"]


def _run_agent(tmp_path, request) -> tuple[subprocess.CompletedProcess, dict]:
    req, res = tmp_path / "req.json", tmp_path / "res.json"
    req.write_text(json.dumps(request))
    proc = subprocess.run([sys.executable, str(AGENT), str(req), str(res)], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    return proc, json.loads(res.read_text())


def test_subprocess_success(chain, tmp_path):
    path, _ = chain
    proc, res = _run_agent(tmp_path, _req(path, path, repeats=3))
    assert proc.returncode == 0 and res["error"] is None
    assert [len(m["samples_ms"]) for m in res["models"]] == [3, 3]
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob(".agent-result.*"))


def test_subprocess_missing_provider_exits_nonzero_with_json(chain, tmp_path):
    path, _ = chain
    proc, res = _run_agent(tmp_path, _req(path, providers=[["TensorrtExecutionProvider", {}]]))
    assert proc.returncode == 1
    assert res["error"]["type"] == "MissingProvider" and "TensorrtExecutionProvider" in res["error"]["message"]
    assert "Traceback" not in proc.stderr and "MissingProvider" in proc.stderr


def test_subprocess_unreadable_request(tmp_path):
    (tmp_path / "req.json").write_text("{not json")
    proc = subprocess.run([sys.executable, str(AGENT), str(tmp_path / "req.json"), str(tmp_path / "res.json")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert json.loads((tmp_path / "res.json").read_text())["error"]["type"] == "BadRequest"
    assert subprocess.run([sys.executable, str(AGENT)], capture_output=True, timeout=60).returncode == 2


def test_agent_is_python36_compatible():
    vermin = shutil.which("vermin") or str(Path(sys.executable).parent / "vermin")
    if not Path(vermin).exists():
        pytest.skip("vermin is not installed")
    proc = subprocess.run([vermin, "-t=3.6-", "--no-tips", "--violations", str(AGENT)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_agent_imports_nothing_of_edgeprune():
    source = AGENT.read_text()
    assert "import edgeprune" not in source and "from edgeprune" not in source
