"""Device profiles: where and how a benchmark runs, as data (one JSON file per device).

A profile says how to reach a board (an SSH config alias, or host/user/port/key), which
Python runs the board agent there, and the measurement defaults of that board: execution
providers with their options, ORT threads and CPU affinity (e.g. the four Cortex-A76 big
cores 4-7 of an RK3588), and the number formats the board runs well with those providers
(``precisions``, best first: int8 on the OrangePi 5's Cortex-A76 CPU with its dot-product
instructions, fp16 on the Jetson's GPU; ``devices check`` compares them with what the board's
CPU and ONNX Runtime offer). Adding a board means adding a file, not code.

Lookup order for a name (first hit wins, so a user file overrides a packaged one):

1. ``$EDGEPRUNE_CONFIG_DIR/devices/NAME.json`` when ``EDGEPRUNE_CONFIG_DIR`` is set, else
   ``${XDG_CONFIG_HOME:-~/.config}/edgeprune/devices/NAME.json``;
2. the packaged ``edgeprune/devices/profiles/NAME.json`` (``orangepi5``, ``jetson-nano``,
   ``local``).

Anything that looks like a path (contains ``/`` or ends in ``.json``) is read as a file.

File format (every key but ``transport`` optional; ``name`` defaults to the file stem)::

    {"name": "orangepi5", "description": "...", "transport": "ssh",
     "host": "orangepi5", "user": null, "port": null, "key_file": null,
     "ssh_config": null, "known_hosts": null, "host_key_check": "accept-new",
     "python": "python3", "providers": [["CPUExecutionProvider", {}]],
     "threads": 4, "affinity": [4, 5, 6, 7], "workdir": "~/.cache/edgeprune",
     "precisions": ["int8", "fp32"],
     "connect_timeout_s": 10, "command_timeout_s": 900}
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from edgeprune.errors import DeviceError, InputFileError
from edgeprune.io import check_input_file

TRANSPORTS = ("local", "ssh")
HOST_KEY_CHECKS = ("yes", "accept-new", "no")   # as OpenSSH's StrictHostKeyChecking
PACKAGED_DIR = Path(__file__).resolve().parent / "profiles"
MAX_PROFILE_BYTES = 1 << 20     # a profile is a few hundred bytes; anything near this is the wrong file

Providers = tuple[tuple[str, Mapping[str, str]], ...]


@dataclass(frozen=True)
class DeviceProfile:
    """One device, as read from its JSON file. ``None`` means "not set": for SSH fields the
    value then comes from the SSH config (or paramiko's defaults), for threads/affinity from
    ONNX Runtime's defaults."""

    name: str
    transport: str = "local"
    description: str = ""
    host: str | None = None             # host name, IP, or Host alias of the SSH config
    user: str | None = None
    port: int | None = None
    key_file: str | None = None         # private key; None: SSH config IdentityFile, agent, ~/.ssh/id_*
    ssh_config: str | None = None       # OpenSSH client config file; None: ~/.ssh/config if it exists
    known_hosts: str | None = None      # None: ~/.ssh/known_hosts
    host_key_check: str = "accept-new"  # yes | accept-new | no
    python: str | None = None           # board interpreter (None: "python3"); for local profiles only
                                        # `devices check` uses it: bench runs local models in-process
    providers: Providers = (("CPUExecutionProvider", {}),)
    threads: int | None = None
    affinity: tuple[int, ...] | None = None
    workdir: str = "~/.cache/edgeprune"  # on the board; "~/" is the login user's home
    connect_timeout_s: float = 10.0
    command_timeout_s: float = 900.0
    precisions: tuple[str, ...] | None = None   # formats the board runs well, best first; None: not known
    source: str = field(default="", compare=False)  # file the profile was read from

    @property
    def is_remote(self) -> bool:
        return self.transport == "ssh"

    def destination(self) -> str:
        """``user@host:port`` as configured (before SSH config resolution), for messages."""
        text = self.host or "?"
        if self.user:
            text = f"{self.user}@{text}"
        return f"{text}:{self.port}" if self.port else text

    def summary(self) -> str:
        """One line for ``edgeprune devices``."""
        where = self.destination() if self.is_remote else "this machine"
        providers = ",".join(name.replace("ExecutionProvider", "") for name, _ in self.providers)
        extras = [f"providers {providers}"]
        if self.threads is not None:
            extras.append(f"{self.threads} threads")
        if self.affinity is not None:
            extras.append("cpus " + ",".join(str(c) for c in self.affinity))
        if self.precisions is not None:
            extras.append("runs well: " + ",".join(self.precisions))
        return f"{self.name:<14} {self.transport:<5} {where:<28} {'; '.join(extras)}"

    def request_defaults(self) -> dict[str, Any]:
        """The agent request keys this profile sets (providers, threads, affinity)."""
        return {"providers": [[name, dict(opts)] for name, opts in self.providers],
                "threads": self.threads,
                "affinity": list(self.affinity) if self.affinity is not None else None}


# ---------------------------------------------------------------- parsing

_FIELDS = {name for name in DeviceProfile.__dataclass_fields__ if name != "source"}


def _fail(source: str, message: str) -> DeviceError:
    return DeviceError(f"device profile {source}: {message}")


def _opt_str(raw: dict[str, Any], key: str, source: str) -> str | None:
    value = raw.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise _fail(source, f"'{key}' must be a non-empty string or null, got {value!r}")
    return value


def _opt_int(raw: dict[str, Any], key: str, source: str, low: int, high: int | None = None) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
        bound = f"{low}..{high}" if high else f">= {low}"
        raise _fail(source, f"'{key}' must be an integer {bound} or null, got {value!r}")
    return value


def _timeout(raw: dict[str, Any], key: str, source: str) -> float:
    value = raw.get(key, DeviceProfile.__dataclass_fields__[key].default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise _fail(source, f"'{key}' must be a number of seconds > 0, got {value!r}")
    return float(value)


def _providers(raw: dict[str, Any], source: str) -> Providers:
    """``[["CUDAExecutionProvider", {"device_id": 0}], "CPUExecutionProvider"]`` -> tuples."""
    value = raw.get("providers", [["CPUExecutionProvider", {}]])
    if not isinstance(value, list) or not value:
        raise _fail(source, f"'providers' must be a non-empty list of [name, {{options}}], got {value!r}")
    out = []
    for item in value:
        if isinstance(item, str):
            item = [item, {}]
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], dict)):
            raise _fail(source, f"each provider must be [name, {{options}}], got {item!r}")
        out.append((item[0], {str(k): str(v) for k, v in item[1].items()}))
    return tuple(out)


