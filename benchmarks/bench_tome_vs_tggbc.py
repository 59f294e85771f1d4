"""Decoder latency and output drift: unpruned vs tgGBC vs ToMe at the same r and n.

The tgGBC paper's Table 2 comparison on this machine. Default: StreamPETR-R50 704x256
(4224 keys), r=2000 keys removed, n=1 and n=2 (both valid for ToMe, which merges at most
half of a layer's keys), k=175 for tgGBC. Paper (desktop GPU, trained weights): decoder
31.10 ms -> ToMe 29.38 ms (-5.53%), tgGBC 24.15 ms (-22.35%); mAP 38.01% -> 36.12% / 37.93%.

Steps: build the preset's decoder (seeded random weights), export it with edgeprune's
exporter, rewrite it with ``edgeprune.passes.keys.tggbc.KeyPruningPass`` and
``edgeprune.passes.keys.tome.TokenMergingPass`` for each n, time all models interleaved in one
session (fp32, ONNX Runtime CPU), and measure each rewrite's output drift from the unpruned
model on the decoder's example inputs. With random weights the drift is a numerical
comparison of how much each method changes the outputs, not mAP.

    python benchmarks/bench_tome_vs_tggbc.py                                # ~3 min
    python benchmarks/bench_tome_vs_tggbc.py --preset petr-r50-800x320 --r 3000
    python benchmarks/bench_tome_vs_tggbc.py --quick
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import _common as c

log = logging.getLogger("bench_tome_vs_tggbc")
PAPER = {"streampetr-r50-704x256": {"r": 2000, "base": 31.10, "tome": 29.38, "tggbc": 24.15,
                                    "map": (38.01, 36.12, 37.93)}}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="streampetr-r50-704x256")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's 6)")
    p.add_argument("--r", type=int, default=2000, help="keys removed in total (default 2000)")
    p.add_argument("--n", type=int, nargs="+", default=[1, 2], help="pruning/merging layers (default: 1 2)")
    p.add_argument("--k", type=int, default=175, help="tgGBC top queries (default 175)")
    c.add_timing_arguments(p)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up, 5 rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.repeats = 1, min(args.repeats, 5)
    return args


def build(args: argparse.Namespace, work: Path) -> Dict[str, Any]:
    """Export the decoder, write one tgGBC and one ToMe rewrite per n; returns paths and facts."""
    from edgeprune.methods.tggbc import TgGBCConfig, schedule
    from edgeprune.passes.keys.tggbc import KeyPruningPass
    from edgeprune.passes.keys.tome import TokenMergingPass

    model, exported = c.export_model(args.preset, "decoder", work / "unpruned.onnx", layers=args.layers)
    cfg, num_keys = model.head.cfg, model.preset.num_keys
    paths, seconds, keys = {"unpruned": exported.path}, {}, {"unpruned": [num_keys] * cfg.num_layers}
    for n in args.n:
        per_layer = schedule(args.r, n, cfg.num_layers)
        left = [num_keys - sum(per_layer[:i]) for i in range(cfg.num_layers)]      # keys each layer reads
        for method, passes in ((f"tggbc-n{n}", [KeyPruningPass(TgGBCConfig(r=args.r, n=n, k=args.k))]),
                               (f"tome-n{n}", [TokenMergingPass(r=args.r, n=n)])):
            paths[method] = work / f"{method}.onnx"
            seconds[method] = c.timed_rewrite(exported.path, paths[method], passes)
            keys[method] = left
    feeds = {k: v.numpy() for k, v in model.example_inputs(batch=1, seed=1).items()}
    return {"paths": paths, "feeds": feeds, "rewrite_seconds": seconds, "keys_per_layer": keys,
            "num_keys": num_keys, "num_layers": cfg.num_layers}


def label(name: str, args: argparse.Namespace) -> str:
    if name == "unpruned":
        return "unpruned"
    method, n = name.split("-n")
    if method == "tggbc":
        return f"tgGBC r={args.r} n={n} k={args.k}"
    return f"ToMe r={args.r} n={n}"


def extra_cells(built: Dict[str, Any], drift: Dict[str, Any]) -> Dict[str, List[str]]:
    """Keys per layer and drift (max abs over all layers, last layer in brackets) per model."""
    cells = {}
    for name, keys in built["keys_per_layer"].items():
        d = drift.get(name)
        fmt = (lambda o: f"{d[o]['max_abs']:.3g} ({d[o]['max_abs_last_layer']:.3g})") if d else (lambda o: "0")
        cells[name] = ["/".join(map(str, keys)), fmt("all_cls_scores"), fmt("all_bbox_preds"),
                       f"{built['rewrite_seconds'][name]:.1f}" if name in built["rewrite_seconds"] else "-"]
    return cells


def head_to_head(report: Any, args: argparse.Namespace) -> List[str]:
    """tgGBC against ToMe at each n: paired bootstrap over the same interleaved rounds."""
    from edgeprune.runners.stats import speedup

    by = {m.name: m for m in report.models}
    out = []
    for n in args.n:
        tome, tggbc = by[f"tome-n{n}"], by[f"tggbc-n{n}"]
        sp = speedup(tome.samples_ms, tggbc.samples_ms, name=tggbc.name, baseline_name=tome.name, paired=True)
        out.append(f"- n={n}: tgGBC is {sp.ratio:.3f}x the speed of ToMe (95% CI [{sp.ci_low:.3f}, {sp.ci_high:.3f}]; "
                   "above 1 = tgGBC faster)")
    return out


def paper_lines(args: argparse.Namespace) -> List[str]:
    paper = PAPER.get(args.preset)
    if paper is None or paper["r"] != args.r:
        return ["No published ToMe row for this preset and r."]
    b = paper["base"]
    return [f"Paper (Table 2, desktop GPU, trained weights, r={paper['r']}): decoder {b:.2f} ms; ToMe "
            f"{paper['tome']:.2f} ms ({(paper['tome'] / b - 1) * 100:+.2f}%, {b / paper['tome']:.2f}x); tgGBC "
            f"{paper['tggbc']:.2f} ms ({(paper['tggbc'] / b - 1) * 100:+.2f}%, {b / paper['tggbc']:.2f}x); mAP "
            f"{paper['map'][0]:.2f}% -> ToMe {paper['map'][1]:.2f}%, tgGBC {paper['map'][2]:.2f}%."]


def markdown(args: argparse.Namespace, facts: Dict[str, Any], rows: List[c.Row], built: Dict[str, Any],
             drift: Dict[str, Any], warnings: List[str], versus: List[str]) -> str:
    return "\n".join([
        f"# Decoder: unpruned vs tgGBC vs ToMe, {args.preset} ({built['num_layers']} layers, "
        f"{built['num_keys']} keys), r={args.r}", "", f"command: `{facts['command']}`", "", c.machine_line(facts), "",
        f"fp32, batch 1, torchscript export with onnxsim; {args.warmup} warm-up run(s) per model, then rounds of "
        "one run per model in the table's order. Speedups: paired bootstrap against the unpruned decoder.", "",
        *c.table(rows, extra_cells(built, drift), ["keys per layer", "cls max abs drift (last layer)",
                                                   "box max abs drift (last layer)", "rewrite s"]),
        *warnings, "", "Head to head (same keys per layer, same rounds):", "", *versus, "",
        "Drift = max |pruned - unpruned| over all_cls_scores / all_bbox_preds [L, 1, Nq, 10] on the decoder's "
        "example inputs. The weights are seeded random, so this says how far each rewrite moves the outputs, "
        "not what it does to mAP.", "", *paper_lines(args), ""])


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    c.setup_logging(log.name)
    facts = dict(c.machine_facts(args.threads), command=c.command_line())
    with tempfile.TemporaryDirectory(prefix="bench-tome-") as tmp:
        built = build(args, Path(tmp))
        report = c.time_models(list(built["paths"].values()), warmup=args.warmup, repeats=args.repeats,
                               threads=args.threads, time_budget=args.time_budget)
        c.finish(facts)
        drift = c.output_drift(built["paths"]["unpruned"],
                               {k: v for k, v in built["paths"].items() if k != "unpruned"}, built["feeds"])
    names = [m.name for m in report.models]
    rows = c.rows(report, {n: label(n, args) for n in names}, {n: "unpruned" for n in names if n != "unpruned"})
    versus = head_to_head(report, args)
    text = markdown(args, facts, rows, built, drift, c.drift_warnings(report), versus)
    result = {"benchmark": "tome_vs_tggbc", "args": vars(args), "machine": facts, "drift": drift,
              "keys_per_layer": built["keys_per_layer"], "rewrite_seconds": built["rewrite_seconds"], "versus": versus,
              "speedups": {r.model: asdict(r.speedup) if r.speedup else None for r in rows},
              "report": report.to_dict()}
    stem = f"tome_vs_tggbc-{args.preset}-r{args.r}{'-quick' if args.quick else ''}"
    c.write_results(args.out / stem, result, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
