"""Hostile inputs through the real CLI: special files, corrupt data, file-system failures and
argparse mistakes are one line on stderr, exit 2, no traceback, and no file changed or left."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _runner_models import matmul_chain
from test_io_policy import one_line, run_cli, snapshot

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("no_user_profiles")


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "w"
    d.mkdir()
    matmul_chain(d / "m.onnx", 8, batch=1)
    (d / "corrupt.onnx").write_bytes((d / "m.onnx").read_bytes()[:200])
    (d / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    np.save(d / "single.npy", np.ones(3))
    np.savez(d / "nan.npz", x=np.array([[np.nan] + [0.0] * 7], dtype=np.float32))
    monkeypatch.chdir(d)
    return d


def cli_subprocess(cwd: Path, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The CLI in its own process (a regression here would hang or eat memory, not the tests)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "edgeprune.cli.main", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("argv,needle", [
    (["inspect", "fifo.onnx"], "input MODEL.onnx fifo.onnx is a FIFO (named pipe), not a regular file"),
    (["bench", "/dev/zero"], "input MODEL.onnx /dev/zero is a character device, not a regular file"),
    (["rewrite", "m.onnx", "-o", "o.onnx", "--inputs", "fifo.onnx"], "input --inputs fifo.onnx is a FIFO"),
])
def test_special_inputs_are_refused_before_reading(work, argv, needle):
    os.mkfifo(work / "fifo.onnx")
    before = snapshot(work)
    done = cli_subprocess(work, *argv)
    assert done.returncode == 2 and needle in one_line(done.stderr), done.stderr
    assert snapshot(work) == before


def test_model_ending_in_json_loads_as_protobuf(work, capsys):
    (work / "m.json").write_bytes((work / "m.onnx").read_bytes())
    code, out, err = run_cli(capsys, "bench", "m.json", "--warmup", "0", "--repeats", "2", "--threads", "1")
    assert code == 0, err
    assert any(line.split()[:1] == ["m"] for line in out.splitlines())


@pytest.mark.parametrize("argv,needle", [
    (["bench", "corrupt.onnx"], "cannot read corrupt.onnx as ONNX"),
    (["bench", "m.onnx", "--inputs", "corrupt.npz"], "cannot read --inputs file corrupt.npz (File is not a zip"),
    (["bench", "m.onnx", "--inputs", "single.npy"], "a single array (.npy), not an .npz archive"),
    (["bench", "m.onnx", "--inputs", "nan.npz"], "array 'x' [1, 8] holds 1 NaN/Inf value(s)"),
    (["rewrite", "m.onnx", "-o", "o.onnx", "--inputs", "corrupt.npz"], "cannot read inputs file corrupt.npz"),
    (["rewrite", "m.onnx", "-o", "o.onnx", "--inputs", "nan.npz"], "holds 1 NaN/Inf value(s)"),
    (["rewrite", "m.onnx", "-o", "o.onnx", "--method", "gpq", "--keep-queries", "3", "--calib", "corrupt.npz"],
     "cannot read calibration file corrupt.npz"),
    (["rewrite", "m.onnx", "-o", "o.onnx", "--method", "gpq", "--keep-queries", "3", "--calib", "nan.npz"],
     "calibration file nan.npz: array 'x' [1, 8] holds 1 NaN/Inf value(s)"),
    (["rewrite", "m.onnx", "-o", "x" * 300 + ".onnx"], "File name too long"),
    (["inspect", "corrupt.onnx", "-v"], "cannot read corrupt.onnx as ONNX"),
])
def test_bad_data_is_one_line(work, capsys, argv, needle):
    before = snapshot(work)
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    lines = [line for line in err.splitlines() if line.startswith(f"edgeprune {argv[0]}: ")]
    assert len(lines) == 1 and needle in lines[0], err
    if "-v" not in argv:
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(work) == before


@pytest.fixture
def tmpfs(work):
    """A 64 KiB tmpfs (and a read-only one) under the work dir, or a skip with the reason."""
    mounts = []
    for name, options in (("small", "size=64k"), ("ro", "ro,size=64k")):
        (work / name).mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(work / name)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            for m in mounts:
                subprocess.run(["umount", str(m)], check=False)
            pytest.skip(f"cannot mount a tmpfs here (needs root in a namespace allowing mounts): {done.stderr.strip()}")
        mounts.append(work / name)
    yield work
    for m in mounts:
        subprocess.run(["umount", str(m)], check=True)


def test_disk_full_and_read_only_are_one_line_and_leave_nothing(tmpfs, capsys):
    code, _, err = run_cli(capsys, "bench", "m.onnx", "--warmup", "0", "--repeats", "1000", "--threads", "1",
                           "--csv", "small/r.csv")          # ~150 bytes a row: more than the 64 KiB
    assert code == 2, err
    # progress and timing warnings may come first (a 1000-run loop is noisy); the error is one line, last
    lines = err.strip().splitlines()
    assert "Traceback" not in err and [line for line in lines if "error" in line] == lines[-1:]
    assert lines[-1] == "edgeprune bench: error: cannot write small/r.csv: No space left on device; nothing was written"
    assert os.listdir(tmpfs / "small") == []
    code, _, err = run_cli(capsys, "bench", "m.onnx", "--json", "ro/r.json")
    assert code == 2 and "cannot write ro/r.json: directory" in one_line(err)
    assert os.listdir(tmpfs / "ro") == []


def test_argparse_errors_are_one_line_with_a_hint(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(capsys, "bench", "m.onnx", "--repeats", "x")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert one_line(err) == ("edgeprune bench: error: argument --repeats: invalid int value: 'x' "
                             "(see `edgeprune bench --help`)")


def test_verbose_after_the_subcommand(work, capsys):
    code, _, err = run_cli(capsys, "inspect", "corrupt.onnx", "-v")
    assert code == 2 and "Traceback" in err
    code, _, err = run_cli(capsys, "-v", "inspect", "corrupt.onnx")
    assert code == 2 and "Traceback" in err
