"""Run the board agent on a board over SSH: push, run, pull, clean up.

``SshRunner`` has the life cycle of :class:`edgeprune.runners.local.LocalRunner` (activate /
``run(request) -> result`` / deactivate, or ``with``) and answers the same JSON, so the bench
code does not know where the models ran. Per session on the board::

    <workdir>/models/<sha256>.onnx        model cache by content hash (kept between sessions)
    <workdir>/models/<sha256>.npz         input arrays given with --inputs (cached the same way)
    <workdir>/session-<id>/agent.py       pushed once per connection, removed on exit
    <workdir>/session-<id>/request-N.json, result-N.json   removed after each run

A model is uploaded only when the board lacks ``<sha256>.onnx`` (uploads go to a ``.part``
file renamed into place, so an interrupted upload never poisons the cache); the agent's
``sha256`` of the file it timed is checked against the local one. ``cleanup(models=True)``
removes the cache. Models with ONNX external data (``.onnx.data``) are not supported: the
board would not find the data file (the agent then reports a ModelLoadError).

Never hangs: connecting is bounded by ``connect_timeout_s``, every SFTP operation by it too,
and the agent run by ``command_timeout_s`` (+ the request's ``time_budget_s``); on a timeout
the remote agent is killed. Failures are one-line :class:`~edgeprune.errors.DeviceError` s:
unreachable host, refused connection, wrong key, host key mismatch (``connect.py``), the
connection dropping mid-run (sshd killed, reboot), no python / numpy / onnxruntime / provider
on the board, the agent crashing (signal), a timeout.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shlex
import signal
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from edgeprune.devices.connect import connect, home_relative, remote_join
from edgeprune.devices.profile import DeviceProfile
from edgeprune.errors import DeviceError, InternalError

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
_T = TypeVar("_T")

AGENT_PATH = Path(__file__).resolve().with_name("agent.py")
POLL_S = 0.02
STDERR_TAIL = 20
PROGRESS_PREFIX = "edgeprune-agent progress "
PID_PREFIX = "edgeprune-pid "
EXIT_NO_DIR = 97                       # our wrapper's exit code when the session dir is gone
# Agent error types that are the board's fault; the rest (bad input, bad model) are left in the
# result for edgeprune.runners.results.raise_for_error, as for a local run.
BOARD_ERRORS = ("MissingDependency", "MissingProvider", "ProviderNotUsed", "OutOfMemory", "RunError",
                "InternalError", "ModelNotFound")


@dataclass(frozen=True)
class CommandResult:
    """What one remote command did. ``status`` is -1 when the server sent no exit status."""

    status: int
    stdout: str
    stderr_tail: tuple[str, ...]        # last lines of stderr, progress lines excluded

    def last_error(self) -> str:
        return self.stderr_tail[-1] if self.stderr_tail else "no output on stderr"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Lines:
    """Splits a byte stream into text lines, calling ``on_line`` for each complete one."""

    def __init__(self, on_line: Callable[[str], None]) -> None:
        self._buffer = b""
        self._on_line = on_line

    def feed(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self._on_line(line.decode("utf-8", "replace").rstrip("\r"))

    def flush(self) -> None:
        if self._buffer:
            self.feed(b"\n")


class SshRunner:
    """Times models on a board reached over SSH, through the pushed board agent."""

    name = "ssh"

    def __init__(self, profile: DeviceProfile, progress: ProgressCallback | None = None,
                 agent_path: str | os.PathLike = AGENT_PATH) -> None:
        if profile.transport != "ssh":
            raise InternalError(f"SshRunner needs an ssh profile, {profile.name} is {profile.transport}")
        self.profile = profile
        self._progress = progress
        self._agent_path = Path(agent_path)
        self._client: Any = None
        self._sftp: Any = None
        self.workdir = ""                   # absolute path on the board, set by activate()
        self.session_dir = ""
        self._runs = 0
        self._remote_pid: int | None = None
        self.uploads: list[str] = []        # sha256 of every file this runner had to upload

    # ------------------------------------------------------------ life cycle

    @property
    def is_active(self) -> bool:
        return self._client is not None

    @property
    def models_dir(self) -> str:
        return remote_join(self.workdir, "models")

    def activate(self) -> None:
        """Connect, create the work dirs and push the agent (DeviceError on any failure)."""
        if self.is_active:
            raise InternalError("SshRunner.activate() called twice")
        self._client = connect(self.profile)
        try:
            with self._guard("opening SFTP"):
                self._sftp = self._client.open_sftp()
                self._sftp.get_channel().settimeout(self.profile.connect_timeout_s)
            self.workdir = self._resolve_workdir()
            self.session_dir = remote_join(self.workdir, f"session-{socket.gethostname()}-{uuid.uuid4().hex[:12]}")
            self._makedirs(self.models_dir)
            with self._guard(f"creating {self.session_dir}"):
                self._sftp.mkdir(self.session_dir, 0o700)
                self._sftp.put(str(self._agent_path), remote_join(self.session_dir, "agent.py"))
        except BaseException:
            self._close()
            raise
        log.debug("device %s: session %s", self.profile.name, self.session_dir)

    def deactivate(self) -> None:
        """Remove this session's files (when the board is still reachable), close the connection."""
        if not self.is_active:
            raise InternalError("SshRunner.deactivate() called on an inactive runner")
        try:
            if self._alive():
                self._remove_tree(self.session_dir)
            else:
                log.debug("device %s: connection lost, %s stays on the board", self.profile.name, self.session_dir)
        finally:
            self._close()

    def __enter__(self) -> "SshRunner":
        self.activate()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.deactivate()
        except DeviceError as cleanup_error:
            if exc_type is None:
                raise
            log.warning("device %s: cleanup after the error failed: %s", self.profile.name, cleanup_error)

    def _close(self) -> None:
        for closable in (self._sftp, self._client):
            if closable is not None:
                closable.close()
        self._sftp = self._client = None

    # ------------------------------------------------------------ public operations

    def run(self, request: dict[str, Any]) -> dict[str, Any]:
        """One agent request with local paths -> the agent's result, paths mapped back to local.

        Raises DeviceError for failures of the board (see ``BOARD_ERRORS``); request and model
        errors stay in ``result["error"]`` as from :class:`LocalRunner`.
        """
        self._require_active("run")
        self._runs += 1
        remote_request, locals_by_remote = self._push_inputs(request)
        req_path = remote_join(self.session_dir, f"request-{self._runs}.json")
        res_path = remote_join(self.session_dir, f"result-{self._runs}.json")
        try:
            self._write_text(req_path, json.dumps(remote_request))
            timeout = self.profile.command_timeout_s + float(request.get("time_budget_s") or 0.0)
            completed = self._run_agent(req_path, res_path, timeout)
            result = self._read_result(res_path, completed)
        except BaseException:
            self._remove_after_error([req_path, res_path])
            raise
        self._remove_files([req_path, res_path])
        self._raise_for_board_error(result)
        return self._localize(result, locals_by_remote)

    def probe(self, script: str) -> CommandResult:
        """Run ``python -c script`` with the board's python (for ``edgeprune devices check``)."""
        self._require_active("probe")
        command = f"{self._python()} -c {shlex.quote(script)}"
        return self._exec(command, self.profile.command_timeout_s, on_stderr=None)

    def cleanup(self, models: bool = True) -> None:
        """Remove this session's per-run files and, with ``models``, the board's model cache."""
        self._require_active("cleanup")
        for name in self._listdir(self.session_dir):
            if name != "agent.py":
                self._remove_files([remote_join(self.session_dir, name)])
        if models:
            self._remove_tree(self.models_dir)
            self._makedirs(self.models_dir)

    def clean_board(self) -> int:
        """Remove the model cache and the session dirs that dropped connections left behind.

        Returns the number of files removed. A session of another host benchmarking the same
        board right now would lose its files too: run it when the board is idle.
        """
        self._require_active("clean_board")
        removed = 0
        for name in self._listdir(self.workdir):
            path = remote_join(self.workdir, name)
            if name == "models" or (name.startswith("session-") and path != self.session_dir):
                removed += len(self._listdir(path))
                self._remove_tree(path)
        self._makedirs(self.models_dir)
        return removed

    # ------------------------------------------------------------ pushing

    def _push_inputs(self, request: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """Upload models (and the .npz) into the cache; the request rewritten to board paths."""
        remote = copy.deepcopy(request)
        locals_by_remote: dict[str, str] = {}
        for model in remote.get("models") or []:
            local = str(model["path"])
            model["path"] = self._upload_cached(local, ".onnx")
            locals_by_remote[model["path"]] = local
        inputs = remote.get("inputs") or {}
        if inputs.get("npz"):
            inputs["npz"] = self._upload_cached(str(inputs["npz"]), ".npz")
        if self._progress is not None:
            remote["progress"] = True
        return remote, locals_by_remote

    def _upload_cached(self, local: str, suffix: str) -> str:
        """``<models>/<sha256><suffix>`` on the board; uploaded only when absent."""
        path = Path(local)
        if not path.is_file():
            raise DeviceError(f"cannot push {local} to device {self.profile.name}: no such file")
        digest = sha256_file(path)
        target = remote_join(self.models_dir, digest + suffix)
        size = path.stat().st_size
        if self._remote_size(target) == size:
            log.debug("device %s: %s cached as %s", self.profile.name, local, target)
            return target
        partial = f"{target}.part-{uuid.uuid4().hex[:8]}"
        log.info("device %s: uploading %s (%s)", self.profile.name, path.name, _size_text(size))
        try:
            with self._guard(f"uploading {local}"):
                self._sftp.put(str(path), partial)
                self._sftp.posix_rename(partial, target)
        except DeviceError:
            self._remove_after_error([partial])
            raise
        self.uploads.append(digest)
        return target

    def _unless_missing(self, what: str, op: Callable[[], _T], default: _T) -> _T:
        """Run an SFTP ``op`` under ``_guard``; a remote path that does not exist gives ``default``."""
        try:
            with self._guard(what):
                return op()
        except DeviceError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                return default
            raise

    def _remote_size(self, path: str) -> int | None:
        return self._unless_missing(f"checking {path}", lambda: self._sftp.stat(path).st_size, None)

    def _write_text(self, path: str, text: str) -> None:
        with self._guard(f"writing {path}"):
            with self._sftp.open(path, "w") as f:
                f.write(text.encode("utf-8"))

    # ------------------------------------------------------------ running

    def _python(self) -> str:
        """The profile's python as shell words; a leading ``~/`` still means the home dir."""
        words = shlex.split(self.profile.python or "python3")
        return " ".join('"$HOME"/' + shlex.quote(w[2:]) if w.startswith("~/") else shlex.quote(w) for w in words)

    def _run_agent(self, req_path: str, res_path: str, timeout: float) -> CommandResult:
        """Start the agent in the background of a shell that reports its pid, then wait for it.

        The shell stays the parent so that a crash by a signal comes back as 128 + signal
        number, and so the pid can be killed on a timeout.
        """
        command = (f"cd {shlex.quote(self.session_dir)} || exit {EXIT_NO_DIR}\n"
                   f"{self._python()} agent.py {shlex.quote(req_path)} {shlex.quote(res_path)} </dev/null &\n"
                   f"pid=$!\necho \"{PID_PREFIX}$pid\"\nwait $pid\n")
        try:
            return self._exec(command, timeout, on_stderr=self._progress_line)
        except KeyboardInterrupt:
            if self._remote_pid is not None and self._alive():
                self._kill_remote(self._remote_pid)
            raise
        finally:
            self._remote_pid = None

    def _progress_line(self, line: str) -> bool:
        """Consume an agent progress line (True) or leave it for the stderr tail (False)."""
        if not line.startswith(PROGRESS_PREFIX):
            return False
        done, _, total = line[len(PROGRESS_PREFIX):].partition(" ")
        if self._progress is not None and done.isdigit() and total.isdigit():
            self._progress(int(done), int(total))
        return True

    def _on_stdout(self, line: str, lines: list[str]) -> None:
        if line.startswith(PID_PREFIX) and line[len(PID_PREFIX):].isdigit():
            self._remote_pid = int(line[len(PID_PREFIX):])
        else:
            lines.append(line)

    def _exec(self, command: str, timeout: float,
              on_stderr: Callable[[str], bool] | None) -> CommandResult:
        """Run ``command`` on the board; DeviceError on timeout or a dropped connection."""
        stdout: list[str] = []
        tail: list[str] = []

        def stderr_line(line: str) -> None:
            if on_stderr is None or not on_stderr(line):
                tail.append(line)
                del tail[:-STDERR_TAIL]
                log.debug("device %s stderr: %s", self.profile.name, line)

        with self._guard("starting a command"):
            channel = self._client.get_transport().open_session(timeout=self.profile.connect_timeout_s)
            channel.exec_command(command)
        try:
            self._pump(channel, _Lines(lambda s: self._on_stdout(s, stdout)), _Lines(stderr_line), timeout)
            status = channel.exit_status
        finally:
            channel.close()
        if status == -1 and not self._alive():
            raise DeviceError(f"connection to device {self.profile.name} was lost while the agent ran "
                              f"(sshd stopped, board rebooted or network down); the run is void: retry when "
                              f"`edgeprune devices check {self.profile.name}` passes{self._leftovers()}")
        return CommandResult(status, "\n".join(stdout), tuple(tail))

    def _pump(self, channel: Any, out: _Lines, err: _Lines, timeout: float) -> None:
        """Read both streams until the command exits, the connection drops, or ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            busy = False
            if channel.recv_ready():
                out.feed(channel.recv(65536))
                busy = True
            if channel.recv_stderr_ready():
                err.feed(channel.recv_stderr(65536))
                busy = True
            if not busy and channel.exit_status_ready():
                break
            if time.monotonic() > deadline:
                self._on_timeout(timeout)
            if not busy:
                time.sleep(POLL_S)
        out.flush()
        err.flush()

    def _on_timeout(self, timeout: float) -> None:
        if self._remote_pid is not None and self._alive():
            self._kill_remote(self._remote_pid)
        raise DeviceError(f"device {self.profile.name} did not finish within {timeout:g} s "
                          f"(command_timeout_s {self.profile.command_timeout_s:g} + time budget); the agent "
                          f"was stopped; raise command_timeout_s in {self.profile.source} or use --time-budget")

    def _kill_remote(self, pid: int) -> None:
        """Best effort: TERM the agent; a failure here must not hide the original problem."""
        self._remote_pid = None
        try:
            channel = self._client.get_transport().open_session(timeout=self.profile.connect_timeout_s)
            channel.exec_command(f"kill -TERM {int(pid)} 2>/dev/null")
            channel.status_event.wait(self.profile.connect_timeout_s)
            channel.close()
        except (OSError, EOFError) as exc:
            log.warning("device %s: could not stop agent pid %d: %s", self.profile.name, pid, exc)
        except Exception as exc:  # paramiko.SSHException; paramiko is imported lazily
            if type(exc).__module__.split(".")[0] != "paramiko":
                raise
            log.warning("device %s: could not stop agent pid %d: %s", self.profile.name, pid, exc)

    # ------------------------------------------------------------ results

    def _read_result(self, res_path: str, completed: CommandResult) -> dict[str, Any]:
        """The agent's JSON, or a DeviceError explaining why there is none."""
        def read() -> bytes:
            with self._sftp.open(res_path, "r") as f:
                return f.read()

        raw = self._unless_missing(f"reading {res_path}", read, None)
        if raw is None:
            raise self._no_result_error(completed)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DeviceError(f"the agent on device {self.profile.name} wrote a broken result ({exc}); "
                              f"is the disk of {self.workdir} full?") from exc

    def _no_result_error(self, completed: CommandResult) -> DeviceError:
        name, status, last = self.profile.name, completed.status, completed.last_error()
        python = self.profile.python or "python3"
        if status == 127:
            return DeviceError(f"python {python!r} not found on device {name} ({last}); install python3 (>= 3.6) "
                               f"on the board or set 'python' in {self.profile.source} to its path")
        if status == 126:
            return DeviceError(f"python {python!r} on device {name} cannot be executed ({last}); "
                               f"fix 'python' in {self.profile.source}")
        if status == EXIT_NO_DIR:
            return DeviceError(f"work dir {self.session_dir} vanished on device {name} during the session; "
                               f"is something cleaning {self.workdir}?")
        if status > 128:
            sig = _signal_name(status - 128)
            hint = " (killed: out of memory?)" if sig == "SIGKILL" else " (a crash in onnxruntime or numpy)"
            return DeviceError(f"the agent on device {name} died of {sig}{hint} before writing its result; "
                               f"last stderr: {last}")
        return DeviceError(f"the agent on device {name} exited with status {status} without a result: {last}; "
                           f"it needs Python >= 3.6 (check with `edgeprune devices check {name}`)")

    def _raise_for_board_error(self, result: dict[str, Any]) -> None:
        error = result.get("error") if isinstance(result, dict) else None
        if not error or error.get("type") not in BOARD_ERRORS:
            return
        kind, message, name = error["type"], error.get("message", ""), self.profile.name
        if kind == "MissingDependency":
            raise DeviceError(f"device {name} lacks numpy or onnxruntime for its python: {message}; run "
                              f"`edgeprune devices check {name}` for the install command")
        if kind in ("MissingProvider", "ProviderNotUsed"):
            raise DeviceError(f"on device {name}: {message}; or change 'providers' in {self.profile.source} "
                              f"/ pass --providers")
        raise DeviceError(f"on device {name}: {kind}: {message}")

    def _localize(self, result: dict[str, Any], locals_by_remote: dict[str, str]) -> dict[str, Any]:
        """Board paths -> the user's local paths; check the board timed the bytes we sent."""
        for model in result.get("models") or []:
            remote = model.get("path")
            local = locals_by_remote.get(remote, remote)
            expected = Path(remote).name.split(".")[0]
            if model.get("sha256") not in (None, expected):
                self._remove_files([remote])
                raise DeviceError(f"the cached copy of {local} on device {self.profile.name} is corrupt "
                                  f"(sha256 {model.get('sha256')}, expected {expected}); it was removed, "
                                  f"run again to upload it afresh")
            model["path"], model["remote_path"] = local, remote
        if isinstance(result.get("env"), dict):
            result["env"].update(device=self.profile.name, transport="ssh", host=self.profile.destination())
        return result

    # ------------------------------------------------------------ remote files

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Map socket/SFTP/paramiko failures during ``what`` to a DeviceError."""
        try:
            yield
        except DeviceError:
            raise
        except (OSError, EOFError) as exc:
            raise self._transport_error(what, exc) from exc
        except Exception as exc:  # paramiko.SSHException; paramiko is imported lazily
            if type(exc).__module__.split(".")[0] != "paramiko":
                raise
            raise self._transport_error(what, exc) from exc

    def _transport_error(self, what: str, exc: BaseException) -> DeviceError:
        name = self.profile.name
        if not self._alive():
            return DeviceError(f"connection to device {name} was lost while {what} (sshd stopped, board "
                               f"rebooted or network down){self._leftovers()}")
        if isinstance(exc, socket.timeout):
            return DeviceError(f"device {name} did not answer within {self.profile.connect_timeout_s:g} s while "
                               f"{what}; raise connect_timeout_s in {self.profile.source} on a slow link")
        hint = f"; check 'workdir' ({self.profile.workdir}) in {self.profile.source}" if isinstance(
            exc, PermissionError) else ""
        return DeviceError(f"{what} on device {name} failed: {exc or type(exc).__name__}{hint}")

    def _leftovers(self) -> str:
        if not self.session_dir:
            return ""
        return f"; `edgeprune devices clean {self.profile.name}` removes what stays in {self.session_dir}"

    def _alive(self) -> bool:
        transport = self._client.get_transport() if self._client is not None else None
        return bool(transport is not None and transport.is_active())

    def _require_active(self, what: str) -> None:
        if not self.is_active:
            raise InternalError(f"SshRunner.{what}() outside its life cycle; use `with SshRunner(profile) as r:`")

    def _resolve_workdir(self) -> str:
        """Absolute work dir on the board (``~/`` = the login user's home)."""
        relative = home_relative(self.profile.workdir)
        with self._guard("resolving the home directory"):
            home = self._sftp.normalize(".")
        return relative.rstrip("/") if relative.startswith("/") else remote_join(home, relative)

    def _makedirs(self, path: str) -> None:
        """``mkdir -p`` over SFTP; tolerates another session creating the same dirs meanwhile."""
        if self._remote_size(path) is not None:
            return
        prefix = "/" if path.startswith("/") else ""
        parts = [p for p in path.split("/") if p]
        for depth in range(1, len(parts) + 1):
            current = prefix + "/".join(parts[:depth])
            if self._remote_size(current) is not None:
                continue
            with self._guard(f"creating {current}"):
                try:
                    self._sftp.mkdir(current, 0o755)
                except OSError:
                    if self._remote_size(current) is None:
                        raise

    def _listdir(self, path: str) -> list[str]:
        return self._unless_missing(f"listing {path}", lambda: self._sftp.listdir(path), [])

    def _remove_files(self, paths: list[str]) -> None:
        for path in paths:
            self._unless_missing(f"removing {path}", lambda: self._sftp.remove(path), None)

    def _remove_after_error(self, paths: list[str]) -> None:
        """Best-effort removal while another error propagates (that one is the one to report)."""
        if not self._alive():
            return
        try:
            self._remove_files(paths)
        except DeviceError as exc:
            log.warning("device %s: %s", self.profile.name, exc)

    def _remove_tree(self, path: str) -> None:
        """Remove a flat directory (the session dir or the model cache) and its files."""
        self._remove_files([remote_join(path, name) for name in self._listdir(path)])
        self._unless_missing(f"removing {path}", lambda: self._sftp.rmdir(path), None)


def _size_text(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.1f} kB"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
