"""Collect edgeprune's wheel and a board's runtime wheels into a directory for offline install.

Builds edgeprune-<version>-py3-none-any.whl from this checkout and downloads numpy,
onnxruntime and tqdm (plus their dependencies) as binary wheels for the board's platform
and Python. --platform is the board's glibc level (`ldd --version` on the board: glibc 2.35
-> manylinux_2_35_aarch64); older compatible tags are included. manylinux2014_aarch64
(glibc 2.17) limits onnxruntime to 1.16.3.

examples:
  edgeprune wheelhouse -o wheels --python 3.10
  edgeprune wheelhouse -o wheels --platform manylinux_2_35_aarch64 --python 3.10 --onnxruntime-version 1.22.0
  scp -r wheels orangepi5: && ssh orangepi5 python3 -m pip install --no-index --find-links wheels 'edgeprune[runtime,progress]'
"""
from __future__ import annotations

import argparse

NAME = "wheelhouse"
HELP = "edgeprune wheel + numpy/onnxruntime wheels for an offline ARM board"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from edgeprune.devices.wheelhouse import DEFAULT_PLATFORM, DEFAULT_PYTHON

    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="directory to fill (created)")
    parser.add_argument("--platform", default=DEFAULT_PLATFORM,
                        help=f"board platform tag (default {DEFAULT_PLATFORM}); e.g. manylinux2014_aarch64")
    parser.add_argument("--python", default=DEFAULT_PYTHON, metavar="X.Y",
                        help=f"board's Python version (default {DEFAULT_PYTHON})")
    parser.add_argument("--onnxruntime-version", default=None, metavar="V",
                        help="pin onnxruntime (default: newest with a wheel for the platform)")
    parser.add_argument("--source", default=None, metavar="DIR", help="edgeprune checkout (default: this one)")
    parser.add_argument("--no-build-isolation", action="store_true",
                        help="build the wheel with this environment's setuptools (offline, faster)")


def run(args: argparse.Namespace) -> int:
    from edgeprune.devices.wheelhouse import build_wheelhouse

    house = build_wheelhouse(args.output, platform=args.platform, python=args.python,
                             onnxruntime_version=args.onnxruntime_version, source=args.source,
                             build_isolation=not args.no_build_isolation)
    for wheel in house.wheels:
        print(wheel.name)
    print(f"\n{len(house.wheels)} wheels in {house.directory} for {house.platform}, Python {house.python}.")
    print(f"Copy {house.directory} to the board (e.g. scp -r {house.directory} BOARD:) and run there:")
    print(f"  {house.install_command()}")
    return 0
