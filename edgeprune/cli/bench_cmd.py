"""Time ONNX models with ONNX Runtime on this machine or on a board, with honest statistics.

Several models are timed interleaved (m1, m2, m1, m2, ...) in one process, so drift of the
board (thermal throttling, other load) hits them alike, and each one's speedup against the
first is reported with a bootstrap confidence interval. Models rewritten by edgeprune also get
their FLOPs-ideal speedup (as `inspect` counts FLOPs) and measured / ideal.

examples:
  edgeprune bench model.onnx
  edgeprune bench base.onnx pruned.onnx --repeats 200 --json res.json --csv res.csv --plot res.png
  edgeprune bench decoder.onnx --precision both --profile
  edgeprune bench decoder.onnx --precision all --threads 1
  edgeprune bench model.onnx --device orangepi5 --threads 4 --time-budget 60
  edgeprune bench model.onnx --providers tensorrt,cuda,cpu --provider-option tensorrt:trt_fp16_enable=1
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from edgeprune.cli.args import add_input_arguments, add_timing_arguments, timing_repeats
from edgeprune.cli.progress import progress_bar
from edgeprune.errors import ParameterError

NAME = "bench"
HELP = "time ONNX models locally or on a board (statistics, speedups, profiles)"
DEFAULT_REPEATS = 50

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="MODEL.onnx", help="models; the first is the speedup baseline")
    parser.add_argument("--device", default="local", help="'local' or a device profile name/path (default: local)")
    parser.add_argument("--precision", choices=("fp32", "fp16", "int8", "int8-dynamic", "both", "all"), default=None,
                        help="convert fp32 models to fp16 / int8 (static, calibrated on the timing inputs: --inputs "
                             "or seeded random) / int8-dynamic; both = fp32+fp16, all = fp32+fp16+int8+int8-dynamic; "
                             "default: run the files as given")
    run = parser.add_argument_group("measurement")
    add_timing_arguments(run, warmup=5, repeats=DEFAULT_REPEATS, budget_lifts_repeats=True,
                         threads_default="device / ORT default")
    run.add_argument("--sequential", action="store_true", help="time models one after another, not interleaved")
    run.add_argument("--compare-anyway", action="store_true",
                     help="print speedups also between models whose inputs differ (by default: no ratio)")
    run.add_argument("--affinity", default=None, metavar="CPUS", help="pin to CPUs, e.g. 4-7 or 0,2 (Linux)")
    run.add_argument("--providers", default=None, metavar="LIST",
                     help="execution providers in priority order, e.g. tensorrt,cuda,cpu (default: device's, else cpu)")
    run.add_argument("--provider-option", action="append", default=[], metavar="[PROVIDER:]KEY=VALUE",
                     help="provider option (repeatable); without PROVIDER it applies to the first provider")
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument("--free-dim", action="append", default=[], metavar="NAME=V",
                        help="value of a free input dimension (repeatable); NAME is the dim name or INPUT:AXIS")
    add_input_arguments(inputs)
    out = parser.add_argument_group("output")
    out.add_argument("--profile", action="store_true", help="per-op profile by op type and decoder layer")
    out.add_argument("--profile-top", type=int, default=15, metavar="N", help="op types shown in the profile")
    out.add_argument("--json", default=None, metavar="F",
                     help="write everything (raw samples, environment) as JSON; - for stdout (the table then goes to stderr)")
    out.add_argument("--csv", default=None, metavar="F",
                     help="write every run as a CSV row with the environment; - for stdout")
    out.add_argument("--plot", default=None, metavar="F", help="write a PNG of the latency distributions")


def _key_value(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise ParameterError(f"{flag} {text!r} must look like KEY=VALUE")
    return key.strip(), value.strip()


def parse_free_dims(items: list[str]) -> dict[str, int]:
    dims = {}
    for item in items:
        key, value = _key_value(item, "--free-dim")
        try:
            dims[key] = int(value)
        except ValueError as exc:
            raise ParameterError(f"--free-dim {item!r}: {value!r} is not an integer") from exc
    return dims


def parse_affinity(text: str | None) -> tuple[int, ...] | None:
    """``"4-7,0"`` -> (0, 4, 5, 6, 7)."""
    if text is None:
        return None
    cpus: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            low, _, high = part.partition("-")
            cpus.update(range(int(low), int(high or low) + 1))
    except ValueError as exc:
        raise ParameterError(f"--affinity {text!r} must be CPU ids like 4-7 or 0,2,3") from exc
    if not cpus:
        raise ParameterError(f"--affinity {text!r} names no CPU")
    return tuple(sorted(cpus))


def parse_providers(text: str | None, options: list[str]) -> tuple[tuple[str, dict[str, str]], ...] | None:
    """``--providers`` and ``--provider-option`` -> ((name, {key: value}), ...) or None."""
    from edgeprune.runners.bench import provider_name

    if text is None and not options:
        return None
    names = [provider_name(p) for p in (text or "cpu").split(",") if p.strip()]
    opts: dict[str, dict[str, str]] = {n: {} for n in names}
    for item in options:
        target, _, kv = item.rpartition(":") if ":" in item.split("=", 1)[0] else ("", "", item)
        provider = provider_name(target) if target else names[0]
        if provider not in opts:
            raise ParameterError(f"--provider-option {item!r} is for {provider}, which is not in --providers "
                                 f"({', '.join(names)})")
        key, value = _key_value(kv, "--provider-option")
        opts[provider][key] = value
    return tuple((n, opts[n]) for n in names)


def _options(args: argparse.Namespace) -> Any:
    from edgeprune.runners.bench import BenchOptions

    if args.profile_top < 1:
        raise ParameterError(f"--profile-top must be >= 1 (got {args.profile_top}): it is how many op types "
                             "the profile shows")
    return BenchOptions(
        warmup=args.warmup, repeats=timing_repeats(args, DEFAULT_REPEATS), time_budget_s=args.time_budget,
        threads=args.threads,
        providers=parse_providers(args.providers, args.provider_option), affinity=parse_affinity(args.affinity),
        seed=args.seed, free_dims=parse_free_dims(args.free_dim), npz=args.inputs,
        interleave=not args.sequential, profile=args.profile, compare_anyway=args.compare_anyway,
    ).validate()


def _check_files(args: argparse.Namespace) -> Any:
    """The output policy (edgeprune.io): models, --inputs and a profile path are inputs;
    --json/--csv may be '-' (stdout)."""
    from edgeprune._lazy import require
    from edgeprune.devices.profile import looks_like_path
    from edgeprune.io import check_command_files

    device = args.device if looks_like_path(args.device) else None
    files = check_command_files({"MODEL.onnx": list(args.models), "--inputs": args.inputs, "--device": device},
                                {"--json": args.json, "--csv": args.csv, "--plot": args.plot},
                                stdout=("--json", "--csv"))
    if args.plot:
        require("matplotlib")
    return files


def _write_outputs(report: Any, args: argparse.Namespace) -> None:
    from edgeprune.runners import report as out

    for path, write in ((args.json, out.write_json), (args.csv, out.write_csv), (args.plot, out.write_plot)):
        if path:
            write(report, path)
            if path != "-":
                log.info("wrote %s", path)


def _print_profiles(report: Any, top: int, stream: Any) -> None:
    from edgeprune.runners.profile import format_profile

    for m in report.models:
        if m.profile_summary is not None:
            print(file=stream)
            print(format_profile(m.profile_summary, top=top), file=stream)


def run(args: argparse.Namespace) -> int:
    from edgeprune.runners.bench import benchmark
    from edgeprune.runners.report import format_table

    options = _options(args)
    files = _check_files(args)
    # A report sent to stdout ('-') keeps stdout machine-readable: the table goes to stderr.
    table_stream = sys.stderr if files.to_stdout("--json") or files.to_stdout("--csv") else sys.stdout
    with progress_bar() as progress:       # the total comes with each progress call
        report = benchmark(args.models, options, precision=args.precision, device=args.device, progress=progress)
    print(format_table(report), file=table_stream)
    for warning in report.warnings:
        log.warning("warning: %s", warning)
    if args.profile:
        _print_profiles(report, args.profile_top, table_stream)
    _write_outputs(report, args)
    return 0
