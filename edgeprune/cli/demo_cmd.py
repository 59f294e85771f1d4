"""Run the whole pipeline with built-in defaults and print one table.

Exports the StreamPETR R50 704x256 decoder (4224 keys, 644 + 256 queries, seeded random
weights), validates it against PyTorch, prunes keys with tgGBC (the paper's r=2000 n=1 k=900
row), shrinks queries 900 -> 300 with GPQ (one-shot ranking: fine-tuning is better, see the
GPQ paper), converts to fp16, and benchmarks every model interleaved on this machine with
ONNX Runtime. Files go to --out (default ./edgeprune-demo). About 2-4 minutes on 2 cores.

examples:
  edgeprune demo
  edgeprune demo --model petr-r50-800x320 --r 3000 --k 175 --repeats 20
"""
from __future__ import annotations

import argparse
from pathlib import Path

from edgeprune.cli.args import add_key_count_arguments, add_timing_arguments
from edgeprune.cli.progress import progress_bar

NAME = "demo"
HELP = "export + prune + benchmark a default model on this machine and print a table"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="streampetr-r50-704x256", help="preset (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("edgeprune-demo"), help="output directory")
    parser.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's 6)")
    add_key_count_arguments(parser.add_argument_group("tgGBC"), r=2000, n=1, k=None,
                            k_default="default: the preset's queries, at most 900")
    parser.add_argument("--keep-queries", type=int, default=300, help="GPQ: queries kept (0 skips GPQ)")
    parser.add_argument("--no-fp16", action="store_true", help="skip the fp16 variants")
    add_timing_arguments(parser.add_argument_group("measurement"), warmup=3, repeats=30, time_budget=False)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from edgeprune.pipeline import DemoOptions, format_demo, run_demo

    opts = DemoOptions(model=args.model, out_dir=args.out, exporter=args.exporter, layers=args.layers, r=args.r, n=args.n,
                       k=args.k, keep_queries=args.keep_queries, fp16=not args.no_fp16, warmup=args.warmup,
                       repeats=args.repeats, threads=args.threads, seed=args.seed)
    with progress_bar() as progress:
        result = run_demo(opts, progress=progress)
    print(format_demo(result))
    return 0
