"""Decoder latency before and after the tgGBC pass, side by side (fp32, ONNX Runtime on this machine).

Builds a preset's decoder, exports it with edgeprune's exporter, rewrites it with
``--method tggbc`` once per ``--n`` (default: the paper's StreamPETR VoVNet 1600x640 setting,
24000 keys, r=21000 k=175, n=1 and n=2) and times all models with edgeprune's runners in one
run: interleaved (A B C A B C ...), median with its 95 % interval per model, and each speedup
with its paired bootstrap interval, beside its FLOPs-ideal speedup and measured / ideal.
With ``--profile`` (default on), each model's per-node kernel time from its own profiling
session gives the share of the pruned model's kernel time spent in the nodes tgGBC inserted
(scoring, selection, and the gathers of the kept keys). Writes
``<out>/tggbc_decoder-<preset>.json`` (the full bench report plus these figures) and a ``.md``
summary.

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
from edgeprune.passes.keys.tggbc import PREFIX, is_kept_key_gather  # noqa: E402
log = logging.getLogger("bench_tggbc_decoder")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="streampetr-vov-1600x640")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's 6)")
    p.add_argument("--exporter", default="torchscript", choices=("torchscript", "dynamo"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--r", type=int, default=21000, help="keys pruned in total (default 21000)")
    p.add_argument("--n", type=int, nargs="+", default=[1, 2],
                   help="pruning layers; one rewrite per value, all timed in one run (default 1 2)")
    p.add_argument("--k", type=int, default=175, help="top queries scoring the keys (default 175)")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the per-node profile (the inserted nodes' share of kernel time)")
    c.add_timing_arguments(p)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 layers, 2 warm-up + 5 timed runs, n=1")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.warmup, args.repeats, args.n = args.layers or 2, 2, 5, [1]
    return args


def export_models(args: argparse.Namespace, work: Path) -> Dict[str, Any]:
    """Export the decoder and rewrite it with tgGBC once per n; returns paths and timings."""
    from edgeprune.methods.tggbc import TgGBCConfig
    from edgeprune.passes.keys.tggbc import KeyPruningPass

    base = work / "decoder.onnx"
    _, exported = c.export_model(args.preset, "decoder", base, layers=args.layers, exporter=args.exporter,
                                 batch=args.batch)
    pruned, rewrite_s = {}, {}
    for n in args.n:
        pruned[n] = work / f"decoder-tggbc-n{n}.onnx"
        rewrite_s[n] = c.timed_rewrite(base, pruned[n], [KeyPruningPass(TgGBCConfig(r=args.r, n=n, k=args.k))])
    return {"base": base, "pruned": pruned, "export_seconds": exported.seconds, "rewrite_seconds": rewrite_s}


def flops_estimate(path: Path, args: argparse.Namespace, n: int) -> Dict[str, Any]:
    from edgeprune.report.describe import describe_model

    est = describe_model(path, r=args.r, n=n, k=args.k).estimate
    return {"keys_per_layer": [layer.num_keys for layer in est.after.layers], "gflops_before": est.before.total / 1e9,
            "gflops_after": est.after.total / 1e9, "ideal_speedup": est.ideal_speedup}


def inserted_share(model: Any) -> Optional[Dict[str, float]]:
    """Kernel time per run (ms) of the whole model and of the nodes tgGBC inserted, from its profile."""
    if model.profile is None:
        return None
    total = sum(r["dur_us"] for r in model.profile) / 1e3
    ours = [r for r in model.profile if r["node"].startswith(PREFIX)]
    gathers = sum(r["dur_us"] for r in ours if is_kept_key_gather(r["node"])) / 1e3
    inserted = sum(r["dur_us"] for r in ours) / 1e3
    return {"kernel_ms": total, "inserted_ms": inserted, "inserted_share": inserted / total,
            "scoring_ms": inserted - gathers, "key_gathers_ms": gathers}


def markdown(args: argparse.Namespace, facts: Dict[str, Any], rows: List[c.Row], models: Dict[str, Any],
             flops: Dict[int, Dict[str, Any]], shares: Dict[str, Optional[Dict[str, float]]],
             warnings: List[str]) -> str:
    lines = [
        f"# tgGBC decoder latency: {args.preset}, {args.layers or 6} layers, batch {args.batch}, {args.exporter}",
        "", f"command: `{facts['command']}`", "", c.machine_line(facts), "",
        f"r={args.r} k={args.k}, n in {args.n}; fp32; {args.warmup} warm-up run(s) per model, then rounds of one "
        "run per model (unpruned, then tgGBC per n).", "",
        *c.table(rows), *warnings, ""]
    for n in args.n:
        f = flops[n]
        lines.append(f"- n={n}: keys per layer {f['keys_per_layer']}; FLOPs {f['gflops_before']:.1f} -> "
                     f"{f['gflops_after']:.1f} G (ideal {f['ideal_speedup']:.2f}x); rewrite "
                     f"{models['rewrite_seconds'][n]:.2f} s")
    if any(shares.values()):
        lines += ["", "Kernel time per run from each model's profiling session (`bench --profile`), and the nodes "
                  "tgGBC inserted (`tggbc/*`: scoring and selection, and the gathers of the kept keys):", "",
                  "| model | kernel ms | inserted ms | of kernel time | scoring + selection ms | kept-key gathers ms |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            sh = shares.get(r.model)
            if sh:
                lines.append(f"| {r.label} | {sh['kernel_ms']:.1f} | {sh['inserted_ms']:.2f} | "
                             f"{100 * sh['inserted_share']:.1f}% | {sh['scoring_ms']:.2f} | {sh['key_gathers_ms']:.2f} |")
    lines += ["", f"Export {models['export_seconds']:.1f} s. Paper (desktop GPU, trained StreamPETR-VoVNet 1600x640, "
              "r=21000 n=2): decoder 64.93 -> 34.98 ms (-46.13%, 1.86x).", ""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    c.setup_logging(log.name)
    facts = dict(c.machine_facts(args.threads), command=c.command_line())
    with tempfile.TemporaryDirectory(prefix="bench-tggbc-") as tmp:
        models = export_models(args, Path(tmp))
        flops = {n: flops_estimate(models["base"], args, n) for n in args.n}
        report = c.time_models([models["base"], *models["pruned"].values()], warmup=args.warmup,
                               repeats=args.repeats, threads=args.threads, time_budget=args.time_budget,
                               profile=args.profile)
        c.finish(facts)
    labels = {"decoder": "unpruned", **{f"decoder-tggbc-n{n}": f"tgGBC n={n}" for n in args.n}}
    rows = c.rows(report, labels, {f"decoder-tggbc-n{n}": "decoder" for n in args.n})
    shares = {m.name: inserted_share(m) for m in report.models if m.name != "decoder"}
    text = markdown(args, facts, rows, models, flops, shares, c.drift_warnings(report))
    result = {"benchmark": "tggbc_decoder", "args": vars(args), "machine": facts,
              "rewrite_seconds": models["rewrite_seconds"], "export_seconds": models["export_seconds"],
              "flops": flops, "inserted": shares,
              "speedups": {r.label: dict(asdict(r.speedup), ideal=r.ideal, efficiency=r.efficiency)
                           for r in rows if r.speedup is not None},
              "report": report.to_dict()}
    c.write_results(args.out / f"tggbc_decoder-{args.preset}{'-quick' if args.quick else ''}", result, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
