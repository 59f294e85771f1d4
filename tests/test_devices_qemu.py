"""The board side on real aarch64 code: Debian's arm64 python under qemu-user with
onnxruntime 1.22.0's aarch64 wheel (prepared by scripts/setup_qemu_aarch64.sh).

* the board agent's outputs on aarch64 ORT match the x86 run of the same request;
* ``edgeprune wheelhouse`` for that platform holds everything a board needs: installed from it
  alone (no site-packages, no torch/onnx), ``python -m edgeprune bench --device local`` runs.

Slow (qemu): tiny models, 2-3 repeats.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _runner_models import chain_oracle, matmul_chain
from edgeprune.cli import main as cli_main
from edgeprune.devices.wheelhouse import can_build_without_isolation, platform_tags

pytestmark = pytest.mark.qemu

ROOT = Path(os.environ.get("EDGEPRUNE_AARCH64_ROOT", "/opt/edgeprune-aarch64"))
QEMU = Path("/usr/bin/qemu-aarch64-static")
ARM_PYTHON = ROOT / "bin" / "python3"
ARM_PYVER = "3.11"
ORT_VERSION = "1.22.0"
PLATFORM = "manylinux_2_28_aarch64"
AGENT = Path(__file__).resolve().parents[1] / "edgeprune" / "runners" / "agent.py"

if not (QEMU.is_file() and ARM_PYTHON.is_file()):
    pytest.skip(f"needs {QEMU} and the arm64 python {ARM_PYTHON}: run scripts/setup_qemu_aarch64.sh as root "
                f"(apt + PyPI)", allow_module_level=True)


def _arm(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the arm64 python under qemu; a clean environment so nothing of the host leaks in."""
    base = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "LC_ALL": "C.UTF-8"}
    return subprocess.run([str(ARM_PYTHON), *args], cwd=cwd, env={**base, **(env or {})}, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)


