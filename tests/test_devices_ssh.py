"""`edgeprune bench --device` over a real sshd on loopback (tests/conftest.py starts it).

The "board" is this machine reached through SSH with its own key, port and work dir; the
agent runs with this interpreter's onnxruntime. Every failure mode is produced for real:
refused port, silent port, wrong key, changed host key, sshd killed mid-run, a board python
that does not exist / lacks onnxruntime / crashes / hangs.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from _runner_models import chain_oracle, matmul_chain
from conftest import LoopbackSshd, processes_under
from edgeprune.cli import main as cli_main
from edgeprune.devices import load_profile
from edgeprune.devices.profile import profile_from_dict
from edgeprune.errors import DeviceError
from edgeprune.runners.ssh import SshRunner, sha256_file

pytestmark = pytest.mark.ssh


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("ssh-models")
    weights = matmul_chain(d / "a.onnx", 24)
    matmul_chain(d / "b.onnx", 8, seed=1)
    return d / "a.onnx", d / "b.onnx", weights


def _bench(capsys, *argv):
    start = time.monotonic()
    code = cli_main.main(["bench", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err, time.monotonic() - start


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _board_files(sshd: LoopbackSshd) -> list[str]:
    return sorted(str(p.relative_to(sshd.board_dir)) for p in sshd.board_dir.rglob("*") if p.is_file())


def _agent_running(board_dir: Path) -> bool:
    for pid in processes_under(board_dir):
        try:
            if b"agent.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:   # exited meanwhile
            continue
    return False


def _profile(sshd: LoopbackSshd, **overrides) -> object:
    return profile_from_dict(sshd.profile_dict(**overrides), "test profile", "loopback")


def _script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def _uploads_logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "uploading" in r.getMessage()]


def test_bench_over_ssh_end_to_end_twice(loopback_sshd, loopback_profile, models, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="edgeprune.devices")
    a, b, _ = models
    argv = [a, b, "--device", "loopback", "--free-dim", "batch=2", "--repeats", "5", "--warmup", "1"]
    code, out, err, _ = _bench(capsys, *argv, "--json", tmp_path / "r1.json")
    assert code == 0, err
    data = json.loads((tmp_path / "r1.json").read_text())
    assert data["device"] == "loopback" and data["env"]["transport"] == "ssh"
    user = loopback_sshd.profile_dict()["user"]
    assert data["env"]["host"] == f"{user}@127.0.0.1:{loopback_sshd.port}"
    assert data["env"]["threads"] == 1 and data["request"]["threads"] == 1     # the profile's threads
    assert [m["path"] for m in data["models"]] == [str(a), str(b)]               # local paths again
    assert [m["sha256"] for m in data["models"]] == [sha256_file(a), sha256_file(b)]
    assert [len(m["samples_ms"]) for m in data["models"]] == [5, 5] and len(data["speedups"]) == 1
    cached = [f"models/{sha256_file(p)}.onnx" for p in (a, b)]
    assert _board_files(loopback_sshd) == sorted(cached)      # agent, request, result all gone
    before = {name: os.stat(loopback_sshd.board_dir / name) for name in cached}
    assert len(_uploads_logged(caplog)) == 2
    caplog.clear()

    code, _, err, _ = _bench(capsys, *argv, "--json", tmp_path / "r2.json")
    assert code == 0, err
    assert _board_files(loopback_sshd) == sorted(cached)
    for name, stat in before.items():   # not uploaded again: same inode, same mtime
        after = os.stat(loopback_sshd.board_dir / name)
        assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert _uploads_logged(caplog) == []


def test_runner_uploads_once_and_returns_outputs(loopback_sshd, models):
    a, _, weights = models
    request = {"models": [{"name": "a", "path": str(a)}], "repeats": 2, "warmup": 0, "return_outputs": True,
               "inputs": {"seed": 3, "free_dims": {"batch": 3}}}
    seen = []
    with SshRunner(_profile(loopback_sshd), progress=lambda done, total: seen.append((done, total))) as runner:
        first = runner.run(request)
        second = runner.run(request)
        assert runner.uploads == [sha256_file(a)]
        session = runner.session_dir
        assert sorted(p.name for p in Path(session).iterdir()) == ["agent.py"]
        runner.cleanup(models=True)
        assert _board_files(loopback_sshd) == [str(Path(session).relative_to(loopback_sshd.board_dir) / "agent.py")]
    assert not Path(session).exists() and _board_files(loopback_sshd) == []
    x = np.random.RandomState(3).standard_normal((3, 24)).astype(np.float32)   # the agent's seeded input
    for result in (first, second):
        assert result["error"] is None
        np.testing.assert_allclose(np.array(result["models"][0]["outputs"]["y"]), chain_oracle(x, weights),
                                   rtol=1e-4, atol=1e-5)
    assert seen[-1] == (2, 2) and len(seen) >= 2


def test_sshd_killed_mid_run(loopback_sshd, loopback_profile, models, tmp_path, capsys):
    """sshd dies while the agent measures: a DeviceError at once, no output file written."""
    a, _, _ = models
    killed = threading.Event()

    def kill_when_agent_runs() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if _agent_running(loopback_sshd.board_dir):
                time.sleep(0.3)   # let it get into the timed loop
                loopback_sshd.kill()
                killed.set()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_when_agent_runs, daemon=True)
    watcher.start()
    code, _, err, elapsed = _bench(capsys, a, "--device", "loopback", "--free-dim", "batch=2",
                                   "--time-budget", "30", "--json", tmp_path / "r.json", "--csv", tmp_path / "r.csv")
    watcher.join(5)
    assert killed.is_set()
    assert code == 2 and "connection to device loopback was lost" in _one_line_error(err)
    assert err.strip().splitlines()[-1] == _one_line_error(err), err      # the error ends the output
    assert elapsed < 20     # the 30 s budget did not run out: the drop was noticed at once
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("r.", ".r."))) == []


def test_refused_port_is_a_clear_error(loopback_sshd, device_config, models, tmp_path, capsys):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))     # bound, never listening: connections are refused
    port = closed.getsockname()[1]
    (device_config / "devices" / "down.json").write_text(json.dumps(loopback_sshd.profile_dict(port=port)))
    try:
        code, _, err, elapsed = _bench(capsys, models[0], "--device", "down", "--json", tmp_path / "r.json")
    finally:
        closed.close()
    line = _one_line_error(err)
    assert code == 2 and f"connection refused by device down (root@127.0.0.1:{port})".replace(
        "root", loopback_sshd.profile_dict()["user"]) in line
    assert elapsed < 5 and not (tmp_path / "r.json").exists()


def test_silent_host_times_out_within_connect_timeout(loopback_sshd, device_config, models, capsys):
    """A port that accepts but never speaks SSH (a hung board): error after connect_timeout_s."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(5)
    profile = loopback_sshd.profile_dict(port=silent.getsockname()[1], connect_timeout_s=1)
    (device_config / "devices" / "hung.json").write_text(json.dumps(profile))
    try:
        code, _, err, elapsed = _bench(capsys, models[0], "--device", "hung")
    finally:
        silent.close()
    assert code == 2 and "SSH handshake with device hung" in _one_line_error(err) and "within 1 s" in err
    assert 0.9 < elapsed < 6


