"""Running one command on a board over an :class:`~edgeprune.runners.ssh_link.SshLink`, never hanging.

:class:`RemoteCommand` reads stdout and stderr as they come (the agent's progress lines are
handed to a callback, the rest of stderr is kept as a short tail for error messages) until
the command exits, the connection drops, or the timeout passes; on a timeout or Ctrl-C the
remote process is killed. :func:`agent_command` is the shell wrapper that starts the agent
in the background and reports its pid, so it can be killed, and so a crash by a signal comes
back as 128 + signal number.
"""
from __future__ import annotations

import logging
import shlex
import time
from dataclasses import dataclass
from typing import Any, Callable

from edgeprune.errors import DeviceError
from edgeprune.runners.ssh_link import SshLink, is_paramiko_error

log = logging.getLogger(__name__)

POLL_S = 0.02
STDERR_TAIL = 20
PID_PREFIX = "edgeprune-pid "
EXIT_NO_DIR = 97                       # agent_command's exit code when the session dir is gone


@dataclass(frozen=True)
class CommandResult:
    """What one remote command did. ``status`` is -1 when the server sent no exit status."""

    status: int
    stdout: str
    stderr_tail: tuple[str, ...]        # last lines of stderr, progress lines excluded

    def last_error(self) -> str:
        return self.stderr_tail[-1] if self.stderr_tail else "no output on stderr"


def agent_command(session_dir: str, python: str, agent: str, request: str, result: str) -> str:
    """Shell text: run ``python agent request result`` in ``session_dir``, in the background.

    The shell stays the parent and prints ``PID_PREFIX<pid>`` first: the pid lets a timeout
    kill the agent, and ``wait`` returns 128 + N when the agent dies of signal N.
    """
    return (f"cd {shlex.quote(session_dir)} || exit {EXIT_NO_DIR}\n"
            f"{python} {shlex.quote(agent)} {shlex.quote(request)} {shlex.quote(result)} </dev/null &\n"
            f"pid=$!\necho \"{PID_PREFIX}$pid $$\"\nwait $pid\n")


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


class RemoteCommand:
    """One command on the board; :meth:`run` returns its :class:`CommandResult` or raises DeviceError.

    ``on_stderr(line)`` may consume a stderr line (return True), e.g. a progress line;
    unconsumed lines go to the result's ``stderr_tail``.
    """

    def __init__(self, link: SshLink, command: str, timeout: float,
                 on_stderr: Callable[[str], bool] | None = None) -> None:
        self.link = link
        self.command = command
        self.timeout = timeout
        self._on_stderr = on_stderr
        self._stdout: list[str] = []
        self._tail: list[str] = []
        self.pid: int | None = None          # the agent's pid, when the command reports one
        self.shell_pid: int | None = None    # the shell waiting for it (stopped with it)

    def run(self) -> CommandResult:
        """Run the command; DeviceError on timeout or a dropped connection; Ctrl-C kills it."""
        link = self.link
        with link.guard("starting a command"):
            channel = link.client.get_transport().open_session(timeout=link.profile.connect_timeout_s)
            channel.exec_command(self.command)
        try:
            self._pump(channel)
            status = channel.exit_status
        except KeyboardInterrupt:
            if self.pid is not None and link.alive():
                kill_remote(link, self.pid, self.shell_pid)
            raise
        finally:
            channel.close()
        if status == -1 and not link.alive():
            name = link.profile.name
            raise DeviceError(f"connection to device {name} was lost while the agent ran "
                              f"(sshd stopped, board rebooted or network down); the run is void: retry when "
                              f"`edgeprune devices check {name}` passes{link.leftovers()}")
        return CommandResult(status, "\n".join(self._stdout), tuple(self._tail))

    def _stdout_line(self, line: str) -> None:
        pids = line[len(PID_PREFIX):].split() if line.startswith(PID_PREFIX) else []
        if pids and all(p.isdigit() for p in pids):
            self.pid, self.shell_pid = int(pids[0]), int(pids[1]) if len(pids) > 1 else None
        else:
            self._stdout.append(line)

    def _stderr_line(self, line: str) -> None:
        if self._on_stderr is None or not self._on_stderr(line):
            self._tail.append(line)
            del self._tail[:-STDERR_TAIL]
            log.debug("device %s stderr: %s", self.link.profile.name, line)

    def _pump(self, channel: Any) -> None:
        """Read both streams until the command exits, the connection drops, or the timeout."""
        out, err = _Lines(self._stdout_line), _Lines(self._stderr_line)
        deadline = time.monotonic() + self.timeout
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
                self._on_timeout()
            if not busy:
                time.sleep(POLL_S)
        out.flush()
        err.flush()

    def _on_timeout(self) -> None:
        profile = self.link.profile
        if self.pid is not None and self.link.alive():
            kill_remote(self.link, self.pid, self.shell_pid)
        raise DeviceError(f"device {profile.name} did not finish within {self.timeout:g} s "
                          f"(command_timeout_s {profile.command_timeout_s:g} + time budget); the agent "
                          f"was stopped; raise command_timeout_s in {profile.source} or use --time-budget")


def kill_remote(link: SshLink, pid: int, shell_pid: int | None = None) -> None:
    """Best effort: TERM the agent and the shell waiting for it (left alone, that shell outlives
    the connection); a failure here must not hide the original problem."""
    name, timeout = link.profile.name, link.profile.connect_timeout_s
    try:
        channel = link.client.get_transport().open_session(timeout=timeout)
        shell = f" {int(shell_pid)}" if shell_pid is not None else ""
        channel.exec_command(f"kill -TERM {int(pid)}{shell} 2>/dev/null")
        channel.status_event.wait(timeout)
        channel.close()
    except (OSError, EOFError) as exc:
        log.warning("device %s: could not stop agent pid %d: %s", name, pid, exc)
    except Exception as exc:  # paramiko.SSHException; paramiko is imported lazily
        if not is_paramiko_error(exc):
            raise
        log.warning("device %s: could not stop agent pid %d: %s", name, pid, exc)
