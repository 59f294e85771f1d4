"""The checkout is portable: no tracked file names a path of the machine it was written on.

Commands in docs and recorded benchmark results are written relative to the repository root
(``.venv/bin/python benchmarks/...``), so a reader can run them in their own checkout. Skipped
outside a git checkout (an sdist or an installed package has no ``git ls-files``).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Absolute machine paths: checkout and venv folders of the machines this was built on, home
# directories, and any absolute path to a virtualenv's interpreter.
# (Spelled in pieces so that `git grep` for machine paths does not find this file.)
W, R, T, H = ("/" + name + "/" for name in ("work", "root", "tmp", "home"))
MACHINE_PATH = re.compile(r"(?<![\w.~-])(" + "|".join(
    [W, R, T, H + r"[A-Za-z0-9_.-]+/", r"/Users/[A-Za-z0-9_.-]+/", r"/[\w./-]*/\.?venv/bin/"]) + ")")


def tracked_files() -> list[Path]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    done = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    if done.returncode != 0 or not done.stdout:
        pytest.skip(f"{REPO} is not a git checkout")
    return [REPO / name for name in done.stdout.decode().split("\0") if name]


def machine_paths(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line naming an absolute machine path."""
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if MACHINE_PATH.search(line)]


@pytest.mark.parametrize("line", [
    f"cd {W}main && {W}venv/bin/python benchmarks/bench_gpq.py",
    f'"out": "{R}edgeprune/benchmarks/results"',
    f"see {H}alice/edgeprune/README.md",
    "/opt/conda/envs/x/.venv" + "/bin/python -m pytest",
    f'"path": "{T}bench-gpq-5sbqbsh1/petr-r50-800x320-q900.onnx"',
])
def test_machine_path_pattern_finds_absolute_paths(line: str) -> None:
    assert machine_paths(line) == [(1, line)]


@pytest.mark.parametrize("line", [
    ".venv/bin/python benchmarks/bench_gpq.py --preset streampetr-r50-704x256",
    "bash scripts/bootstrap.sh && .venv/bin/edgeprune demo",
    "~/.config/edgeprune/devices/NAME.json",
    '"/model/head/Softmax_output_0"',
])
def test_machine_path_pattern_leaves_portable_paths_alone(line: str) -> None:
    assert machine_paths(line) == []


def test_no_tracked_file_names_a_machine_path() -> None:
    found = []
    for path in tracked_files():
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue                      # binary file
        found += [f"{path.relative_to(REPO)}:{n}: {line[:160]}" for n, line in machine_paths(text)]
    assert not found, ("tracked files name absolute machine paths; write them relative to the repository "
                       "root (e.g. `.venv/bin/python benchmarks/...`):\n" + "\n".join(found[:20]))


def test_benchmark_results_record_portable_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/_common: commands as typed at the repository root; result paths made portable."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import _common

    monkeypatch.setattr(sys, "executable", str(REPO / ".venv" / "bin" / "python"))
    monkeypatch.setattr(sys, "argv", [str(REPO / "benchmarks" / "bench_gpq.py"), "--out",
                                      str(REPO / "benchmarks" / "results"), "--preset", "petr-r50-800x320"])
    assert _common.command_line() == (".venv/bin/python benchmarks/bench_gpq.py --out benchmarks/results "
                                      "--preset petr-r50-800x320")
    monkeypatch.setattr(sys, "executable", "/usr/bin/python3")            # an interpreter outside the checkout
    assert _common.command_line().startswith("python benchmarks/bench_gpq.py ")

    temp_model = Path(tempfile.gettempdir()) / "bench-gpq-abc123" / "q300.onnx"
    record = {"out": REPO / "benchmarks" / "results", "models": [{"path": str(temp_model)}],
              "tensor": "/model/head/Softmax_output_0", "runs": 30}
    assert _common.portable(record) == {"out": "benchmarks/results", "models": [{"path": "q300.onnx"}],
                                        "tensor": "/model/head/Softmax_output_0", "runs": 30}