def test_wrong_key_is_an_auth_failure(loopback_sshd, device_config, models, capsys):
    wrong = loopback_sshd.profile_dict(key_file=str(loopback_sshd.wrong_key_file))
    (device_config / "devices" / "wrongkey.json").write_text(json.dumps(wrong))
    code, _, err, elapsed = _bench(capsys, models[0], "--device", "wrongkey")
    line = _one_line_error(err)
    assert code == 2 and "authentication failed for device wrongkey" in line
    assert str(loopback_sshd.wrong_key_file) in line and "ssh-copy-id" in line and elapsed < 5


def test_changed_host_key_is_refused(loopback_sshd, models, tmp_path):
    from edgeprune.devices.connect import connect

    connect(_profile(loopback_sshd)).close()          # accept-new stored the key
    stored = loopback_sshd.known_hosts.read_text().split()
    assert stored[0] == f"[127.0.0.1]:{loopback_sshd.port}" and stored[1] == "ssh-ed25519"
    other = tmp_path / "other_key"
    import subprocess
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    forged = " ".join(stored[:2] + [other.with_suffix(".pub").read_text().split()[1]])
    loopback_sshd.known_hosts.write_text(forged + "\n")
    with pytest.raises(DeviceError, match="host key of device loopback .* changed .*ssh-keygen -f"):
        connect(_profile(loopback_sshd))
    loopback_sshd.known_hosts.unlink()
    with pytest.raises(DeviceError, match="not in .*known_hosts and host_key_check is 'yes'"):
        connect(_profile(loopback_sshd, host_key_check="yes"))


@pytest.mark.parametrize("python, needle", [
    ("/nonexistent/python3", "python '/nonexistent/python3' not found on device loopback"),
    ("{crash}", "died of SIGSEGV"),
    ("{bare}", "lacks numpy or onnxruntime"),
])
def test_board_side_failures(loopback_sshd, models, tmp_path, python, needle):
    scripts = {
        "crash": _script(tmp_path, "crash.sh", "kill -SEGV $$"),
        "bare": _script(tmp_path, "bare.sh", f'exec "{sys.base_prefix}/bin/python3" -S -I "$@"'),
    }
    request = {"models": [{"name": "a", "path": str(models[0])}], "repeats": 2,
               "inputs": {"free_dims": {"batch": 1}}}
    with SshRunner(_profile(loopback_sshd, python=python.format(**scripts))) as runner:
        with pytest.raises(DeviceError) as info:
            runner.run(request)
        assert runner.is_active and sorted(p.name for p in Path(runner.session_dir).iterdir()) == ["agent.py"]
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_missing_provider_on_the_board(loopback_sshd, loopback_profile, models, capsys):
    code, _, err, _ = _bench(capsys, models[0], "--device", "loopback", "--providers", "cuda",
                             "--free-dim", "batch=1")
    line = _one_line_error(err)
    assert code == 2 and "on device loopback" in line and "CUDAExecutionProvider" in line
    import onnxruntime

    assert f"available: {onnxruntime.get_available_providers()}" in line


