"""SIGTERM and SIGHUP end a command the way Ctrl-C does, so the same cleanup runs.

systemd, CI timeouts and ``kill`` send SIGTERM; a closed terminal sends SIGHUP. Python's
default for both is to die on the spot: temporary files beside the output stay, and a remote
benchmark agent keeps loading the board. Every cleanup path in edgeprune already handles
``KeyboardInterrupt`` (``finally`` blocks, ``atomic_path``, ``SshRunner``'s kill of the remote
agent), so the handler raises :class:`Terminated`, a ``KeyboardInterrupt``. Further signals
during that cleanup are ignored, as a second Ctrl-C would otherwise abort it half-way.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from types import FrameType
from typing import Iterator

HANDLED = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)


class Terminated(KeyboardInterrupt):
    """The process got SIGTERM or SIGHUP; ``exit_code`` is the shell's 128 + signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise_terminated(signum: int, _frame: FrameType | None) -> None:
    for other in HANDLED:              # cleanup runs once, uninterrupted
        signal.signal(other, signal.SIG_IGN)
    raise Terminated(signum)


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM/SIGHUP raise :class:`Terminated` (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_terminated) for s in HANDLED}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
