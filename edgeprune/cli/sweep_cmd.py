"""Sweep pruning settings: rewrite, evaluate and time each one, then recommend the fastest within budget.

Every combination of --method x --r x --n x --k (tgGBC only) x --precision is rewritten from
MODEL.onnx (a whole-model export, input 'images'), scored on --data with `eval`'s nuScenes
metrics (on this machine, ONNX Runtime CPU) and timed on --device interleaved with the
unpruned baseline, which the sweep always includes. Writes OUT/table.{md,csv,json} and
OUT/pareto.png (latency vs mAP, Pareto front) and prints the recommended setting: the
fastest whose mAP is at most --max-map-drop points below the baseline's (tgGBC's rule).

Resumable: OUT keeps every finished setting; running the same command again (or with more
values) runs only the settings not yet finished. Several --device boards of one kind share the
work, one setting per board at a time.

--r takes key counts or percentages of the model's keys (50%); --k takes counts or 'all'.

examples:
  edgeprune sweep full.onnx --data scenes-test --r 25%,50%,75% --n 1,2 --k 175 --out sweep-demo
  edgeprune sweep full.onnx --data scenes-test --r 50% --n 2 --k all --method tggbc,random,tome \\
      --precision fp32,fp16 --device orangepi5 --device orangepi5-b --out sweep-boards
"""
from __future__ import annotations

import argparse

NAME = "sweep"
HELP = "rewrite, evaluate and time a grid of pruning settings; recommend the fastest within an mAP budget"

DEFAULT_METHODS = "tggbc"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from edgeprune.cli.args import add_timing_arguments

    parser.add_argument("model", metavar="MODEL.onnx", help="whole-model ONNX export (input 'images')")
    parser.add_argument("--data", required=True, metavar="DIR", help="dataset directory (edgeprune dataset synth)")
    parser.add_argument("--out", required=True, metavar="DIR", help="results directory (created; resumed if it exists)")
    grid = parser.add_argument_group("the grid (comma-separated lists)")
    grid.add_argument("--r", required=True, metavar="LIST", help="keys pruned in total: counts or percentages, e.g. 25%%,50%%,528")
    grid.add_argument("--n", default="1", metavar="LIST", help="pruning layers (default 1)")
    grid.add_argument("--k", default="all", metavar="LIST", help="tgGBC top queries, 'all' = every query (default all)")
    grid.add_argument("--method", default=DEFAULT_METHODS, metavar="LIST",
                      help=f"key-reduction methods: {', '.join(key_methods())} (default {DEFAULT_METHODS})")
    grid.add_argument("--precision", default="fp32", metavar="LIST", help="fp32, fp16, int8-dynamic (default fp32; static int8 needs calibration: "
                      "rewrite with --precision int8 --data DIR and bench it)")
    grid.add_argument("--seed", type=int, default=0, help="random pruning's subset seed (default 0)")
    parser.add_argument("--max-map-drop", type=float, default=1.0, metavar="P",
                        help="mAP points (0.01 mAP) a recommended setting may lose (default 1, tgGBC's rule)")
    parser.add_argument("--device", action="append", default=None, metavar="D",
                        help="where to time: local (default) or a device profile; repeat for boards of one kind "
                             "that share the work")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N scenes only")
    add_timing_arguments(parser.add_argument_group("timing (per setting, interleaved with the baseline)"),
                         warmup=2, repeats=10, threads_default="the device profile's")


def key_methods() -> list[str]:
    """The registry's key-reduction methods (what --method offers)."""
    from edgeprune.passes import registry
    from edgeprune.passes.keys.feed import KeyReductionPass

    return [m for m in registry.method_names() if issubclass(registry.get_method(m), KeyReductionPass)]


def run(args: argparse.Namespace) -> int:
    from edgeprune.cli.progress import progress_bar
    from edgeprune.errors import ParameterError
    from edgeprune.io import check_command_files
    from edgeprune.passes import registry
    from edgeprune.runners.bench import BenchOptions
    from edgeprune.sweep import settings as st
    from edgeprune.sweep.run import SweepOptions, check_data, check_devices, run_sweep
    from edgeprune.sweep.store import SweepStore
    from edgeprune.sweep.table import build_table, format_markdown, recommendation_line, write_outputs

    check_command_files({"MODEL.onnx": args.model}, {})
    if args.max_map_drop < 0 or (args.limit is not None and args.limit < 1) or args.seed < 0:
        raise ParameterError("--max-map-drop and --seed must be >= 0 and --limit >= 1 "
                             f"(got {args.max_map_drop:g}, {args.seed}, {args.limit})")
    SweepStore.check_out(args.out)
    methods = st.parse_names(args.method, "--method", key_methods())
    # a sweep has no calibration data to give: only the precisions that need none
    precisions = st.parse_names(args.precision, "--precision", registry.precision_names(calibrated=False))
    ns, ks = st.parse_n(args.n), st.parse_k(args.k)
    check_devices(args.device or ["local"])
    size = st.decoder_size(args.model)
    grid = st.build_grid(methods, st.parse_r(args.r, size.num_keys), ns, ks, precisions, args.seed)
    st.check_grid(grid, size)
    check_data(args.model, args.data)
    timing = BenchOptions(warmup=args.warmup, repeats=args.repeats, time_budget_s=args.time_budget,
                          threads=args.threads).validate()
    options = SweepOptions(args.data, timing, args.limit)
    print(f"sweep: {len(grid)} settings ({size.num_keys} keys, {size.num_layers} layers, {size.num_queries} queries) "
          f"on {', '.join(args.device or ['local'])} -> {args.out}")
    with progress_bar(len(grid), unit="setting") as progress:
        store = run_sweep(args.model, grid, args.out, options, args.device or ["local"], progress)
    table = build_table(store, grid, args.max_map_drop)
    paths = write_outputs(table, store.root)
    print(format_markdown(table), end="")
    print(recommendation_line(table))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