def test_command_timeout_stops_the_board_process(loopback_sshd, models, tmp_path):
    hang = _script(tmp_path, "hang.sh", "exec sleep 60")
    profile = _profile(loopback_sshd, python=hang, command_timeout_s=1.5)
    start = time.monotonic()
    with SshRunner(profile) as runner:
        with pytest.raises(DeviceError, match=r"did not finish within 1.5 s .*the agent was stopped"):
            runner.run({"models": [{"name": "a", "path": str(models[0])}]})
    assert time.monotonic() - start < 10
    deadline = time.monotonic() + 5
    while processes_under(loopback_sshd.board_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_under(loopback_sshd.board_dir) == []    # the remote sleep was killed


def test_devices_check_over_ssh(loopback_sshd, loopback_profile, capsys):
    import platform

    import onnxruntime

    assert cli_main.main(["devices", "check", "loopback"]) == 0
    out = capsys.readouterr().out
    rows = {line.split(":")[0].strip(): line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("  ")}
    assert rows["ok  board"].startswith(platform.machine())
    assert rows["ok  python"].startswith(platform.python_version())
    assert rows["ok  onnxruntime"] == onnxruntime.__version__
    assert "CPUExecutionProvider" in rows["ok  providers available"]
    assert f"work dir {loopback_sshd.board_dir}, writable" in out and "ready to benchmark" in out
    assert _board_files(loopback_sshd) == []     # the check leaves nothing behind


def test_devices_check_over_ssh_reports_fixes(loopback_sshd, device_config, tmp_path, capsys):
    bare = _script(tmp_path, "bare.sh", f'exec "{sys.base_prefix}/bin/python3" -S -I "$@"')
    profile = loopback_sshd.profile_dict(python=bare, affinity=[0, 99],
                                         providers=[["CUDAExecutionProvider", {}], ["CPUExecutionProvider", {}]])
    (device_config / "devices" / "needy.json").write_text(json.dumps(profile))
    assert cli_main.main(["devices", "check", "needy"]) == 1
    out = capsys.readouterr().out
    assert "BAD onnxruntime: missing" in out and "-m pip install onnxruntime==1.22.0" in out
    assert "BAD numpy: missing" in out
    # without onnxruntime the providers are unknown; the affinity is still checked
    assert "BAD affinity: cpus 0,99: CPU(s) [99] not usable here" in out


def test_devices_clean_removes_the_cache(loopback_sshd, loopback_profile, models, capsys):
    with SshRunner(load_profile("loopback")) as runner:
        runner.run({"models": [{"name": "a", "path": str(models[0])}], "repeats": 1,
                    "inputs": {"free_dims": {"batch": 1}}})
    assert _board_files(loopback_sshd) == [f"models/{sha256_file(models[0])}.onnx"]
    assert cli_main.main(["devices", "clean", "loopback"]) == 0
    assert "removed 1 file(s)" in capsys.readouterr().out and _board_files(loopback_sshd) == []


def test_ssh_config_alias_and_npz_inputs(loopback_sshd, models, tmp_path):
    """host is a Host alias of an OpenSSH client config; --inputs .npz is pushed into the cache."""
    a, _, weights = models
    config = tmp_path / "ssh_config"
    config.write_text(f"Host board-alias\n  HostName 127.0.0.1\n  Port {loopback_sshd.port}\n"
                      f"  User {loopback_sshd.profile_dict()['user']}\n  IdentityFile {loopback_sshd.key_file}\n")
    profile = _profile(loopback_sshd, host="board-alias", port=None, user=None, key_file=None,
                       ssh_config=str(config))
    x = np.linspace(-1, 1, 4 * 24, dtype=np.float32).reshape(4, 24)
    np.savez(tmp_path / "in.npz", x=x)
    with SshRunner(profile) as runner:
        result = runner.run({"models": [{"name": "a", "path": str(a)}], "repeats": 1, "return_outputs": True,
                             "inputs": {"npz": str(tmp_path / "in.npz")}})
    assert result["error"] is None and result["models"][0]["inputs"] == {"x": [[4, 24], "float32"]}
    np.testing.assert_allclose(np.array(result["models"][0]["outputs"]["y"]), chain_oracle(x, weights),
                               rtol=1e-4, atol=1e-5)
    assert sorted(_board_files(loopback_sshd)) == sorted(
        [f"models/{sha256_file(a)}.onnx", f"models/{sha256_file(tmp_path / 'in.npz')}.npz"])
