"""Run ``edgeprune devices check``'s probe on a device and judge the answer.

The probe script and the judging are data about boards (:mod:`edgeprune.devices.check`);
running a script with the device's python is transport work of the runners: a subprocess
for a local profile, :meth:`SshRunner.probe` for a remote one (which also proves the work
dir is writable: the runner creates its session dir there). The agent's minimum Python comes
from the agent itself.
"""
from __future__ import annotations

import subprocess
import sys
from typing import Any

from edgeprune.devices.check import PROBE, CheckReport, judge, parse_probe
from edgeprune.devices.profile import DeviceProfile
from edgeprune.errors import DeviceError
from edgeprune.runners import agent


def check_device(profile: DeviceProfile) -> CheckReport:
    """Probe ``profile``'s device (connecting over SSH when needed) and judge what it has."""
    if profile.is_remote:
        info = _probe_over_ssh(profile)
        where = f"{profile.destination()} (work dir {info['workdir']}, writable)"
    else:
        info = _probe_local(profile)
        where = "this machine"
    return judge(profile, info, where, agent.MIN_PYTHON)


def _probe_over_ssh(profile: DeviceProfile) -> dict[str, Any]:
    from edgeprune.runners.ssh import SshRunner

    with SshRunner(profile) as runner:
        done = runner.probe(PROBE)
        if done.status == 127:
            raise DeviceError(f"python {profile.python or 'python3'!r} not found on device {profile.name} "
                              f"({done.last_error()}); install python3 (>= {_min_python()}) or fix 'python' in "
                              f"{profile.source}")
        info = parse_probe(done.stdout, profile.name, "\n".join(done.stderr_tail))
        info["workdir"] = runner.workdir
    return info


def _probe_local(profile: DeviceProfile) -> dict[str, Any]:
    python = profile.python or sys.executable
    try:
        done = subprocess.run([python, "-c", PROBE], capture_output=True, text=True,
                              timeout=profile.command_timeout_s, stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise DeviceError(f"python {python!r} of device {profile.name} not found; fix 'python' in {profile.source}") from exc
    except subprocess.TimeoutExpired as exc:
        raise DeviceError(f"the probe with {python} did not finish within {profile.command_timeout_s:g} s") from exc
    return parse_probe(done.stdout, profile.name, done.stderr)


def _min_python() -> str:
    return ".".join(map(str, agent.MIN_PYTHON))
