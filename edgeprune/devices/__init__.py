"""Where benchmarks run: device profiles (data) and the runner each transport needs.

* ``profile``: :class:`DeviceProfile`, read from packaged and user JSON files;
* ``ssh``: :class:`~edgeprune.devices.ssh.SshRunner` (paramiko; see ``connect`` for why);
* ``agent``: the self-contained board agent both runners execute;
* ``check``: what ``edgeprune devices check`` reports about a board.

Usage::

    from edgeprune.devices import get_runner
    with get_runner("orangepi5") as runner:        # or a DeviceProfile, or a .json path
        result = runner.run(request)                # agent protocol, see agent.py

Nothing here imports paramiko or onnxruntime at import time.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from edgeprune.devices.profile import DeviceProfile, list_profiles, load_profile, user_profile_dir
from edgeprune.errors import InternalError

__all__ = ["DeviceProfile", "get_runner", "list_profiles", "load_profile", "user_profile_dir"]


def get_runner(profile: DeviceProfile | str | os.PathLike,
               progress: Callable[[int, int], None] | None = None) -> Any:
    """An inactive runner for ``profile`` (a profile, its name or a path); use it with ``with``.

    ``local`` -> :class:`edgeprune.runners.local.LocalRunner`, ``ssh`` -> :class:`SshRunner`.
    ``progress(done, total)`` is called as timed runs complete. The runner's ``profile``
    attribute holds the resolved profile (its providers, threads and affinity are defaults
    for the request, see :meth:`DeviceProfile.request_defaults`).
    """
    resolved = load_profile(profile)
    if resolved.transport == "ssh":
        from edgeprune.devices.ssh import SshRunner

        return SshRunner(resolved, progress=progress)
    if resolved.transport == "local":
        from edgeprune.runners.local import LocalRunner

        runner = LocalRunner(progress=progress)
        runner.profile = resolved
        return runner
    raise InternalError(f"no runner for transport {resolved.transport!r} of device {resolved.name}")
