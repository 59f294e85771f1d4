"""Device profiles: packaged files, user overrides, validation, `edgeprune devices`, get_runner."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeprune.cli import main as cli_main
from edgeprune.devices import list_profiles, load_profile
from edgeprune.devices.profile import PACKAGED_DIR, DeviceProfile
from edgeprune.devices.wheelhouse import platform_tags
from edgeprune.errors import DeviceError
from edgeprune.runners import get_runner


def test_packaged_profiles(device_config):
    profiles = {p.name: p for p in list_profiles()}
    assert {"orangepi5", "jetson-nano", "local"} <= set(profiles)
    opi = profiles["orangepi5"]
    assert opi.transport == "ssh" and opi.affinity == (4, 5, 6, 7) and opi.threads == 4
    assert opi.providers == (("CPUExecutionProvider", {}),)
    jetson = profiles["jetson-nano"]
    assert [name for name, _ in jetson.providers] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert jetson.python == "python3" and jetson.command_timeout_s > opi.command_timeout_s
    assert profiles["local"].transport == "local" and not profiles["local"].is_remote
    assert opi.precisions == ("int8", "fp32") and jetson.precisions == ("fp16", "fp32")
    assert profiles["local"].precisions is None
    assert all(p.source.startswith(str(PACKAGED_DIR)) for p in profiles.values())


def test_user_profile_overrides_packaged_and_paths_load(device_config, tmp_path):
    (device_config / "devices" / "orangepi5.json").write_text(json.dumps(
        {"transport": "ssh", "host": "10.0.0.7", "user": "orangepi", "port": 2222, "threads": 2}))
    opi = load_profile("orangepi5")
    assert (opi.host, opi.user, opi.port, opi.threads, opi.affinity) == ("10.0.0.7", "orangepi", 2222, 2, None)
    assert opi.destination() == "orangepi@10.0.0.7:2222"
    path = tmp_path / "my-board.json"
    path.write_text(json.dumps({"transport": "local", "threads": 3}))
    by_path = load_profile(str(path))
    assert by_path.name == "my-board" and by_path.threads == 3 and by_path.source == str(path)
    assert load_profile(by_path) is by_path


@pytest.mark.parametrize("content, needle", [
    ({"transport": "ssh"}, "needs a 'host'"),
    ({"transport": "telnet"}, "choose one of local, ssh"),
    ({"transport": "local", "hostname": "x"}, "unknown key(s) hostname"),
    ({"transport": "local", "affinity": [4, "5"]}, "'affinity'"),
    ({"transport": "local", "port": 70000}, "'port' must be an integer 1..65535"),
    ({"transport": "local", "threads": -1}, "'threads'"),
    ({"transport": "local", "providers": []}, "'providers'"),
    ({"transport": "local", "command_timeout_s": 0}, "'command_timeout_s'"),
    ({"transport": "local", "host_key_check": "maybe"}, "'host_key_check'"),
    ({"transport": "local", "name": "other"}, "rename the file"),
    ({"transport": "local", "precisions": ["int4"]}, "'precisions'"),
    ("[1, 2", "not valid JSON"),
])
def test_bad_profiles_are_one_line_device_errors(device_config, content, needle):
    path = device_config / "devices" / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DeviceError) as info:
        load_profile("bad")
    assert needle in str(info.value) and "\n" not in str(info.value) and str(path) in str(info.value)


def test_unknown_device_lists_known_ones(device_config):
    with pytest.raises(DeviceError, match="unknown device 'nope'; known: .*jetson-nano, local, orangepi5"):
        load_profile("nope")
    with pytest.raises(DeviceError, match="does not exist"):
        load_profile("/no/such/profile.json")


def test_get_runner_picks_the_transport(device_config):
    from edgeprune.runners.local import LocalRunner
    from edgeprune.runners.ssh import SshRunner

    local = get_runner("local")
    assert isinstance(local, LocalRunner) and local.profile.name == "local"
    remote = get_runner("orangepi5")
    assert isinstance(remote, SshRunner) and remote.profile.affinity == (4, 5, 6, 7) and not remote.is_active
    assert remote.profile.request_defaults() == {"providers": [["CPUExecutionProvider", {}]], "threads": 4,
                                                 "affinity": [4, 5, 6, 7]}


def test_devices_command_lists_and_shows(device_config, capsys):
    (device_config / "devices" / "lab.json").write_text(json.dumps({"transport": "ssh", "host": "lab-box"}))
    assert cli_main.main(["devices"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines() if not line.startswith("(")]
    assert names == sorted(names) and {"lab", "orangepi5", "jetson-nano", "local"} <= set(names)
    assert str(device_config / "devices") in out
    assert cli_main.main(["devices", "show", "lab"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["host"] == "lab-box" and shown["transport"] == "ssh" and shown["workdir"] == DeviceProfile.workdir


def test_devices_check_local(device_config, capsys):
    """The local profile's python is this interpreter: everything is present."""
    import platform

    import onnxruntime

    assert cli_main.main(["devices", "check", "local"]) == 0
    out = capsys.readouterr().out
    rows = {line.split(":")[0].strip(): line for line in out.splitlines() if line.startswith("  ")}
    assert rows["ok  python"].split(": ")[1].startswith(platform.python_version())
    assert rows["ok  onnxruntime"].endswith(onnxruntime.__version__)
    assert platform.machine() in rows["ok  board"] and "ready to benchmark" in out
    flags = Path("/proc/cpuinfo").read_text().split()
    support = rows["ok  int8/fp16 support"]                    # read from this CPU's /proc/cpuinfo flags
    assert ("GEMMs on" in support) == any(f in flags for f in ("avx512_vnni", "avx_vnni", "asimddp"))


