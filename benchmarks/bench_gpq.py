"""GPQ speed: a preset decoder with 900 queries against its 300- and 150-query GPQ rewrites.

Steps: build the preset's decoder (seeded random weights), export it with ``edgeprune``'s
exporter, rank the queries once on seeded calibration inputs (GPQ's score, run in ONNX
Runtime), shrink the graph with the GPQ pass to each kept count (``edgeprune.passes.driver``:
cleanup, checker, ORT load), and time all models interleaved with ``edgeprune.runners``
(fp32, ONNX Runtime CPU on this machine). Latency does not depend on *which* queries are
kept, only on how many: for StreamPETR the kept set is split between learned and propagated
queries in the GPQ paper's proportion (644 -> 236 and 256 -> 64 for 900 -> 300).

Writes ``<out>/gpq_<preset>_b<batch>.json`` (the full benchmark report plus FLOPs and kept
indices) and ``.md`` (a table with medians, 95% CIs, speedups with CIs, the FLOPs-ideal speedup and
measured / ideal).

    .venv/bin/python benchmarks/bench_gpq.py --preset streampetr-r50-704x256
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import _common as c                                                     # puts the checkout on sys.path
from edgeprune.report.flops import DecoderSizes, decoder_flops          # noqa: E402

log = logging.getLogger("bench_gpq")
PAPER_SPLIT = (236, 64)          # GPQ paper, StreamPETR 900 -> 300: learned, propagated kept


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="streampetr-r50-704x256", help="model preset (default: the GPQ paper's "
                   "StreamPETR 704x256)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's 6)")
    p.add_argument("--keep", type=int, nargs="+", default=[300, 150], help="kept query counts (default 300 150)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript")
    c.add_timing_arguments(p)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 layers, 1 warm-up, 5 rounds, 900 -> 300")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.warmup, args.repeats, args.keep = args.layers or 2, 1, min(args.repeats, 5), args.keep[:1]
    return args


def split_counts(keep: int, num_learned: int, num_propagated: int) -> tuple[int, int]:
    """(learned, propagated) kept, in the paper's 236:64 proportion when there are propagated queries."""
    if not num_propagated:
        return keep, 0
    prop = min(num_propagated, max(1, round(keep * PAPER_SPLIT[1] / sum(PAPER_SPLIT))))
    return keep - prop, prop


def kept_indices(scores: np.ndarray, keep: int, num_learned: int, num_propagated: int) -> list[int]:
    """Top-scoring queries of each pool (learned ``[0, Nl)``, propagated ``[Nl, Nq)``), ascending."""
    n_learned, n_prop = split_counts(keep, num_learned, num_propagated)
    learned = np.argsort(-scores[:num_learned], kind="stable")[:n_learned]
    prop = num_learned + np.argsort(-scores[num_learned:], kind="stable")[:n_prop]
    return sorted(int(i) for i in np.concatenate([learned, prop]))


def flops(cfg: Any, num_keys: int, queries: int, batch: int) -> int:
    """Decoder FLOPs (cross + self attention + FFN, edgeprune.report.flops) with ``queries`` queries."""
    memory = max(cfg.memory_len - cfg.num_propagated, 0) if cfg.memory_len else 0
    sizes = DecoderSizes(cfg.num_layers, queries, num_keys, cfg.embed_dims, cfg.num_heads, batch,
                         self_keys=(queries + memory,) * cfg.num_layers, ffn_dims=cfg.ffn_dims)
    return decoder_flops(sizes).total


