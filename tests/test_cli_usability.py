"""What a new user meets first: `devices` with one broken profile, `demo` arguments checked
before minutes of work, its defaults valid on every preset, and honest step labels."""
from __future__ import annotations

import json
import time

import pytest

from edgeprune.pipeline import DemoOptions, _steps, check_demo_options
from test_io_policy import one_line, run_cli


def test_devices_lists_the_valid_profiles_around_an_invalid_one(tmp_path, monkeypatch, capsys):
    devices = tmp_path / "config" / "devices"
    devices.mkdir(parents=True)
    monkeypatch.setenv("EDGEPRUNE_CONFIG_DIR", str(tmp_path / "config"))
    (devices / "lab.json").write_text(json.dumps({"transport": "ssh", "host": "lab-box"}))
    (devices / "broken.json").write_text("{not json")
    code, out, err = run_cli(capsys, "devices")
    assert code == 1
    names = [line.split()[0] for line in out.splitlines() if not line.startswith("(")]
    assert {"lab", "orangepi5", "jetson-nano", "local"} <= set(names) and "broken" not in names
    assert "skipped: device profile" in one_line(err) and "broken.json is not valid JSON" in err


@pytest.mark.parametrize("argv,needle", [
    (["--r", "99999"], "r=99999 must be smaller than the number of keys (4224)"),
    (["--n", "6"], "n must be in [1, 5] for this model"),
    (["--k", "500"], "k=500 exceeds the number of queries (428)"),
    (["--keep-queries", "429"], "--keep-queries must be in [0, 428]"),
    (["--repeats", "0"], "--repeats must be >= 1"),
])
def test_demo_checks_arguments_before_any_work(tmp_path, capsys, argv, needle):
    out = tmp_path / "demo"
    started = time.monotonic()
    code, stdout, err = run_cli(capsys, "demo", "--model", "streampetr-r50-704x256-light", "--out", out, *argv)
    assert code == 2 and stdout == "" and needle in one_line(err)
    assert time.monotonic() - started < 5 and not out.exists()          # nothing exported, nothing made


def test_demo_k_default_fits_every_preset():
    assert check_demo_options(DemoOptions(k=None)).k == 900                                    # the paper's row
    assert check_demo_options(DemoOptions(model="streampetr-r50-704x256-light", k=None)).k == 428


def test_demo_step_labels_count_the_steps_that_run():
    assert list(_steps(DemoOptions()).values()) == ["[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"]
    assert _steps(DemoOptions(keep_queries=0, fp16=False)) == {"export": "[1/3]", "tggbc": "[2/3]", "bench": "[3/3]"}


def test_garbage_key_file_is_blamed_before_touching_known_hosts(loopback_sshd, device_config, tmp_path, capsys):
    garbage = tmp_path / "id_garbage"
    garbage.write_text("this is not a key\n")
    profile = loopback_sshd.profile_dict(key_file=str(garbage), known_hosts=str(tmp_path / "kh"))
    (device_config / "devices" / "junk.json").write_text(json.dumps(profile))
    code, out, err = run_cli(capsys, "devices", "check", "junk")
    assert code == 2 and out == ""
    assert f"key_file {garbage} is not a private key" in one_line(err)
    assert not (tmp_path / "kh").exists()                        # no host key was added
