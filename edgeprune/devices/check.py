"""``edgeprune devices check``: what to ask a device, and how to judge its answer.

``PROBE`` is a small script (Python 2.7 and 3.x syntax, so that even a too old interpreter
answers) that reports the board's architecture, Python, numpy, onnxruntime, its providers
and build device, and the CPU's SIMD flags that decide how fast int8 and fp16 run there
(``/proc/cpuinfo``: ``asimddp`` = ARMv8.2 dot product, what ONNX Runtime's int8 GEMMs use on
a Cortex-A76; ``avx512_vnni`` / ``avx_vnni`` on x86, without which the U8S8 kernels use
VPMADDUBSW and need 7-bit weights; ``asimdhp`` = ARM fp16 arithmetic). :func:`judge` turns its answer into :class:`Finding` s with a concrete fix each
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
INT8_FLAGS = {"asimddp": "ARM dot product", "avx512_vnni": "AVX-512 VNNI", "avx512vnni": "AVX-512 VNNI",
              "avx_vnni": "AVX-VNNI"}

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
    info["ort_device"] = onnxruntime.get_device()
try:
    flags = set()
    for line in open("/proc/cpuinfo"):
        key = line.split(":", 1)[0].strip().lower()
        if key in ("flags", "features"):
            flags.update(line.split(":", 1)[1].split())
    info["cpu_flags"] = sorted(flags & set(('asimddp', 'i8mm', 'asimdhp', 'fphp', 'avx2', 'avx512f', 'avx512_vnni', 'avx512vnni', 'avx_vnni', 'avx512_fp16')))
except (IOError, OSError):
    pass
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


def _precision_findings(profile: DeviceProfile, info: dict[str, Any]) -> list[Finding]:
    """What the CPU's flags and the providers say about int8 / fp16, against the profile's ``precisions``."""
    flags = info.get("cpu_flags")
    if flags is None:
        return []
    dot = sorted({INT8_FLAGS[f] for f in flags if f in INT8_FLAGS})
    if dot:
        int8 = f"int8 GEMMs on {', '.join(dot)}" + (" + i8mm" if "i8mm" in flags else "")
    elif "avx2" in flags:
        int8 = "int8 on AVX2 without VNNI (U8S8 via VPMADDUBSW: keep 7-bit weights, the int8 default)"
    else:
        int8 = "no int8 dot-product instructions (int8 GEMMs fall back to widening multiplies)"
    gpu = [p for p in info.get("providers", ()) if p in GPU_PROVIDERS]
    fp16 = f"fp16 on {', '.join(gpu)}" if gpu else (
        "fp16 arithmetic (asimdhp) but ORT CPU runs most fp16 ops in fp32" if "asimdhp" in flags
        else "no fp16 hardware path: fp16 runs no faster than fp32 on the CPU provider")
    out = [Finding("int8/fp16 support", True, f"{int8}; {fp16} (ORT device {info.get('ort_device', '?')})")]
    wanted = profile.precisions or ()
    where = profile.source or "the profile"
    if "int8" in wanted and not dot:
        out.append(Finding("precision int8", False, "the profile lists int8 but the CPU has no dot-product/VNNI",
                           f"expect little int8 gain here; remove int8 from 'precisions' in {where}"))
    if "fp16" in wanted and not gpu:
        out.append(Finding("precision fp16", False, "the profile lists fp16 but no GPU provider is available",
                           f"install onnxruntime-gpu ({JETSON_ZOO} on a Jetson), or remove fp16 from "
                           f"'precisions' in {where}"))
    return out


def findings_for(profile: DeviceProfile, info: dict[str, Any], min_python: tuple[int, int]) -> tuple[Finding, ...]:
    """Turn a probe answer into findings with fixes; ``min_python`` is the agent's minimum."""
    system = f"{info['machine']}, {info.get('os') or info['system']}, {info.get('libc') or 'libc ?'}, " \
             f"{info.get('cpu_count') or '?'} cpus"
    findings = [Finding("board", True, system)] + _python_findings(profile, info, min_python)
    return tuple(findings + _provider_findings(profile, info) + _affinity_findings(profile, info)
                 + _precision_findings(profile, info))


def judge(profile: DeviceProfile, info: dict[str, Any], where: str, min_python: tuple[int, int]) -> CheckReport:
    """The report for ``profile``'s probe answer ``info``, probed ``where`` (shown to the user)."""
    return CheckReport(device=profile.name, where=where, info=info, findings=findings_for(profile, info, min_python))
