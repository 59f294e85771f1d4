"""The shared timing options (edgeprune/cli/args.py) parse alike in every command that uses them."""
from __future__ import annotations

import argparse

import pytest

from edgeprune.cli.args import BUDGET_REPEATS, add_timing_arguments, timing_repeats
from edgeprune.cli.main import build_parser


@pytest.mark.parametrize("command", [["bench", "m.onnx"], ["demo"]])
def test_bench_and_demo_share_the_timing_options(command):
    args = build_parser().parse_args([*command, "--warmup", "2", "--repeats", "7", "--threads", "3"])
    assert (args.warmup, args.repeats, args.threads) == (2, 7, 3)


def test_command_defaults_stay_as_they_were():
    bench = build_parser().parse_args(["bench", "m.onnx"])
    demo = build_parser().parse_args(["demo"])
    assert (bench.warmup, timing_repeats(bench, 50), bench.time_budget, bench.threads) == (5, 50, None, None)
    assert (demo.warmup, demo.repeats, demo.threads) == (3, 30, None) and not hasattr(demo, "time_budget")


def test_a_time_budget_lifts_the_default_repeats_only_where_asked():
    bench = build_parser().parse_args(["bench", "m.onnx", "--time-budget", "5"])
    assert bench.time_budget == 5.0 and timing_repeats(bench, 50) == BUDGET_REPEATS
    assert timing_repeats(build_parser().parse_args(["bench", "m.onnx", "--time-budget", "5", "--repeats", "9"]),
                          50) == 9
    scripts = argparse.ArgumentParser()
    add_timing_arguments(scripts, warmup=3, repeats=30)      # what benchmarks/_common.py adds
    args = scripts.parse_args(["--time-budget", "5"])
    assert (args.warmup, args.repeats, args.time_budget) == (3, 30, 5.0)


def test_a_group_takes_the_options_too():
    parser = argparse.ArgumentParser()
    add_timing_arguments(parser.add_argument_group("measurement"), time_budget=False)
    assert vars(parser.parse_args([])) == {"warmup": 5, "repeats": 50, "threads": None}
    with pytest.raises(SystemExit):
        parser.parse_args(["--time-budget", "1"])
