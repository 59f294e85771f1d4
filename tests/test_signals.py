"""SIGTERM and SIGHUP run Ctrl-C's cleanup: real signals to a real `edgeprune` process, on this
machine and against a board (the loopback sshd): temp files gone, remote agent and its shell
stopped, per-run remote files removed, exit code 128 + signal, one line on stderr."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _runner_models import matmul_chain
from conftest import processes_under

REPO = Path(__file__).resolve().parents[1]
ORT_SESSION_FILE = ".ses"          # written into $TMPDIR by `import onnxruntime` (1.32.0), not by edgeprune


def start(cwd: Path, tmpdir: Path, *argv: str) -> subprocess.Popen:
    env = dict(os.environ, TMPDIR=str(tmpdir),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", "edgeprune.cli.main", *argv], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def work(tmp_path) -> Path:
    d = tmp_path / "w"
    (d / "tmp").mkdir(parents=True)
    matmul_chain(d / "m.onnx", 256, batch=1)
    (d / "config").mkdir()
    return d


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_local_bench_cleans_up_like_ctrl_c(work, signum):
    """fp16 variants live in a temp dir during the run: it must be gone after the signal."""
    tmp = work / "tmp"
    proc = start(work, tmp, "bench", "m.onnx", "--precision", "both", "--warmup", "0",
                 "--time-budget", "60", "--threads", "1", "--json", "r.json")
    try:
        wait_until(lambda: any(tmp.iterdir()), 60, "the bench temp dir")
        time.sleep(1.0)                                   # inside the timing loop
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, err
    lines = [line for line in err.splitlines() if line.startswith("edgeprune bench:")]
    assert lines == [f"edgeprune bench: terminated ({signal.Signals(signum).name})"], err
    assert "Traceback" not in err
    # fp16 temp dir removed; onnxruntime >= 1.32 itself leaves a session file .ses in TMPDIR when imported
    assert [p for p in tmp.iterdir() if p.name != ORT_SESSION_FILE] == []
    assert sorted(p.name for p in work.iterdir()) == ["config", "m.onnx", "tmp"]   # no report, no temp file


def test_remote_bench_stops_the_agent_and_its_shell(loopback_sshd, loopback_profile, work):
    board = loopback_sshd.board_dir
    proc = start(work, work / "tmp", "bench", "m.onnx", "--device", "loopback", "--warmup", "0",
                 "--time-budget", "60", "--json", "r.json")
    try:
        wait_until(lambda: len(processes_under(board)) >= 2, 60, "the remote agent and its shell")
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert [line for line in err.splitlines() if line.startswith("edgeprune bench:")] == [
        "edgeprune bench: terminated (SIGTERM)"], err
    wait_until(lambda: processes_under(board) == [], 10, "the remote processes to end")
    sessions = list(board.rglob("session-*"))
    assert sessions == [], sessions                       # per-run remote files removed
    assert not (work / "r.json").exists() and list((work / "tmp").iterdir()) == []


def test_an_interrupt_during_an_extension_import_is_the_interrupt(tmp_path, monkeypatch):
    """pybind11 turns a signal landing in module init into ImportError('initialization failed')
    caused by it: edgeprune must stop as interrupted, not report a missing package."""
    from edgeprune._lazy import available, require
    from edgeprune.errors import DependencyError

    (tmp_path / "ext_interrupted.py").write_text(
        "try:\n    raise KeyboardInterrupt\nexcept KeyboardInterrupt as e:\n"
        "    raise ImportError('initialization failed') from e\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        require("ext_interrupted")
    with pytest.raises(KeyboardInterrupt):
        available("ext_interrupted")
    with pytest.raises(DependencyError, match="not installed"):
        require("ext_that_does_not_exist")