def _affinity(raw: dict[str, Any], source: str) -> tuple[int, ...] | None:
    value = raw.get("affinity")
    if value is None:
        return None
    if (not isinstance(value, list) or not value
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in value)):
        raise _fail(source, f"'affinity' must be a non-empty list of CPU ids (e.g. [4, 5, 6, 7]) or null, "
                            f"got {value!r}")
    return tuple(sorted(set(value)))


PRECISIONS = ("fp32", "fp16", "int8", "int8-dynamic")   # the values rewrite/bench --precision convert to


def _precisions(raw: dict[str, Any], source: str) -> tuple[str, ...] | None:
    value = raw.get("precisions")
    if value is None:
        return None
    if not isinstance(value, list) or not value or any(p not in PRECISIONS for p in value):
        raise _fail(source, f"'precisions' must be a non-empty list of {', '.join(PRECISIONS)} (best first) or null, "
                            f"got {value!r}")
    return tuple(value)


def _choice(raw: dict[str, Any], key: str, choices: tuple[str, ...], default: str, source: str) -> str:
    value = raw.get(key, default)
    if value not in choices:
        raise _fail(source, f"'{key}' is {value!r}; choose one of {', '.join(choices)}")
    return value


def profile_from_dict(raw: Any, source: str, default_name: str) -> DeviceProfile:
    """Validate one parsed profile file; every problem is a one-line DeviceError."""
    if not isinstance(raw, dict):
        raise _fail(source, f"must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise _fail(source, f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_FIELDS))}")
    if "transport" not in raw:       # a board profile without it would time this machine, labelled as the board
        raise _fail(source, "has no 'transport'; add \"transport\": \"ssh\" (with \"host\") for a board, "
                            "or \"transport\": \"local\" for this machine")
    transport = _choice(raw, "transport", TRANSPORTS, "local", source)
    host = _opt_str(raw, "host", source)
    if transport == "ssh" and host is None:
        raise _fail(source, "transport 'ssh' needs a 'host' (a host name, IP or SSH config alias)")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise _fail(source, "'description' must be a string")
    return DeviceProfile(
        name=_opt_str(raw, "name", source) or default_name, transport=transport, description=description,
        host=host, user=_opt_str(raw, "user", source), port=_opt_int(raw, "port", source, 1, 65535),
        key_file=_opt_str(raw, "key_file", source), ssh_config=_opt_str(raw, "ssh_config", source),
        known_hosts=_opt_str(raw, "known_hosts", source),
        host_key_check=_choice(raw, "host_key_check", HOST_KEY_CHECKS, "accept-new", source),
        python=_opt_str(raw, "python", source), providers=_providers(raw, source),
        threads=_opt_int(raw, "threads", source, 0), affinity=_affinity(raw, source),
        workdir=_opt_str(raw, "workdir", source) or DeviceProfile.workdir,
        connect_timeout_s=_timeout(raw, "connect_timeout_s", source),
        command_timeout_s=_timeout(raw, "command_timeout_s", source),
        precisions=_precisions(raw, source), source=source,
    )


