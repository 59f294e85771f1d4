"""A wheelhouse for an offline board: edgeprune's pure-Python wheel plus the board's runtime.

``build_wheelhouse`` builds ``edgeprune-<version>-py3-none-any.whl`` from the source tree
(``pip wheel --no-deps`` on a clean copy, so the checkout gets no ``build/`` litter) and has
the host's pip download the board-side dependencies (numpy, onnxruntime, tqdm and theirs) as
binary wheels for the board's platform and Python (``--platform``, ``--python-version``,
``--only-binary=:all:``). Copy the directory to the board and install with
``pip install --no-index --find-links DIR 'edgeprune[runtime,progress]'``: no torch, onnx or
onnxsim, which a board neither needs nor can always install.

Platforms: a glibc-level tag such as ``manylinux_2_28_aarch64`` stands for the board's glibc
(``ldd --version``) and is expanded to every older compatible tag (pip does not do this for
``--platform``). ``manylinux2014_aarch64`` means glibc 2.17, for which the newest onnxruntime
on PyPI is 1.16.3; onnxruntime >= 1.17 needs ``manylinux_2_27_aarch64`` or later.
"""
from __future__ import annotations

import configparser
import logging
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgeprune.errors import ParameterError, UserError

log = logging.getLogger(__name__)

DEFAULT_PLATFORM = "manylinux_2_28_aarch64"
DEFAULT_PYTHON = "3.10"
EXTRAS = "runtime,progress"
_LEGACY = {"manylinux2014": (2, 17), "manylinux2010": (2, 12), "manylinux1": (2, 5)}
_COPY_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.onnx", "*.onnx.data", "*.egg-info", "build")


class PackagingError(UserError):
    """pip could not build the wheel or find wheels for the requested platform."""


@dataclass(frozen=True)
class Wheelhouse:
    """What ``build_wheelhouse`` put into ``directory``."""

    directory: Path
    edgeprune_wheel: Path
    wheels: tuple[Path, ...]            # every wheel in the directory, edgeprune's included
    platform: str
    python: str
    onnxruntime_version: str | None

    def install_command(self, board_dir: str | None = None) -> str:
        """The command to run on the board after copying the directory there."""
        where = board_dir or self.directory.name
        pin = f" onnxruntime=={self.onnxruntime_version}" if self.onnxruntime_version else ""
        return f"python3 -m pip install --no-index --find-links {where} 'edgeprune[{EXTRAS}]'{pin}"


def platform_tags(platform: str) -> list[str]:
    """``manylinux_2_28_aarch64`` -> that tag and every older manylinux tag of the arch."""
    match = re.fullmatch(r"manylinux_(\d+)_(\d+)_(\w+)", platform)
    legacy = re.fullmatch(r"(manylinux2014|manylinux2010|manylinux1)_(\w+)", platform)
    if match:
        glibc, arch = (int(match.group(1)), int(match.group(2))), match.group(3)
    elif legacy:
        glibc, arch = _LEGACY[legacy.group(1)], legacy.group(2)
    else:
        return [platform]
    floor = 17 if arch in ("aarch64", "ppc64le", "s390x", "armv7l") else 5
    tags = [f"manylinux_{glibc[0]}_{minor}_{arch}" for minor in range(glibc[1], floor - 1, -1)]
    tags += [f"{name}_{arch}" for name, level in _LEGACY.items()
             if level <= glibc and (name == "manylinux2014" or arch in ("x86_64", "i686"))]
    return tags


def _python_tuple(python: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d)\.(\d+)", python)
    if not match:
        raise ParameterError(f"--python {python!r} must be MAJOR.MINOR like 3.10 (the board's `python3 --version`)")
    return int(match.group(1)), int(match.group(2))


def find_source_tree(source: str | Path | None = None) -> Path:
    """The edgeprune checkout to build from (default: the one this package is imported from)."""
    root = Path(source) if source else Path(__file__).resolve().parents[2]
    if not (root / "setup.cfg").is_file() or not (root / "edgeprune" / "__init__.py").is_file():
        raise PackagingError(f"{root} is not an edgeprune source tree (no setup.cfg next to edgeprune/); "
                             f"run from a git checkout or pass --source DIR")
    return root


def _min_python(root: Path) -> tuple[int, int] | None:
    parser = configparser.ConfigParser()
    parser.read(root / "setup.cfg")
    match = re.fullmatch(r">=\s*(\d)\.(\d+)", parser.get("options", "python_requires", fallback="").strip())
    return (int(match.group(1)), int(match.group(2))) if match else None