def build_models(args: argparse.Namespace, tmp: Path) -> tuple[list[Path], dict[str, Any]]:
    """Export the baseline and write one GPQ rewrite per kept count; returns paths and facts."""
    import onnx

    from edgeprune.export.exporter import export_onnx
    from edgeprune.models.build import build_model
    from edgeprune.passes.queries import gpq
    from edgeprune.passes.driver import rewrite

    model = build_model(args.preset, "decoder", num_layers=args.layers)
    cfg, nk = model.head.cfg, model.preset.num_keys
    base = tmp / f"{args.preset}-q{cfg.total_queries}.onnx"
    started = time.perf_counter()
    export_onnx(model, base, exporter=args.exporter, batch=args.batch)
    log.info("exported %s in %.1f s", base.name, time.perf_counter() - started)
    calib = {k: v.numpy() for k, v in model.example_inputs(batch=args.batch, seed=1).items()}
    scores = gpq.query_scores_onnx(onnx.load(str(base)), calib)
    paths, facts = [base], {"queries": [cfg.total_queries], "kept": {}, "rewrite_s": {}}
    for keep in args.keep:
        kept = kept_indices(scores, keep, cfg.num_queries, cfg.num_propagated)
        out = tmp / f"{args.preset}-q{keep}.onnx"
        started = time.perf_counter()
        rewrite(base, out, [gpq.QueryPruningPass(keep_indices=kept)], verify=False)
        facts["rewrite_s"][keep] = round(time.perf_counter() - started, 3)
        facts["kept"][keep] = kept
        facts["queries"].append(keep)
        paths.append(out)
    facts["flops"] = [flops(cfg, nk, q, args.batch) for q in facts["queries"]]
    facts.update(num_keys=nk, num_layers=cfg.num_layers, learned=cfg.num_queries, propagated=cfg.num_propagated)
    return paths, facts


def markdown(report: Any, facts: dict[str, Any], args: argparse.Namespace, machine: dict[str, Any]) -> str:
    speedups = {s.name: s for s in report.speedups}
    level = min(0.95, min(m.stats.ci_level for m in report.models))
    lines = [f"# GPQ query shrinking: {args.preset}, decoder, batch {args.batch}, fp32", "",
             f"command: `{machine['command']}`", "", c.machine_line(machine), "",
             f"{facts['num_layers']} decoder layer(s), {facts['num_keys']} keys, {args.exporter} export; "
             "runs interleaved (rounds of one run per model, in the table's order)", "",
             f"| queries | kept (learned + propagated) | GFLOPs | FLOPs vs {facts['queries'][0]} | median ms | "
             f"{level:.0%} CI ms | speedup | speedup 95% CI | ideal | measured / ideal | run time change |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    base_flops = facts["flops"][0]
    for m, q, f in zip(report.models, facts["queries"], facts["flops"]):
        s, sp, ideal = m.stats, speedups.get(m.name), report.ideal_for(m.name)
        eff = ideal.efficiency if ideal is not None else None
        learned = sum(1 for i in facts["kept"].get(q, range(q)) if i < facts["learned"])
        split = f"{learned} + {q - learned}" if facts["propagated"] else f"{q}"
        change = f"{(1 / sp.ratio - 1) * 100:+.1f}%" if sp else "baseline"
        lines.append(f"| {q} | {split} | {f / 1e9:.2f} | {(f / base_flops - 1) * 100:+.1f}% | {s.median:.2f} | "
                     f"[{s.ci_low:.2f}, {s.ci_high:.2f}] | {f'{sp.ratio:.2f}x' if sp else '1.00x'} | "
                     f"{f'[{sp.ci_low:.2f}, {sp.ci_high:.2f}]' if sp else '-'} | "
                     f"{f'{ideal.ideal:.2f}x' if ideal else ('1.00x' if m is report.models[0] else '-')} | "
                     f"{f'{eff:.2f}' if eff else '-'} | {change} |")
    lines += ["", "ideal: decoder FLOPs of the 900-query model / this model's, as `edgeprune inspect` counts each "
              "graph (`edgeprune bench` prints the same); measured / ideal = speedup / ideal.",
              "", f"{report.models[0].stats.n} timed runs per model (interleaved), warm-up {args.warmup}. "
              "GPQ paper (Jetson Nano, whole StreamPETR model): 900 -> 300 run time -39.74%, 900 -> 150 -47.96%."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    c.setup_logging(log.name)
    from edgeprune.runners.bench import BenchOptions, benchmark
    from edgeprune.runners.report import format_table

    machine = dict(c.machine_facts(args.threads), command=c.command_line())
    with tempfile.TemporaryDirectory(prefix="bench-gpq-") as tmp:
        paths, facts = build_models(args, Path(tmp))
        options = BenchOptions(warmup=args.warmup, repeats=args.repeats, time_budget_s=args.time_budget,
                               threads=args.threads, seed=0)
        report = benchmark([str(p) for p in paths], options)
        c.finish(machine)
    print(format_table(report))
    result = {"benchmark": report.to_dict(), "gpq": facts, "machine": machine,
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    stem = args.out / f"gpq_{args.preset}_b{args.batch}{'-quick' if args.quick else ''}"
    c.write_results(stem, result, markdown(report, facts, args, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
