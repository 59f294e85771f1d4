"""The output policy (edgeprune/io.py) through the real CLI: refusals are one line, exit 2, and
leave every file as it was; accepted writes go through symlinks and keep modes."""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from _runner_models import matmul_chain

from edgeprune.cli import main as cli_main
from edgeprune.errors import OutputPathError
from edgeprune.io import atomic_path, check_command_files


pytestmark = pytest.mark.usefixtures("no_user_profiles")


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: kind, mode and content hash (a changed or new file shows)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = os.lstat(p)
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else os.readlink(p) \
            if stat.S_ISLNK(st.st_mode) else ""
        out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), digest)
    return out


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli_main.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """A folder with two tiny models (static batch) and a sub-folder, as the current directory."""
    d = tmp_path / "w"
    (d / "sub").mkdir(parents=True)
    matmul_chain(d / "m.onnx", 8, batch=1)
    matmul_chain(d / "n.onnx", 8, batch=1, seed=1)
    monkeypatch.chdir(d)
    return d


REFUSED = [
    (["rewrite", "m.onnx", "-o", "m.onnx"], "-o m.onnx is the same file as the input IN.onnx m.onnx"),
    (["rewrite", "m.onnx", "-o", "./sub/../m.onnx"], "is the same file as the input IN.onnx m.onnx"),
    (["rewrite", "m.onnx", "-o", "hard.onnx"], "is the same file as the input IN.onnx"),
    (["rewrite", "m.onnx", "-o", "x.onnx", "--inputs", "x.onnx"], "is the same file as the input --inputs"),
    (["export", "--model", "petr-r50-800x320", "--checkpoint", "c.pth", "-o", "c.pth"],
     "-o c.pth is the same file as the input --checkpoint c.pth"),
    (["bench", "m.onnx", "--json", "m.onnx"], "--json m.onnx is the same file as the input MODEL.onnx"),
    (["bench", "m.onnx", "n.onnx", "--csv", "./sub/../n.onnx"], "is the same file as the input MODEL.onnx"),
    (["bench", "m.onnx", "--json", "r.out", "--csv", "r.out"], "--csv r.out is the same file as the output --json"),
    (["bench", "m.onnx", "--json", "-", "--csv", "-"], "--json and --csv both write to stdout"),
    (["bench", "m.onnx", "--plot", "-"], "--plot cannot write to stdout"),
    (["rewrite", "m.onnx", "-o", "-"], "-o cannot write to stdout"),
    (["rewrite", "m.onnx", "-o", "sub"], "is a directory"),
    (["rewrite", "m.onnx", "-o", "fifo"], "is a FIFO (named pipe), not a regular file"),
    (["bench", "m.onnx", "--json", "/dev/stdout"], "is under /dev or /proc"),
    (["rewrite", "m.onnx", "-o", "/dev/null"], "is under /dev or /proc"),
    (["rewrite", "m.onnx", "-o", "nodir/x.onnx"], "directory nodir does not exist"),
]


@pytest.mark.parametrize("argv,needle", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_refused_outputs_change_nothing(work, capsys, argv, needle):
    os.link(work / "m.onnx", work / "hard.onnx")
    (work / "c.pth").write_bytes(b"checkpoint")
    (work / "r.out").write_text("old report")
    os.mkfifo(work / "fifo")
    before = snapshot(work)
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    line = one_line(err)
    assert needle in line and line.startswith(f"edgeprune {argv[0]}: error: ")
    assert snapshot(work) == before


def test_a_device_node_is_never_replaced(work, capsys):
    """A real character device (same numbers as /dev/null) made in the temp dir."""
    try:
        os.mknod(work / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError as exc:
        pytest.skip(f"cannot create a device node here (needs root / CAP_MKNOD): {exc}")
    before = snapshot(work)
    code, _, err = run_cli(capsys, "rewrite", "m.onnx", "-o", "null")
    assert code == 2 and "null is a character device, not a regular file" in one_line(err)
    assert stat.S_ISCHR(os.lstat(work / "null").st_mode) and snapshot(work) == before


def bench_fast(*extra) -> list[str]:
    return ["bench", "m.onnx", "--warmup", "0", "--repeats", "2", "--threads", "1", *extra]


def test_json_to_stdout_keeps_stdout_machine_readable(work, capsys):
    before = snapshot(work)
    code, out, err = run_cli(capsys, *bench_fast("--json", "-"))
    assert code == 0, err
    assert [m["name"] for m in json.loads(out)["models"]] == ["m"]
    assert "median" in err                            # the table went to stderr
    assert snapshot(work) == before                  # nothing written, nothing left behind


def test_csv_to_stdout(work, capsys):
    code, out, err = run_cli(capsys, *bench_fast("--csv", "-"))
    assert code == 0, err
    assert out.splitlines()[0].startswith("device,") and len(out.splitlines()) == 1 + 2


def test_symlinked_output_is_written_through_and_keeps_its_mode(work, capsys):
    (work / "sub" / "real.json").write_text("{}")
    os.chmod(work / "sub" / "real.json", 0o640)
    os.symlink("sub/real.json", work / "link.json")
    code, _, err = run_cli(capsys, *bench_fast("--json", "link.json"))
    assert code == 0, err
    assert os.readlink(work / "link.json") == "sub/real.json"           # still a link
    assert json.loads((work / "sub" / "real.json").read_text())["models"][0]["name"] == "m"
    assert stat.S_IMODE(os.stat(work / "sub" / "real.json").st_mode) == 0o640
    assert sorted(p.name for p in (work / "sub").iterdir()) == ["real.json"]     # no temp file left


def test_new_files_get_the_umask_default_mode(work, capsys):
    old = os.umask(0o027)
    try:
        code, _, err = run_cli(capsys, *bench_fast("--json", "r.json", "--csv", "r.csv"))
    finally:
        os.umask(old)
    assert code == 0, err
    assert {stat.S_IMODE(os.stat(work / n).st_mode) for n in ("r.json", "r.csv")} == {0o640}


def test_atomic_path_keeps_mode_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "t.txt"
    target.write_text("old")
    os.chmod(target, 0o604)
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["t.txt"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and stat.S_IMODE(os.stat(target).st_mode) == 0o604


def test_policy_api_names_both_options(tmp_path):
    (tmp_path / "a").write_text("x")
    (tmp_path / "x").mkdir()
    with pytest.raises(OutputPathError, match=r"--csv .*same file as the output --json"):
        check_command_files({}, {"--json": tmp_path / "r", "--csv": tmp_path / "x/../r"})
    files = check_command_files({"IN": tmp_path / "a"}, {"--json": "-"}, stdout=["--json"])
    assert files.to_stdout("--json") and not files.to_stdout("--csv")