def _pip(args: list[str], what: str, hint: str = "") -> None:
    command = [sys.executable, "-m", "pip", *args]
    log.debug("running %s", " ".join(command))
    done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR:")]
        reason = " / ".join(errors[-2:]) or (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise PackagingError(f"{what} failed: {reason}{hint}")


def can_build_without_isolation() -> bool:
    """True when this environment's setuptools builds wheels by itself (>= 70.1, or with the
    ``wheel`` package), which ``--no-build-isolation`` relies on."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("wheel") is not None:
        return True
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    numbers = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    return numbers >= (70, 1)


def build_wheel(out_dir: Path, source: str | Path | None = None, build_isolation: bool = True) -> Path:
    """``edgeprune-<version>-py3-none-any.whl`` in ``out_dir``, built from a clean copy."""
    root = find_source_tree(source)
    if not build_isolation and not can_build_without_isolation():
        raise PackagingError("--no-build-isolation needs setuptools >= 70.1 or the wheel package in this "
                             "environment (pip install 'setuptools>=70.1'), or drop the flag (pip then fetches "
                             "the build tools from PyPI)")
    with tempfile.TemporaryDirectory(prefix="edgeprune-wheel-") as tmp:
        copy = Path(tmp) / "src"
        copy.mkdir()
        shutil.copytree(root / "edgeprune", copy / "edgeprune", ignore=_COPY_IGNORE)
        for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
            if (root / name).is_file():
                shutil.copy2(root / name, copy / name)
        isolation = [] if build_isolation else ["--no-build-isolation"]
        _pip(["wheel", "-q", "--no-deps", *isolation, "-w", str(out_dir), str(copy)], f"building the wheel of {root}")
    wheels = sorted(out_dir.glob("edgeprune-*-py3-none-any.whl"))
    if not wheels:
        raise PackagingError(f"pip built no py3-none-any wheel into {out_dir}: {sorted(p.name for p in out_dir.iterdir())}")
    return wheels[-1]


def _download(out_dir: Path, wheel: Path, platform: str, python: str, ort_version: str | None) -> None:
    tags = [arg for tag in platform_tags(platform) for arg in ("--platform", tag)]
    pins = [f"onnxruntime=={ort_version}"] if ort_version else []
    _pip(["download", "-q", "--only-binary=:all:", "--implementation", "cp", "--python-version", python, *tags,
         "-d", str(out_dir), f"{wheel}[{EXTRAS}]", *pins],
         f"downloading numpy/onnxruntime{'==' + ort_version if ort_version else ''} wheels for {platform}, "
         f"Python {python}",
         "; onnxruntime >= 1.17 needs manylinux_2_27 or newer: pass the board's glibc level (`ldd --version` "
         "on the board, e.g. 2.35 -> --platform manylinux_2_35_aarch64)")


def build_wheelhouse(out_dir: str | Path, platform: str = DEFAULT_PLATFORM, python: str = DEFAULT_PYTHON,
                     onnxruntime_version: str | None = None, source: str | Path | None = None,
                     build_isolation: bool = True) -> Wheelhouse:
    """Fill ``out_dir`` with the edgeprune wheel and the board's runtime wheels.

    Everything is first collected in a hidden directory inside ``out_dir`` and moved into
    place only when pip succeeded, so a failure leaves no partial wheelhouse behind.
    """
    root = find_source_tree(source)
    wanted, minimum = _python_tuple(python), _min_python(root)
    if minimum and wanted < minimum:
        raise ParameterError(f"edgeprune's wheel needs Python >= {minimum[0]}.{minimum[1]}, the board has {python}; "
                             f"benchmark such a board from a host with --device (the board only needs numpy "
                             f"and onnxruntime)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ParameterError(f"-o {out} is a file; give a directory")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=out))
    try:
        wheel = build_wheel(partial, root, build_isolation)
        _download(partial, wheel, platform, python, onnxruntime_version)
        for path in partial.iterdir():
            path.replace(out / path.name)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()   # failed before anything landed: leave no empty directory behind
    return Wheelhouse(directory=out, edgeprune_wheel=out / wheel.name, wheels=tuple(sorted(out.glob("*.whl"))),
                      platform=platform, python=python, onnxruntime_version=onnxruntime_version)