def _attention_model(path: Path, tokens: int = 6, embed: int = 8, seed: int = 0) -> None:
    """x [batch, T, E] -> single-head attention (Softmax(q k^T / sqrt(E)) v) -> LayerNorm.

    Exercises the kernels a decoder spends its time in (MatMul, Transpose, Softmax,
    LayerNormalization) on the ARM build.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = {n: (rng.standard_normal((embed, embed)) / np.sqrt(embed)).astype(np.float32) for n in "qkv"}
    inits = [numpy_helper.from_array(w, f"W{n}") for n, w in weights.items()]
    inits += [numpy_helper.from_array(np.array(1 / np.sqrt(embed), np.float32), "scale"),
              numpy_helper.from_array(np.ones(embed, np.float32), "gamma"),
              numpy_helper.from_array(np.zeros(embed, np.float32), "beta")]
    nodes = [helper.make_node("MatMul", ["x", f"W{n}"], [n]) for n in "qkv"]
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
              helper.make_node("MatMul", ["q", "kt"], ["s"]),
              helper.make_node("Mul", ["s", "scale"], ["s2"]),
              helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "v"], ["o"]),
              helper.make_node("LayerNormalization", ["o", "gamma", "beta"], ["y"], axis=-1)]
    graph = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", tokens, embed])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", tokens, embed])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.mark.slow
def test_agent_on_aarch64_ort_matches_x86(tmp_path):
    from edgeprune.runners.local import LocalRunner

    weights = matmul_chain(tmp_path / "chain.onnx", 16)
    _attention_model(tmp_path / "attn.onnx")
    request = {"models": [{"name": "chain", "path": str(tmp_path / "chain.onnx")},
                          {"name": "attn", "path": str(tmp_path / "attn.onnx")}],
               "repeats": 2, "warmup": 0, "return_outputs": True, "inputs": {"seed": 5, "free_dims": {"batch": 2}}}
    (tmp_path / "request.json").write_text(json.dumps(request))
    done = _arm(str(AGENT), "request.json", "result.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    arm = json.loads((tmp_path / "result.json").read_text())
    assert arm["env"]["machine"] == "aarch64" and arm["env"]["ort_version"] == ORT_VERSION
    with LocalRunner() as runner:
        x86 = runner.run(request)
    assert x86["error"] is None and x86["env"]["machine"] == "x86_64"
    for a, b in zip(arm["models"], x86["models"]):
        assert a["sha256"] == b["sha256"] and a["inputs"] == b["inputs"]
        for name, value in b["outputs"].items():
            np.testing.assert_allclose(np.array(a["outputs"][name]), np.array(value), atol=1e-4, rtol=1e-4)
    x = np.random.RandomState(5).standard_normal((2, 16)).astype(np.float32)
    np.testing.assert_allclose(np.array(arm["models"][0]["outputs"]["y"]), chain_oracle(x, weights), atol=1e-4)


def _install_from_wheelhouse(wheelhouse: Path, target: Path) -> None:
    """pip (the host's) installs for the arm64 python from the wheelhouse only (--no-index)."""
    tags = [arg for tag in platform_tags(PLATFORM) for arg in ("--platform", tag)]
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-compile", "--no-index", "--find-links", str(wheelhouse),
         "--only-binary=:all:", "--implementation", "cp", "--python-version", ARM_PYVER, *tags,
         "--target", str(target), "edgeprune[runtime,progress]", f"onnxruntime=={ORT_VERSION}"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PIP_FIND_LINKS": ""})
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_wheelhouse_installs_on_aarch64_and_bench_runs_there(tmp_path, capsys):
    wheelhouse = tmp_path / "wheels"
    code = cli_main.main(["wheelhouse", "-o", str(wheelhouse), "--platform", PLATFORM, "--python", ARM_PYVER,
                          "--onnxruntime-version", ORT_VERSION,
                          *(["--no-build-isolation"] if can_build_without_isolation() else [])])
    out, err = capsys.readouterr()
    assert code == 0, err
    names = sorted(p.name for p in wheelhouse.iterdir())
    assert "edgeprune-0.1.0-py3-none-any.whl" in names and not [n for n in names if n.startswith(".")]
    assert any(n.startswith(f"onnxruntime-{ORT_VERSION}-cp311-cp311-") and "aarch64" in n for n in names)
    assert any(n.startswith("numpy-") and "aarch64" in n for n in names)
    assert not [n for n in names if n.split("-")[0].lower() in ("torch", "onnx", "onnxsim", "paramiko")]
    assert f"--find-links {wheelhouse.name} 'edgeprune[runtime,progress]' onnxruntime=={ORT_VERSION}" in out

    site = tmp_path / "site"
    _install_from_wheelhouse(wheelhouse, site)
    work = tmp_path / "board"
    work.mkdir()
    matmul_chain(work / "m.onnx", 16)
    env = {"PYTHONPATH": str(site), "EDGEPRUNE_CONFIG_DIR": str(work / "config")}
    # -S: no site-packages of the arm64 prefix, only what came from the wheelhouse.
    probe = _arm("-S", "-c", "import edgeprune, importlib.util as u; print(edgeprune.__file__); "
                 "print([m for m in ('torch', 'onnx', 'onnxsim', 'paramiko') if u.find_spec(m)])", cwd=work, env=env)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == [str(site / "edgeprune" / "__init__.py"), "[]"]
    done = _arm("-S", "-m", "edgeprune", "bench", "--device", "local", "m.onnx", "--free-dim", "batch=2",
                "--repeats", "3", "--warmup", "1", "--json", "r.json", cwd=work, env=env)
    assert done.returncode == 0, done.stderr
    data = json.loads((work / "r.json").read_text())
    assert data["env"]["machine"] == "aarch64" and data["env"]["ort_version"] == ORT_VERSION
    assert data["device"] == "local" and len(data["models"][0]["samples_ms"]) == 3


# The int8 tgGBC decoder on aarch64 ORT vs x86 ORT, max |arm - x86| / (max - min of x86), per
# output. Both run the same integer GEMMs (7-bit weights: no U8S8 saturation on x86 AVX2, ARM's
# dot-product kernels never saturate); what differs is float rounding in the dequantize /
# requantize steps and in the float parts. Measured (tiny decoder, 80 keys, tgGBC r=40, ORT 1.22
# aarch64 vs 1.32 x86): 0 / 3.8e-8 (logits / boxes) with the defaults, 6.9e-3 / 5.4e-3 with the
# attention products quantized too (--int8-attention). Stated: 1 % of the range.
ARM_INT8_REL_TOLERANCE = 0.01


@pytest.mark.slow
def test_int8_decoder_on_aarch64_ort_matches_x86(tmp_path):
    from test_passes_fp16 import tiny_export
    from test_passes_int8 import calib_npz
    from edgeprune.methods.tggbc import TgGBCConfig
    from edgeprune.passes.driver import rewrite
    from edgeprune.passes.keys.tggbc import KeyPruningPass
    from edgeprune.passes.precision.int8 import Int8Pass
    from edgeprune.runners.local import LocalRunner

    src = tiny_export("torchscript")
    calib = calib_npz(src, tmp_path / "calib.npz")
    rewrite(src, tmp_path / "q.onnx", [KeyPruningPass(TgGBCConfig(r=40, n=1, k=0))], verify=False,
            precision=Int8Pass(calib=str(calib)))
    request = {"models": [{"name": "q", "path": str(tmp_path / "q.onnx")}], "repeats": 1, "warmup": 0,
               "return_outputs": True, "inputs": {"seed": 5}}
    (tmp_path / "request.json").write_text(json.dumps(request))
    done = _arm(str(AGENT), "request.json", "result.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    arm = json.loads((tmp_path / "result.json").read_text())
    assert arm["error"] is None and arm["env"]["machine"] == "aarch64", arm["error"]
    with LocalRunner() as runner:
        x86 = runner.run(request)
    assert x86["error"] is None
    for name, value in x86["models"][0]["outputs"].items():
        ref, got = np.array(value), np.array(arm["models"][0]["outputs"][name])
        deviation = np.abs(got - ref).max() / (ref.max() - ref.min())
        print(f"{name}: aarch64 vs x86 int8 max deviation / range {deviation:.2e}")
        assert deviation <= ARM_INT8_REL_TOLERANCE, (name, deviation)
