"""Decoder latency before and after the tgGBC pass, side by side (fp32, ONNX Runtime on this machine).

Builds a preset's decoder, exports it with edgeprune's exporter, rewrites it with
``--method tggbc`` (default: the paper's StreamPETR VoVNet 1600x640 setting, 24000 keys,
r=21000 n=2 k=175) and times both models with edgeprune's runners: runs interleaved
(A B A B ...), median with its 95 % interval per model, and the speedup with its paired
bootstrap interval. Also reports the rewrite time and the ideal speedup from FLOPs.
Writes ``<out>/tggbc_decoder-<preset>.json`` (the full bench report plus these figures)
and a ``.md`` summary.

    python benchmarks/bench_tggbc_decoder.py                  # full 6-layer decoder, minutes
    python benchmarks/bench_tggbc_decoder.py --quick          # smoke run: 2 layers, few repeats
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional

import _common as c            # puts the checkout on sys.path
from edgeprune.cli.args import add_key_count_arguments  # noqa: E402

log = logging.getLogger("bench_tggbc_decoder")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="streampetr-vov-1600x640")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's 6)")
    p.add_argument("--exporter", default="torchscript", choices=("torchscript", "dynamo"))
    p.add_argument("--batch", type=int, default=1)
    add_key_count_arguments(p, r=21000, n=2, k=175)
    c.add_timing_arguments(p)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 layers, 2 warm-up + 5 timed runs")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.warmup, args.repeats = args.layers or 2, 2, 5
        args.n = min(args.n, 1)
    return args


def export_pair(args: argparse.Namespace, work: Path) -> Dict[str, Any]:
    """Export the decoder and rewrite it with tgGBC; returns paths and timings."""
    from edgeprune.methods.tggbc import TgGBCConfig
    from edgeprune.passes.keys.tggbc import KeyPruningPass

    base, pruned = work / "decoder.onnx", work / "decoder-tggbc.onnx"
    _, exported = c.export_model(args.preset, "decoder", base, layers=args.layers, exporter=args.exporter,
                                 batch=args.batch)
    rewrite_s = c.timed_rewrite(base, pruned, [KeyPruningPass(TgGBCConfig(r=args.r, n=args.n, k=args.k))])
    return {"base": base, "pruned": pruned, "export_seconds": exported.seconds, "rewrite_seconds": rewrite_s}


def flops_estimate(path: Path, args: argparse.Namespace) -> Dict[str, Any]:
    from edgeprune.report.describe import describe_model

    est = describe_model(path, r=args.r, n=args.n, k=args.k).estimate
    return {"keys_per_layer": [layer.num_keys for layer in est.after.layers], "gflops_before": est.before.total / 1e9,
            "gflops_after": est.after.total / 1e9, "ideal_speedup": est.ideal_speedup}


def markdown(args: argparse.Namespace, facts: Dict[str, Any], rows: List[c.Row], pair: Dict[str, Any],
             flops: Dict[str, Any], warnings: List[str]) -> str:
    return "\n".join([
        f"# tgGBC decoder latency: {args.preset}, {args.layers or 6} layers, batch {args.batch}, {args.exporter}",
        "", f"command: `{facts['command']}`", "", c.machine_line(facts), "",
        f"r={args.r} n={args.n} k={args.k}; keys per layer {flops['keys_per_layer']}; fp32; {args.warmup} warm-up "
        "run(s) per model, then rounds of one run per model (unpruned, tgGBC).", "",
        *c.table(rows), *warnings, "",
        f"Ideal speedup from FLOPs {flops['ideal_speedup']:.2f}x ({flops['gflops_before']:.1f} -> "
        f"{flops['gflops_after']:.1f} GFLOPs); rewrite {pair['rewrite_seconds']:.2f} s; export "
        f"{pair['export_seconds']:.1f} s. Paper (desktop GPU, trained StreamPETR-VoVNet 1600x640, r=21000 n=2): "
        "decoder 64.93 -> 34.98 ms (-46.13%, 1.86x).", ""])


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    facts = dict(c.machine_facts(args.threads), command=c.command_line())
    with tempfile.TemporaryDirectory(prefix="bench-tggbc-") as tmp:
        pair = export_pair(args, Path(tmp))
        flops = flops_estimate(pair["base"], args)
        report = c.time_models([pair["base"], pair["pruned"]], warmup=args.warmup, repeats=args.repeats,
                               threads=args.threads, time_budget=args.time_budget)
        c.finish(facts)
    rows = c.rows(report, {"decoder": "unpruned", "decoder-tggbc": "tgGBC"}, {"decoder-tggbc": "decoder"})
    text = markdown(args, facts, rows, pair, flops, c.drift_warnings(report))
    result = {"benchmark": "tggbc_decoder", "args": vars(args), "machine": facts,
              "rewrite_seconds": pair["rewrite_seconds"], "export_seconds": pair["export_seconds"], "flops": flops,
              "speedup": asdict(rows[1].speedup), "report": report.to_dict()}
    c.write_results(args.out / f"tggbc_decoder-{args.preset}{'-quick' if args.quick else ''}", result, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
