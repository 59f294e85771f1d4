"""Shared fixtures: the session's model-export cache, and a real OpenSSH server on loopback.

``session_model_cache`` (autouse, once per session) points ``model_cache.cache_dir()`` (the
exports shared by the pass tests: presets, the hand-written decoder, fp16's tiny decoder) at a
directory of pytest's ``tmp_path_factory``: every test file writes under pytest's temporary
root, which setup.cfg's ``tmp_path_retention_policy = failed`` removes after a green run.

``loopback_sshd`` starts ``/usr/sbin/sshd -D`` on 127.0.0.1 and a free port with its own
config (key auth only, its own host key and authorized_keys in a temp dir), and
``device_config`` points ``EDGEPRUNE_CONFIG_DIR`` at a temp dir holding a ``loopback`` device
profile for it, so ``edgeprune bench --device loopback`` works end to end. Tests are
skipped (with the reason) when openssh-server is not installed.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

SSHD = Path("/usr/sbin/sshd")
PRIVSEP_DIR = Path("/run/sshd")
START_TIMEOUT_S = 10.0


def _skip_reason() -> str | None:
    if not SSHD.is_file():
        return f"{SSHD} not found: install openssh-server (apt-get install openssh-server) for the SSH tests"
    if shutil.which("ssh-keygen") is None:
        return "ssh-keygen not found: install openssh-client for the SSH tests"
    if not PRIVSEP_DIR.is_dir():
        if os.geteuid() != 0:
            return f"{PRIVSEP_DIR} (sshd's privilege separation dir) is missing and we are not root to create it"
        PRIVSEP_DIR.mkdir(mode=0o755)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)
    return path


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        found += kids
        todo += kids
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def processes_under(directory: Path) -> list[int]:
    """Processes whose working directory is inside ``directory`` (agents we started there)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            if cwd == str(directory) or cwd.startswith(str(directory) + "/"):
                pids.append(int(entry.name))
    return pids


@dataclass
class LoopbackSshd:
    """One running sshd and the files a client needs to use it."""

    port: int
    root: Path
    process: subprocess.Popen
    key_file: Path          # authorized client key
    wrong_key_file: Path    # a valid key that is NOT authorized
    known_hosts: Path
    board_dir: Path         # the "board's" work dir used by the profile

    def profile_dict(self, **overrides: Any) -> dict[str, Any]:
        profile = {
            "description": "test sshd on loopback", "transport": "ssh", "host": "127.0.0.1",
            "port": self.port, "user": os.environ.get("USER") or _login_name(),
            "key_file": str(self.key_file), "known_hosts": str(self.known_hosts),
            "host_key_check": "accept-new", "python": sys.executable,
            "providers": [["CPUExecutionProvider", {}]], "threads": 1,
            "workdir": str(self.board_dir), "connect_timeout_s": 5, "command_timeout_s": 60,
        }
        profile.update(overrides)
        return profile

    def sshd_pids(self) -> list[int]:
        """The listener and every sshd process under it (one per connection)."""
        return [self.process.pid] + [p for p in _descendants(self.process.pid) if _comm(p).startswith("sshd")]

    def kill(self) -> None:
        """SIGKILL every sshd process of this server: open connections drop at once."""
        for pid in self.sshd_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=5)

    def log(self) -> str:
        path = self.root / "sshd.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _login_name() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def _write_config(root: Path, port: int, authorized: Path) -> Path:
    host_key = _keygen(root / "ssh_host_ed25519_key")
    config = root / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}", f"PidFile {root / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized}", "UsePAM no", "StrictModes no", "PermitRootLogin yes",
        "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "Subsystem sftp internal-sftp", "PrintMotd no", "X11Forwarding no", "LoginGraceTime 20",
        "MaxStartups 50", "LogLevel VERBOSE", "",
    ]))
    return config


def _wait_for_banner(port: int, process: subprocess.Popen, root: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sshd exited with {process.returncode}: {(root / 'sshd.log').read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd did not answer on port {port} within {START_TIMEOUT_S} s")


@pytest.fixture(scope="session", autouse=True)
def session_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory every shared export of this session goes to (see tests/model_cache.py)."""
    import model_cache

    path = tmp_path_factory.mktemp("model-cache")
    model_cache.use_directory(path)
    return path


@pytest.fixture(scope="session")
def ssh_client_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(authorized key, unauthorized key), generated once per test session."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    keys = tmp_path_factory.mktemp("ssh-keys")
    return _keygen(keys / "id_good"), _keygen(keys / "id_wrong")


@pytest.fixture
def loopback_sshd(tmp_path: Path, ssh_client_keys: tuple[Path, Path]) -> Iterator[LoopbackSshd]:
    """A real sshd on 127.0.0.1:<free port>, stopped (with any agent it ran) after the test."""
    good, wrong = ssh_client_keys
    root = tmp_path / "sshd"
    root.mkdir()
    authorized = root / "authorized_keys"
    authorized.write_text(good.with_suffix(".pub").read_text())
    port = _free_port()
    config = _write_config(root, port, authorized)
    with open(root / "sshd.log", "wb") as log:
        process = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT)
    server = LoopbackSshd(port=port, root=root, process=process, key_file=good, wrong_key_file=wrong,
                          known_hosts=root / "known_hosts", board_dir=tmp_path / "board")
    try:
        _wait_for_banner(port, process, root)
        yield server
    finally:
        if process.poll() is None:
            server.kill()
        for pid in processes_under(tmp_path):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def device_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty user config dir (``EDGEPRUNE_CONFIG_DIR``); profiles go to its ``devices/``."""
    config = tmp_path / "config"
    (config / "devices").mkdir(parents=True)
    monkeypatch.setenv("EDGEPRUNE_CONFIG_DIR", str(config))
    return config


@pytest.fixture
def loopback_profile(loopback_sshd: LoopbackSshd, device_config: Path) -> Path:
    """``loopback`` device profile (user config) for ``loopback_sshd``; returns its file."""
    path = device_config / "devices" / "loopback.json"
    path.write_text(json.dumps(loopback_sshd.profile_dict(), indent=2))
    return path


@pytest.fixture
def no_user_profiles(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An empty user config dir: the packaged profiles (``local``), not the user's, set the defaults.

    Modules that run device-aware commands use it with ``pytestmark = pytest.mark.usefixtures(...)``.
    """
    monkeypatch.setenv("EDGEPRUNE_CONFIG_DIR", str(tmp_path / "config"))