def read_profile(path: str | os.PathLike) -> DeviceProfile:
    """Read and validate one profile file."""
    path = Path(path).expanduser()
    try:
        check_input_file(path, "device profile", max_bytes=MAX_PROFILE_BYTES)
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DeviceError(f"device profile file {path} does not exist; give an existing .json file "
                          f"or a profile name (see `edgeprune devices`)") from exc
    except (OSError, UnicodeDecodeError, InputFileError) as exc:
        raise DeviceError(f"cannot read device profile {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise DeviceError(f"device profile {path} is not valid JSON: {exc}") from exc
    return profile_from_dict(raw, str(path), path.stem)


# ---------------------------------------------------------------- lookup


def user_profile_dir() -> Path:
    """Directory of the user's profiles (see the module docstring)."""
    base = os.environ.get("EDGEPRUNE_CONFIG_DIR")
    if base:
        return Path(base).expanduser() / "devices"
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(xdg).expanduser() / "edgeprune" / "devices"


def _profile_files() -> dict[str, Path]:
    """name -> file, packaged first so that user files override them."""
    files: dict[str, Path] = {}
    for directory in (PACKAGED_DIR, user_profile_dir()):
        if directory.is_dir():
            for path in sorted(directory.glob("*.json")):
                files[path.stem] = path
    return files


def _read_named(path: Path) -> DeviceProfile:
    """A profile from a profile directory, where the file name is the profile's name."""
    profile = read_profile(path)
    if profile.name != path.stem:
        raise DeviceError(f"device profile {path}: 'name' is {profile.name!r} but the file is named "
                          f"{path.stem!r}; rename the file to {profile.name}.json or drop 'name'")
    return profile


def list_profiles() -> list[DeviceProfile]:
    """Every known profile (user files override packaged ones of the same name), by name;
    the first invalid one raises (see :func:`scan_profiles` to list around it)."""
    return [_read_named(path) for _, path in sorted(_profile_files().items())]


def scan_profiles() -> tuple[list[DeviceProfile], list[DeviceError]]:
    """(valid profiles, one error per invalid file): one broken user file must not hide the rest."""
    good: list[DeviceProfile] = []
    bad: list[DeviceError] = []
    for _, path in sorted(_profile_files().items()):
        try:
            good.append(_read_named(path))
        except DeviceError as exc:
            bad.append(exc)
    return good, bad


def looks_like_path(text: str) -> bool:
    """A ``--device`` value naming a profile file rather than a profile name."""
    return os.sep in text or "/" in text or text.endswith(".json")


def load_profile(name_or_path: str | os.PathLike | DeviceProfile) -> DeviceProfile:
    """A profile by name (user dir, then packaged) or by path to a JSON file."""
    if isinstance(name_or_path, DeviceProfile):
        return name_or_path
    text = os.fspath(name_or_path)
    if looks_like_path(text):
        return read_profile(text)
    files = _profile_files()
    if text not in files:
        raise DeviceError(f"unknown device {text!r}; known: {', '.join(sorted(files)) or 'none'}; "
                          f"add {user_profile_dir() / (text + '.json')} or pass a profile file path")
    return _read_named(files[text])
