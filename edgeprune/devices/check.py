"""``edgeprune devices check``: what to ask a device, and how to judge its answer.

``PROBE`` is a small script (Python 2.7 and 3.x syntax, so that even a too old interpreter
answers) that reports the board's architecture, Python, numpy, onnxruntime and its
providers. :func:`judge` turns its answer into :class:`Finding` s with a concrete fix each
(the pip command for the onnxruntime that exists for that Python on PyPI, the Jetson Zoo
wheel on a Jetson, the profile key to change).

Running the probe (with the device's python, locally or over SSH) is a runner's job:
:func:`edgeprune.runners.probe.check_device` runs it and calls :func:`judge` with the agent's
minimum Python, so this module needs nothing from ``edgeprune.runners``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from edgeprune.devices.profile import DeviceProfile
from edgeprune.errors import DeviceError

PROBE_MARKER = "EDGEPRUNE-PROBE "
JETSON_ZOO = "https://elinux.org/Jetson_Zoo#ONNX_Runtime"
# Newest onnxruntime with aarch64/x86_64 wheels on PyPI per Python (1.22.0 is what the suite
# runs under qemu on aarch64; later ones crash there, and on some boards).
ORT_FOR_PYTHON = {(3, 6): "1.10.0", (3, 7): "1.14.1", (3, 8): "1.19.2", (3, 9): "1.19.2"}
ORT_DEFAULT = "1.22.0"
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")

PROBE = f"PROBE_MARKER = {PROBE_MARKER!r}\n" + r"""
import json, os, platform, sys
info = {"python": platform.python_version(), "executable": sys.executable,
        "machine": platform.machine(), "system": platform.system(),
        "libc": " ".join(platform.libc_ver()).strip(),
        "cpu_count": getattr(os, "cpu_count", lambda: None)(),
        "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,  # novermin
        "jetson": os.path.exists("/etc/nv_tegra_release"), "os": None}
try:
    for line in open("/etc/os-release"):
        if line.startswith("PRETTY_NAME="):
            info["os"] = line.split("=", 1)[1].strip().strip('"')
except (IOError, OSError):
    pass
for name in ("numpy", "onnxruntime"):
    try:
        module = __import__(name)
        info[name] = module.__version__
    except Exception as exc:
        info[name + "_error"] = "%s: %s" % (type(exc).__name__, exc)
if "onnxruntime" in info:
    import onnxruntime
    info["providers"] = list(onnxruntime.get_available_providers())
print(PROBE_MARKER + json.dumps(info))
"""


@dataclass(frozen=True)
class Finding:
    """One checked item: ``ok`` with what was found, or not with the fix."""

    item: str
    ok: bool
    found: str
    fix: str | None = None


@dataclass(frozen=True)
class CheckReport:
    device: str
    where: str
    info: dict[str, Any] = field(repr=False)
    findings: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.findings)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())


def parse_probe(stdout: str, device: str, stderr: str = "") -> dict[str, Any]:
    for line in stdout.splitlines():
        if line.startswith(PROBE_MARKER):
            return json.loads(line[len(PROBE_MARKER):])
    raise DeviceError(f"the python of device {device} did not answer the probe: {stderr.strip()[-300:] or stdout[-300:]}")


def _pip(profile: DeviceProfile, package: str) -> str:
    python = profile.python or "python3"
    return f"pip3 install {package}" if python == "python3" else f"{python} -m pip install {package}"


def _ort_fix(profile: DeviceProfile, info: dict[str, Any]) -> str:
    if info.get("jetson"):
        return (f"install NVIDIA's onnxruntime-gpu wheel for this JetPack from {JETSON_ZOO} (JetPack 4.6, "
                f"Python 3.6: onnxruntime_gpu-1.11.0-cp36-cp36m-linux_aarch64.whl) with pip3 install FILE.whl")
    version = ORT_FOR_PYTHON.get(_version(info["python"]), ORT_DEFAULT)
    return _pip(profile, f"onnxruntime=={version}")


def _python_findings(profile: DeviceProfile, info: dict[str, Any], min_python: tuple[int, int]) -> list[Finding]:
    found = f"{info['python']} ({info['executable']})"
    if _version(info["python"]) < min_python:
        wanted = ".".join(map(str, min_python))
        return [Finding("python", False, found, f"the agent needs Python >= {wanted}: install python3 and set "
                                                f"'python' in {profile.source or 'the profile'} to it")]
    findings = [Finding("python", True, found)]
    if "numpy" in info:
        findings.append(Finding("numpy", True, info["numpy"]))
    else:
        fix = "sudo apt-get install python3-numpy" if info.get("jetson") else _pip(profile, "numpy")
        findings.append(Finding("numpy", False, f"missing ({info.get('numpy_error')})", fix))
    if "onnxruntime" in info:
        findings.append(Finding("onnxruntime", True, info["onnxruntime"]))
    else:
        findings.append(Finding("onnxruntime", False, f"missing ({info.get('onnxruntime_error')})",
                                _ort_fix(profile, info)))
    return findings


def _provider_findings(profile: DeviceProfile, info: dict[str, Any]) -> list[Finding]:
    available = info.get("providers")
    if available is None:
        return []
    out = [Finding("providers available", True, ", ".join(available))]
    for name, _ in profile.providers:
        if name in available:
            continue
        where = profile.source or "the profile"
        if name in GPU_PROVIDERS:
            fix = (f"install onnxruntime-gpu instead of onnxruntime ({JETSON_ZOO} on a Jetson), "
                   f"or remove {name} from 'providers' in {where}")
        else:
            fix = f"install an onnxruntime build with {name}, or remove it from 'providers' in {where}"
        out.append(Finding(f"provider {name}", False, "not available", fix))
    return out


def _affinity_findings(profile: DeviceProfile, info: dict[str, Any]) -> list[Finding]:
    cpus = info.get("cpus")
    if profile.affinity is None or cpus is None:
        return []
    missing = sorted(set(profile.affinity) - set(cpus))
    found = "cpus " + ",".join(map(str, profile.affinity))
    if not missing:
        return [Finding("affinity", True, found)]
    return [Finding("affinity", False, f"{found}: CPU(s) {missing} not usable here",
                    f"set 'affinity' in {profile.source or 'the profile'} to CPUs among {cpus}")]


def findings_for(profile: DeviceProfile, info: dict[str, Any], min_python: tuple[int, int]) -> tuple[Finding, ...]:
    """Turn a probe answer into findings with fixes; ``min_python`` is the agent's minimum."""
    system = f"{info['machine']}, {info.get('os') or info['system']}, {info.get('libc') or 'libc ?'}, " \
             f"{info.get('cpu_count') or '?'} cpus"
    findings = [Finding("board", True, system)] + _python_findings(profile, info, min_python)
    return tuple(findings + _provider_findings(profile, info) + _affinity_findings(profile, info))


def judge(profile: DeviceProfile, info: dict[str, Any], where: str, min_python: tuple[int, int]) -> CheckReport:
    """The report for ``profile``'s probe answer ``info``, probed ``where`` (shown to the user)."""
    return CheckReport(device=profile.name, where=where, info=info, findings=findings_for(profile, info, min_python))
