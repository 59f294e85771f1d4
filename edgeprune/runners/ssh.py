"""Run the board agent on a board over SSH: push, run, pull, clean up.

``SshRunner`` has the life cycle of :class:`edgeprune.runners.local.LocalRunner` (activate /
``run(request) -> result`` / deactivate, or ``with``) and answers the same JSON, so the bench
code does not know where the models ran. Per session on the board::

    <workdir>/models/<sha256>.onnx        model cache by content hash (kept between sessions)
    <workdir>/models/<sha256>.npz         input arrays given with --inputs (cached the same way)
    <workdir>/session-<id>/agent.py       pushed once per connection, removed on exit
    <workdir>/session-<id>/request-N.json, result-N.json   removed after each run

A model is uploaded only when the board lacks ``<sha256>.onnx``; the agent's ``sha256`` of the
file it timed is checked against the local one. ``cleanup(models=True)`` removes the cache.
Models with ONNX external data (``.onnx.data``) are not supported: the board would not find
the data file (the agent then reports a ModelLoadError).

Never hangs: connecting is bounded by ``connect_timeout_s``, every SFTP operation by it too,
and the agent run by ``command_timeout_s`` (+ the request's ``time_budget_s``); on a timeout
the remote agent is killed. Failures are one-line :class:`~edgeprune.errors.DeviceError` s:
unreachable host, refused connection, wrong key, host key mismatch (``devices/connect.py``),
the connection dropping mid-run (sshd killed, reboot), no python / numpy / onnxruntime /
provider on the board, the agent crashing (signal), a timeout.

Split by responsibility: ``ssh_link`` (the connection, its files and the model cache),
``ssh_exec`` (running one command without hanging), this module (the agent session).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shlex
import signal
import socket
import uuid
from pathlib import Path
from typing import Any, Callable

from edgeprune.devices.connect import remote_join
from edgeprune.devices.profile import DeviceProfile
from edgeprune.errors import DeviceError, InternalError
from edgeprune.runners import agent
from edgeprune.runners.ssh_exec import EXIT_NO_DIR, CommandResult, RemoteCommand, agent_command
from edgeprune.runners.ssh_link import SshLink, sha256_file

__all__ = ["AGENT_PATH", "BOARD_ERRORS", "CommandResult", "SshRunner", "sha256_file"]

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]

AGENT_PATH = Path(agent.__file__).resolve()
_MIN_PYTHON = ".".join(map(str, agent.MIN_PYTHON))
REMOTE_AGENT = "agent.py"               # the agent's name in the session dir, whatever file was pushed
# Agent error kinds that are the board's fault; the rest (bad input, bad model) are left in the
# result for edgeprune.runners.results.raise_for_error, as for a local run.
BOARD_ERRORS = (agent.MISSING_DEPENDENCY, agent.MISSING_PROVIDER, agent.PROVIDER_NOT_USED, agent.OUT_OF_MEMORY,
                agent.RUN_ERROR, agent.INTERNAL_ERROR, agent.MODEL_NOT_FOUND)


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
        self._link: SshLink | None = None
        self.workdir = ""                   # absolute path on the board, set by activate()
        self.session_dir = ""
        self._runs = 0
        self.uploads: list[str] = []        # sha256 of every file this runner had to upload

    # ------------------------------------------------------------ life cycle

    @property
    def is_active(self) -> bool:
        return self._link is not None

    @property
    def models_dir(self) -> str:
        return remote_join(self.workdir, "models")

    def activate(self) -> None:
        """Connect, create the work dirs and push the agent (DeviceError on any failure)."""
        if self.is_active:
            raise InternalError("SshRunner.activate() called twice")
        link = SshLink(self.profile)
        try:
            self.workdir = link.resolve_workdir()
            self.session_dir = remote_join(self.workdir, f"session-{socket.gethostname()}-{uuid.uuid4().hex[:12]}")
            link.session_dir = self.session_dir
            link.makedirs(self.models_dir)
            link.make_private_dir(self.session_dir, {REMOTE_AGENT: self._agent_path})
        except BaseException:
            link.close()
            raise
        self._link = link
        log.debug("device %s: session %s", self.profile.name, self.session_dir)

    def deactivate(self) -> None:
        """Remove this session's files (when the board is still reachable), close the connection."""
        link = self._link
        if link is None:
            raise InternalError("SshRunner.deactivate() called on an inactive runner")
        try:
            if link.alive():
                link.remove_tree(self.session_dir)
            else:
                log.debug("device %s: connection lost, %s stays on the board", self.profile.name, self.session_dir)
        finally:
            link.close()
            self._link = None

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

    # ------------------------------------------------------------ public operations

    def run(self, request: dict[str, Any]) -> dict[str, Any]:
        """One agent request with local paths -> the agent's result, paths mapped back to local.

        Raises DeviceError for failures of the board (see ``BOARD_ERRORS``); request and model
        errors stay in ``result["error"]`` as from :class:`LocalRunner`.
        """
        link = self._require_active("run")
        self._runs += 1
        remote_request, locals_by_remote = self._push_inputs(link, request)
        req_path = remote_join(self.session_dir, f"request-{self._runs}.json")
        res_path = remote_join(self.session_dir, f"result-{self._runs}.json")
        try:
            link.write_text(req_path, json.dumps(remote_request))
            timeout = self.profile.command_timeout_s + float(request.get("time_budget_s") or 0.0)
            command = agent_command(self.session_dir, self._python(), REMOTE_AGENT, req_path, res_path)
            completed = RemoteCommand(link, command, timeout, on_stderr=self._progress_line).run()
            result = self._read_result(link, res_path, completed)
        except BaseException:
            link.remove_after_error([req_path, res_path])
            raise
        link.remove_files([req_path, res_path])
        self._raise_for_board_error(result)
        return self._localize(link, result, locals_by_remote)

    def probe(self, script: str) -> CommandResult:
        """Run ``python -c script`` with the board's python (for ``edgeprune devices check``)."""
        link = self._require_active("probe")
        command = f"{self._python()} -c {shlex.quote(script)}"
        return RemoteCommand(link, command, self.profile.command_timeout_s).run()

    def cleanup(self, models: bool = True) -> None:
        """Remove this session's per-run files and, with ``models``, the board's model cache."""
        link = self._require_active("cleanup")
        for name in link.listdir(self.session_dir):
            if name != REMOTE_AGENT:
                link.remove_files([remote_join(self.session_dir, name)])
        if models:
            link.remove_tree(self.models_dir)
            link.makedirs(self.models_dir)

    def clean_board(self) -> int:
        """Remove the model cache and the session dirs that dropped connections left behind.

        Returns the number of files removed. A session of another host benchmarking the same
        board right now would lose its files too: run it when the board is idle.
        """
        link = self._require_active("clean_board")
        removed = 0
        for name in link.listdir(self.workdir):
            path = remote_join(self.workdir, name)
            if name == "models" or (name.startswith("session-") and path != self.session_dir):
                removed += len(link.listdir(path))
                link.remove_tree(path)
        link.makedirs(self.models_dir)
        return removed

    # ------------------------------------------------------------ pushing and running

    def _push_inputs(self, link: SshLink, request: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """Upload models (and the .npz) into the cache; the request rewritten to board paths."""
        remote = copy.deepcopy(request)
        locals_by_remote: dict[str, str] = {}
        for model in remote.get("models") or []:
            local = str(model["path"])
            model["path"] = self._upload(link, local, ".onnx")
            locals_by_remote[model["path"]] = local
        inputs = remote.get("inputs") or {}
        if inputs.get("npz"):
            inputs["npz"] = self._upload(link, str(inputs["npz"]), ".npz")
        if self._progress is not None:
            remote["progress"] = True
        return remote, locals_by_remote

    def _upload(self, link: SshLink, local: str, suffix: str) -> str:
        target, uploaded = link.upload_cached(local, self.models_dir, suffix)
        if uploaded is not None:
            self.uploads.append(uploaded)
        return target

    def _python(self) -> str:
        """The profile's python as shell words; a leading ``~/`` still means the home dir."""
        words = shlex.split(self.profile.python or "python3")
        return " ".join('"$HOME"/' + shlex.quote(w[2:]) if w.startswith("~/") else shlex.quote(w) for w in words)

    def _progress_line(self, line: str) -> bool:
        """Consume an agent progress line (True) or leave it for the stderr tail (False)."""
        if not line.startswith(agent.PROGRESS_PREFIX):
            return False
        done, _, total = line[len(agent.PROGRESS_PREFIX):].partition(" ")
        if self._progress is not None and done.isdigit() and total.isdigit():
            self._progress(int(done), int(total))
        return True

    # ------------------------------------------------------------ results

    def _read_result(self, link: SshLink, res_path: str, completed: CommandResult) -> dict[str, Any]:
        """The agent's JSON, or a DeviceError explaining why there is none."""
        raw = link.read_bytes(res_path)
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
            return DeviceError(f"python {python!r} not found on device {name} ({last}); install python3 (>= {_MIN_PYTHON}) "
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
                           f"it needs Python >= {_MIN_PYTHON} (check with `edgeprune devices check {name}`)")

    def _raise_for_board_error(self, result: dict[str, Any]) -> None:
        error = result.get("error") if isinstance(result, dict) else None
        if not error or error.get("type") not in BOARD_ERRORS:
            return
        kind, message, name = error["type"], error.get("message", ""), self.profile.name
        if kind == agent.MISSING_DEPENDENCY:
            raise DeviceError(f"device {name} lacks numpy or onnxruntime for its python: {message}; run "
                              f"`edgeprune devices check {name}` for the install command")
        if kind in (agent.MISSING_PROVIDER, agent.PROVIDER_NOT_USED):
            raise DeviceError(f"on device {name}: {message}; or change 'providers' in {self.profile.source} "
                              f"/ pass --providers")
        raise DeviceError(f"on device {name}: {kind}: {message}")

    def _localize(self, link: SshLink, result: dict[str, Any], locals_by_remote: dict[str, str]) -> dict[str, Any]:
        """Board paths -> the user's local paths; check the board timed the bytes we sent."""
        for model in result.get("models") or []:
            remote = model.get("path")
            local = locals_by_remote.get(remote, remote)
            expected = Path(remote).name.split(".")[0]
            if model.get("sha256") not in (None, expected):
                link.remove_files([remote])
                raise DeviceError(f"the cached copy of {local} on device {self.profile.name} is corrupt "
                                  f"(sha256 {model.get('sha256')}, expected {expected}); it was removed, "
                                  f"run again to upload it afresh")
            model["path"], model["remote_path"] = local, remote
        if isinstance(result.get("env"), dict):
            result["env"].update(device=self.profile.name, transport="ssh", host=self.profile.destination())
        return result

    def _require_active(self, what: str) -> SshLink:
        if self._link is None:
            raise InternalError(f"SshRunner.{what}() outside its life cycle; use `with SshRunner(profile) as r:`")
        return self._link


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
