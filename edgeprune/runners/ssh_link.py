"""One open SSH connection to a board and its files: SFTP calls bounded and mapped to DeviceError.

:class:`SshLink` is what :class:`~edgeprune.runners.ssh.SshRunner` holds while active: the
paramiko client (opened by :func:`edgeprune.devices.connect.connect`), its SFTP channel, and
the content-addressed model cache on the board::

    <workdir>/models/<sha256>.onnx        model cache by content hash (kept between sessions)
    <workdir>/models/<sha256>.npz         input arrays given with --inputs (cached the same way)

Every remote call runs under :meth:`SshLink.guard`, which turns socket, SFTP and paramiko
failures into one-line :class:`~edgeprune.errors.DeviceError` s that say which step failed
and what to change (a dropped connection, a slow link, a work dir without permission).
Running commands is ``ssh_exec``'s part; what to run is the runner's.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from edgeprune.devices.connect import connect, home_relative, remote_join
from edgeprune.devices.profile import DeviceProfile
from edgeprune.errors import DeviceError

log = logging.getLogger(__name__)

_T = TypeVar("_T")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a local file: the model cache's key, and what the agent reports back."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_paramiko_error(exc: BaseException) -> bool:
    """paramiko.SSHException and kin, recognized without importing paramiko (it is optional)."""
    return type(exc).__module__.split(".")[0] == "paramiko"


class SshLink:
    """The client and SFTP channel of one connection; closes both on :meth:`close`."""

    def __init__(self, profile: DeviceProfile) -> None:
        self.profile = profile
        self.session_dir = ""               # named in "files stay on the board" hints once set
        self.client: Any = connect(profile)
        self._sftp: Any = None
        try:
            with self.guard("opening SFTP"):
                self._sftp = self.client.open_sftp()
                self._sftp.get_channel().settimeout(profile.connect_timeout_s)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for closable in (self._sftp, self.client):
            if closable is not None:
                closable.close()
        self._sftp = self.client = None

    def alive(self) -> bool:
        transport = self.client.get_transport() if self.client is not None else None
        return bool(transport is not None and transport.is_active())

    def leftovers(self) -> str:
        """The hint appended to "connection lost" errors: what stays on the board, how to remove it."""
        if not self.session_dir:
            return ""
        return f"; `edgeprune devices clean {self.profile.name}` removes what stays in {self.session_dir}"

    # ------------------------------------------------------------ error mapping

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Map socket/SFTP/paramiko failures during ``what`` to a DeviceError."""
        try:
            yield
        except DeviceError:
            raise
        except (OSError, EOFError) as exc:
            raise self._transport_error(what, exc) from exc
        except Exception as exc:  # paramiko.SSHException; paramiko is imported lazily
            if not is_paramiko_error(exc):
                raise
            raise self._transport_error(what, exc) from exc

    def _transport_error(self, what: str, exc: BaseException) -> DeviceError:
        name, source = self.profile.name, self.profile.source
        if not self.alive():
            return DeviceError(f"connection to device {name} was lost while {what} (sshd stopped, board "
                               f"rebooted or network down){self.leftovers()}")
        if isinstance(exc, socket.timeout):
            return DeviceError(f"device {name} did not answer within {self.profile.connect_timeout_s:g} s while "
                               f"{what}; raise connect_timeout_s in {source} on a slow link")
        hint = f"; check 'workdir' ({self.profile.workdir}) in {source}" if isinstance(exc, PermissionError) else ""
        return DeviceError(f"{what} on device {name} failed: {exc or type(exc).__name__}{hint}")

    def unless_missing(self, what: str, op: Callable[[], _T], default: _T) -> _T:
        """Run an SFTP ``op`` under :meth:`guard`; a remote path that does not exist gives ``default``."""
        try:
            with self.guard(what):
                return op()
        except DeviceError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                return default
            raise

    # ------------------------------------------------------------ files

    def resolve_workdir(self) -> str:
        """Absolute work dir on the board (``~/`` = the login user's home)."""
        relative = home_relative(self.profile.workdir)
        with self.guard("resolving the home directory"):
            home = self._sftp.normalize(".")
        return relative.rstrip("/") if relative.startswith("/") else remote_join(home, relative)

    def size(self, path: str) -> int | None:
        """Size of a remote file (None when it does not exist)."""
        return self.unless_missing(f"checking {path}", lambda: self._sftp.stat(path).st_size, None)

    def make_private_dir(self, path: str, files: dict[str, Path]) -> None:
        """Create ``path`` (mode 700) holding ``files`` (remote name -> local file), as one step."""
        with self.guard(f"creating {path}"):
            self._sftp.mkdir(path, 0o700)
            for name, local in files.items():
                self._sftp.put(str(local), remote_join(path, name))

    def write_text(self, path: str, text: str) -> None:
        with self.guard(f"writing {path}"):
            with self._sftp.open(path, "w") as f:
                f.write(text.encode("utf-8"))

    def read_bytes(self, path: str) -> bytes | None:
        """A remote file's bytes (None when it does not exist)."""
        def read() -> bytes:
            with self._sftp.open(path, "r") as f:
                return f.read()

        return self.unless_missing(f"reading {path}", read, None)

    def makedirs(self, path: str) -> None:
        """``mkdir -p`` over SFTP; tolerates another session creating the same dirs meanwhile."""
        if self.size(path) is not None:
            return
        prefix = "/" if path.startswith("/") else ""
        parts = [p for p in path.split("/") if p]
        for depth in range(1, len(parts) + 1):
            current = prefix + "/".join(parts[:depth])
            if self.size(current) is not None:
                continue
            with self.guard(f"creating {current}"):
                try:
                    self._sftp.mkdir(current, 0o755)
                except OSError:
                    if self.size(current) is None:
                        raise

    def listdir(self, path: str) -> list[str]:
        return self.unless_missing(f"listing {path}", lambda: self._sftp.listdir(path), [])

    def remove_files(self, paths: list[str]) -> None:
        for path in paths:
            self.unless_missing(f"removing {path}", lambda: self._sftp.remove(path), None)

    def remove_after_error(self, paths: list[str]) -> None:
        """Best-effort removal while another error propagates (that one is the one to report)."""
        if not self.alive():
            return
        try:
            self.remove_files(paths)
        except DeviceError as exc:
            log.warning("device %s: %s", self.profile.name, exc)

    def remove_tree(self, path: str) -> None:
        """Remove a flat directory (the session dir or the model cache) and its files."""
        self.remove_files([remote_join(path, name) for name in self.listdir(path)])
        self.unless_missing(f"removing {path}", lambda: self._sftp.rmdir(path), None)

    # ------------------------------------------------------------ model cache

    def upload_cached(self, local: str, cache_dir: str, suffix: str) -> tuple[str, str | None]:
        """``<cache_dir>/<sha256><suffix>`` on the board, and the sha256 when it had to be uploaded.

        Uploads go to a ``.part`` file renamed into place, so an interrupted upload never
        poisons the cache.
        """
        path = Path(local)
        if not path.is_file():
            raise DeviceError(f"cannot push {local} to device {self.profile.name}: no such file")
        digest = sha256_file(path)
        target = remote_join(cache_dir, digest + suffix)
        size = path.stat().st_size
        if self.size(target) == size:
            log.debug("device %s: %s cached as %s", self.profile.name, local, target)
            return target, None
        partial = f"{target}.part-{uuid.uuid4().hex[:8]}"
        log.info("device %s: uploading %s (%s)", self.profile.name, path.name, _size_text(size))
        try:
            with self.guard(f"uploading {local}"):
                self._sftp.put(str(path), partial)
                self._sftp.posix_rename(partial, target)
        except DeviceError:
            self.remove_after_error([partial])
            raise
        return target, digest


def _size_text(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.1f} kB"