@pytest.mark.parametrize("flags, providers, verdicts", [
    (["asimddp", "asimdhp"], ["CPUExecutionProvider"], {"precision int8": None, "precision fp16": False}),
    (["avx2"], ["CPUExecutionProvider"], {"precision int8": False, "precision fp16": False}),
    ([], ["CUDAExecutionProvider", "CPUExecutionProvider"], {"precision int8": False, "precision fp16": None}),
])
def test_devices_check_compares_precisions_with_the_cpu(flags, providers, verdicts):
    """A board profile listing int8 and fp16: the probe's CPU flags and providers decide each."""
    from edgeprune.devices.check import findings_for

    profile = DeviceProfile("b", precisions=("int8", "fp16"))
    info = {"machine": "aarch64", "system": "Linux", "python": "3.10.12", "executable": "python3",
            "numpy": "1.26", "onnxruntime": "1.22.0", "providers": providers, "cpu_flags": flags}
    found = {f.item: f for f in findings_for(profile, info, (3, 6))}
    assert found["int8/fp16 support"].ok
    for item, ok in verdicts.items():
        assert (found[item].ok if item in found else None) is ok, found.get(item)


def test_devices_check_names_the_fix_for_a_python_without_onnxruntime(device_config, tmp_path, capsys):
    """A venv without site packages stands for a board python lacking numpy and onnxruntime."""
    import subprocess
    import venv

    env_dir = tmp_path / "bare"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    version = subprocess.run([str(python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    profile = tmp_path / "bare.json"
    profile.write_text(json.dumps({"transport": "local", "python": str(python)}))
    assert cli_main.main(["devices", "check", str(profile)]) == 1
    out = capsys.readouterr().out
    fixes = [line.split("fix: ")[1] for line in out.splitlines() if "fix: " in line]
    expected_ort = {"3.8": "1.19.2", "3.9": "1.19.2"}.get(version, "1.22.0")
    assert fixes == [f"{python} -m pip install numpy", f"{python} -m pip install onnxruntime=={expected_ort}"]
    assert "not ready" in out


@pytest.mark.parametrize("argv, needle", [
    (["devices", "check"], "needs a device NAME"),
    (["devices", "check", "no-such"], "unknown device 'no-such'"),
    (["devices", "list", "x"], "takes no name"),
])
def test_devices_command_errors(device_config, capsys, argv, needle):
    assert cli_main.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_platform_tags_expand_to_older_glibc():
    tags = platform_tags("manylinux_2_28_aarch64")
    assert tags[0] == "manylinux_2_28_aarch64" and tags[-1] == "manylinux2014_aarch64"
    assert "manylinux_2_17_aarch64" in tags and "manylinux_2_16_aarch64" not in tags and len(tags) == 13
    assert platform_tags("manylinux2014_aarch64") == ["manylinux_2_17_aarch64", "manylinux2014_aarch64"]
    assert "manylinux1_x86_64" in platform_tags("manylinux_2_17_x86_64")
    assert platform_tags("linux_armv7l") == ["linux_armv7l"]


def _old_python(version: str) -> str | None:
    """An installed python<version> that actually starts (pyenv shims may not)."""
    import glob
    import shutil
    import subprocess

    candidates = sorted(glob.glob(str(Path.home() / ".pyenv" / "versions" / f"{version}.*" / "bin" / f"python{version}")))
    candidates += [p for p in (shutil.which(f"python{version}"),) if p]
    for path in candidates:
        if subprocess.run([path, "-c", "pass"], capture_output=True).returncode == 0:
            return path
    return None


@pytest.mark.parametrize("version, verdict", [
    ("2.7", "BAD python: 2.7"),
    ("3.6", "-m pip install onnxruntime==1.10.0"),   # newest onnxruntime wheel for Python 3.6
])
def test_devices_check_with_old_pythons(device_config, tmp_path, capsys, version, verdict):
    """The probe must answer even on a Python the agent cannot run on (skipped if none installed)."""
    python = _old_python(version)
    if python is None:
        pytest.skip(f"no python{version} on this machine")
    profile = tmp_path / "old.json"
    profile.write_text(json.dumps({"transport": "local", "python": python}))
    assert cli_main.main(["devices", "check", str(profile)]) == 1
    out = capsys.readouterr().out
    assert verdict in out and "not ready" in out
