"""List device profiles, show one, check that a board can run benchmarks, clean its cache.

Profiles are JSON files: the packaged ones (orangepi5, jetson-nano, local) and yours in
$EDGEPRUNE_CONFIG_DIR/devices/ (default ~/.config/edgeprune/devices/), which override
packaged ones of the same name. Any command also takes a path to a profile file.

examples:
  edgeprune devices                      # list profiles
  edgeprune devices show orangepi5       # the resolved profile as JSON
  edgeprune devices check orangepi5      # connect; report arch, python, onnxruntime, providers
  edgeprune devices clean orangepi5      # remove the model cache on the board
"""
from __future__ import annotations

import argparse
import dataclasses
import json

NAME = "devices"
HELP = "list device profiles; check a board (arch, python, onnxruntime, providers)"
ACTIONS = ("list", "show", "check", "clean")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=ACTIONS, default="list",
                        help="list (default), show NAME, check NAME, clean NAME")
    parser.add_argument("device", nargs="?", metavar="NAME", help="profile name or path to a profile .json")


def _list() -> int:
    """Every valid profile; each invalid file as one line on stderr, and exit 1 when there is one."""
    import sys

    from edgeprune.devices import user_profile_dir
    from edgeprune.devices.profile import scan_profiles

    profiles, problems = scan_profiles()
    for profile in profiles:
        print(profile.summary())
    print(f"(user profiles: {user_profile_dir()})")
    for problem in problems:
        print(f"edgeprune devices: skipped: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _show(name: str) -> int:
    from edgeprune.devices import load_profile

    data = dataclasses.asdict(load_profile(name))
    print(json.dumps(data, indent=2))
    return 0


def _check(name: str) -> int:
    from edgeprune.devices import load_profile
    from edgeprune.runners.probe import check_device

    report = check_device(load_profile(name))
    print(f"device {report.device}: {report.where}")
    for finding in report.findings:
        print(f"  {'ok ' if finding.ok else 'BAD'} {finding.item}: {finding.found}")
        if finding.fix:
            print(f"      fix: {finding.fix}")
    print("ready to benchmark" if report.ok else "not ready: apply the fixes above")
    return 0 if report.ok else 1


def _clean(name: str) -> int:
    from edgeprune.devices import load_profile
    from edgeprune.runners.ssh import SshRunner

    profile = load_profile(name)
    if not profile.is_remote:
        print(f"device {profile.name} runs on this machine: it has no remote cache")
        return 0
    with SshRunner(profile) as runner:
        removed = runner.clean_board()
        print(f"device {profile.name}: removed {removed} file(s) under {runner.workdir}")
    return 0


def run(args: argparse.Namespace) -> int:
    from edgeprune.errors import ParameterError

    if args.action == "list":
        if args.device:
            raise ParameterError(f"`edgeprune devices list` takes no name (got {args.device!r}); "
                                 f"use `edgeprune devices show {args.device}`")
        return _list()
    if not args.device:
        raise ParameterError(f"`edgeprune devices {args.action}` needs a device NAME; see `edgeprune devices`")
    return {"show": _show, "check": _check, "clean": _clean}[args.action](args.device)
