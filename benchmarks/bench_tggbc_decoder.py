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
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # run from a checkout

from edgeprune.io import atomic_path  # noqa: E402

log = logging.getLogger("bench_tggbc_decoder")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="streampetr-vov-1600x640")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's 6)")
    p.add_argument("--exporter", default="torchscript", choices=("torchscript", "dynamo"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--r", type=int, default=21000)
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--k", type=int, default=175)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=30, help="timed runs per model (upper bound with --time-budget)")
    p.add_argument("--time-budget", type=float, default=None, metavar="S", help="stop timing after S seconds")
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's)")
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON and markdown results")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 layers, 2 warm-up + 5 timed runs")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.warmup, args.repeats = args.layers or 2, 2, 5
        args.n = min(args.n, 1)
    return args


def export_pair(args: argparse.Namespace, work: Path) -> Dict[str, Any]:
    """Export the decoder and rewrite it with tgGBC; returns paths and timings."""
    from edgeprune.export import export_onnx
    from edgeprune.methods.tggbc import TgGBCConfig
    from edgeprune.models.build import build_model
    from edgeprune.passes.driver import rewrite
    from edgeprune.passes.tggbc import KeyPruningPass

    base, pruned = work / "decoder.onnx", work / "decoder-tggbc.onnx"
    model = build_model(args.preset, "decoder", num_layers=args.layers)
    exported = export_onnx(model, base, exporter=args.exporter, batch=args.batch)
    log.info("%s", exported.summary())
    started = time.perf_counter()
    report = rewrite(base, pruned, [KeyPruningPass(TgGBCConfig(r=args.r, n=args.n, k=args.k))], verify=False)
    rewrite_s = time.perf_counter() - started
    log.info("rewrite (load, discover, pass, cleanup, checker, ORT load, save): %.2f s", rewrite_s)
    return {"base": base, "pruned": pruned, "export_seconds": exported.seconds, "rewrite_seconds": rewrite_s,
            "nodes": [report.nodes_before, report.nodes_after]}


def flops_estimate(path: Path, args: argparse.Namespace) -> Dict[str, Any]:
    from edgeprune.passes.describe import describe_model

    est = describe_model(path, r=args.r, n=args.n, k=args.k).estimate
    return {"keys_per_layer": [layer.num_keys for layer in est.after.layers], "gflops_before": est.before.total / 1e9,
            "gflops_after": est.after.total / 1e9, "ideal_speedup": est.ideal_speedup}


def time_pair(pair: Dict[str, Any], args: argparse.Namespace) -> Any:
    from edgeprune.runners.bench import BenchOptions, benchmark

    options = BenchOptions(warmup=args.warmup, repeats=args.repeats, time_budget_s=args.time_budget,
                           threads=args.threads, interleave=True)
    return benchmark([str(pair["base"]), str(pair["pruned"])], options)


def markdown(args: argparse.Namespace, report: Any, pair: Dict[str, Any], flops: Dict[str, Any]) -> str:
    base, pruned = report.models
    sp = report.speedups[0]
    rows = [f"| {name} | {m.stats.median:.1f} | [{m.stats.ci_low:.1f}, {m.stats.ci_high:.1f}] "
            f"({m.stats.ci_level:.0%}) | {m.stats.p90:.1f} | {m.stats.std:.1f} | {m.stats.n} |"
            for name, m in (("unpruned", base), ("tgGBC", pruned))]
    return "\n".join([
        f"# tgGBC decoder latency: {args.preset}, {args.layers or 6} layers, batch {args.batch}, {args.exporter}",
        "", f"r={args.r} n={args.n} k={args.k}; keys per layer {flops['keys_per_layer']}; device {report.device} "
        f"(ORT {report.env.get('ort_version')}, threads {report.env.get('threads')}), runs interleaved", "",
        "| model | median ms | CI of the median | p90 ms | std ms | runs |", "| --- | ---: | ---: | ---: | ---: | ---: |",
        *rows, "",
        f"speedup {sp.ratio:.2f}x, {sp.level:.0%} CI [{sp.ci_low:.2f}, {sp.ci_high:.2f}] ({'paired' if sp.paired else 'unpaired'} "
        f"bootstrap); ideal from FLOPs {flops['ideal_speedup']:.2f}x ({flops['gflops_before']:.1f} -> "
        f"{flops['gflops_after']:.1f} GFLOPs)",
        f"rewrite {pair['rewrite_seconds']:.2f} s (nodes {pair['nodes'][0]} -> {pair['nodes'][1]}); "
        f"export {pair['export_seconds']:.1f} s", ""])


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-tggbc-") as tmp:
        pair = export_pair(args, Path(tmp))
        flops = flops_estimate(pair["base"], args)
        report = time_pair(pair, args)
    from edgeprune.runners.report import format_table

    print(format_table(report))
    result = {"benchmark": "tggbc_decoder", "args": vars(args), "rewrite_seconds": pair["rewrite_seconds"],
              "export_seconds": pair["export_seconds"], "nodes": pair["nodes"], "flops": flops,
              "report": report.to_dict()}
    stem = out / f"tggbc_decoder-{args.preset}{'-quick' if args.quick else ''}"
    with atomic_path(stem.with_suffix(".json"), suffix=".json") as tmp_json:
        tmp_json.write_text(json.dumps(result, indent=1))
    text = markdown(args, report, pair, flops)
    with atomic_path(stem.with_suffix(".md"), suffix=".md") as tmp_md:
        tmp_md.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
