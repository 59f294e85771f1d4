"""`edgeprune wheelhouse`: the pure-Python wheel and the failures that must leave nothing behind.

The full download + install on aarch64 is in test_devices_qemu.py.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from edgeprune.cli import main as cli_main
from edgeprune.devices.wheelhouse import build_wheel, can_build_without_isolation

REPO = Path(__file__).resolve().parents[1]
# Build offline with this environment's setuptools when it can (faster), else isolated (PyPI).
ISOLATION_FLAGS = ["--no-build-isolation"] if can_build_without_isolation() else []


def test_wheel_is_pure_python_with_agent_and_profiles(tmp_path):
    litter_before = {p.name for p in REPO.iterdir()}
    wheel = build_wheel(tmp_path, build_isolation=not ISOLATION_FLAGS)
    assert wheel.name == "edgeprune-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read("edgeprune-0.1.0.dist-info/METADATA").decode()
    assert {"edgeprune/runners/agent.py", "edgeprune/devices/profiles/orangepi5.json",
            "edgeprune/devices/profiles/jetson-nano.json", "edgeprune/devices/profiles/local.json",
            "edgeprune/cli/main.py"} <= names
    assert not [n for n in names if n.startswith("tests/") or n.endswith((".pyc", ".onnx"))]
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert requires == ["Requires-Dist: numpy>=1.21"]           # no torch/onnx for a board
    assert {p.name for p in REPO.iterdir()} == litter_before     # built from a copy: no build/ in the checkout


@pytest.mark.parametrize("argv, needle", [
    (["--python", "3.6"], "needs Python >= 3.10, the board has 3.6"),
    (["--python", "three"], "MAJOR.MINOR"),
    # network: PyPI has no onnxruntime 1.22.0 for glibc 2.17
    pytest.param(["--platform", "manylinux2014_aarch64", "--onnxruntime-version", "1.22.0"], "manylinux_2_27 or newer",
                 marks=pytest.mark.slow),
])
def test_failures_are_one_line_and_leave_no_directory(tmp_path, capsys, argv, needle):
    out = tmp_path / "wheels"
    code = cli_main.main(["wheelhouse", "-o", str(out), *ISOLATION_FLAGS, *argv])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
