"""The one runner factory: a device (profile, name or profile path) -> an inactive runner.

Every runner has Polygraphy's life cycle (``activate`` / ``run(request) -> result`` /
``deactivate``, or ``with``) and answers the agent's JSON, so callers such as
:func:`edgeprune.runners.bench.benchmark` do not know where the models run::

    from edgeprune.runners import get_runner
    with get_runner("orangepi5") as runner:        # or a DeviceProfile, or a .json path
        result = runner.run(request)                # agent protocol, see agent.py

Adding a transport = one runner class + one branch here; ``edgeprune.devices`` only holds the
profile that names the transport.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Protocol

from edgeprune.devices.profile import DeviceProfile, load_profile
from edgeprune.errors import InternalError

ProgressCallback = Callable[[int, int], None]


class Runner(Protocol):
    """What the bench code needs from a runner (LocalRunner, SshRunner)."""

    profile: Any

    def run(self, request: dict[str, Any]) -> dict[str, Any]: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc_info: Any) -> Any: ...


def get_runner(device: DeviceProfile | str | os.PathLike, progress: ProgressCallback | None = None) -> Runner:
    """An inactive runner for ``device`` (a profile, its name or a path); use it with ``with``.

    ``local`` -> :class:`~edgeprune.runners.local.LocalRunner`, ``ssh`` ->
    :class:`~edgeprune.runners.ssh.SshRunner` (imported only then: it needs paramiko).
    ``progress(done, total)`` is called as timed runs complete. The runner's ``profile``
    attribute holds the resolved profile (its providers, threads and affinity are defaults
    for the request, see :meth:`DeviceProfile.request_defaults`).
    """
    resolved = load_profile(device)
    if resolved.transport == "ssh":
        from edgeprune.runners.ssh import SshRunner

        return SshRunner(resolved, progress=progress)
    if resolved.transport == "local":
        from edgeprune.runners.local import LocalRunner

        runner = LocalRunner(progress=progress)
        runner.profile = resolved
        return runner
    raise InternalError(f"no runner for transport {resolved.transport!r} of device {resolved.name}")
