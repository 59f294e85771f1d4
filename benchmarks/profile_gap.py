"""Where a rewrite's measured speedup falls short of its FLOPs ideal, from `edgeprune bench --profile --json`.

Reads the bench JSON (the first model is the baseline) and both graphs, and prints for the
rewritten model:

* the kernel-time ratio (sum of ORT node times, baseline / rewritten) beside the FLOPs ideal
  that ``edgeprune bench`` recorded;
* a *time ideal*: every node of the baseline's profile scaled down by how much less data it
  touches in the rewritten graph (the largest ratio of element counts over its inputs and
  outputs; 8 for a layer that reads 3000 of 24000 keys, 1 for a query-side FFN). What run
  time would be if each op kept its own speed; where it is below the FLOPs ideal, ops that
  do not shrink are slower per FLOP than the ones that do, and no rewrite of the graph closes
  that part of the gap;
* per node group (op type, shrinking or fixed, and tgGBC's inserted scoring and gathers) the
  time beyond that scaling.

Nodes ORT fused under new names (SkipLayerNormalization, ...) are not in the graph; they count
as fixed unless ``--unknown-ratio`` says how they scale (the queries' ratio for GPQ).

    .venv/bin/python -m edgeprune bench base.onnx pruned.onnx --profile --json bench.json
    .venv/bin/python benchmarks/profile_gap.py bench.json base.onnx pruned.onnx
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import _common as c            # noqa: F401  (puts the checkout on sys.path)


def element_counts(path: Path) -> Dict[str, List[Optional[int]]]:
    """Node name -> element count of each input and output (None where the shape is not static)."""
    from edgeprune.graph.files import load_model
    from edgeprune.graph.shapes import infer_shapes

    model = load_model(path)
    counts = {name: _prod(list(shape)) for name, shape in infer_shapes(model).items()
              if shape and all(isinstance(d, int) and d > 0 for d in shape)}
    return {n.name: [counts.get(t) for t in list(n.input) + list(n.output)] for n in model.graph.node}


def _prod(dims: List[int]) -> int:
    out = 1
    for d in dims:
        out *= d
    return out


def graph_name(profiled: str) -> str:
    """The graph node behind a profile row: ORT prefixes 'fused ' and suffixes '/MatMulScaleFusion/'."""
    return re.sub(r"/MatMulScaleFusion/$", "", profiled.replace("fused ", "", 1))


def data_ratio(node: str, base: Dict[str, List[Optional[int]]], pruned: Dict[str, List[Optional[int]]],
               unknown: float) -> float:
    name = graph_name(node)
    if name not in base or name not in pruned:
        return unknown
    ratios = [a / b for a, b in zip(base[name], pruned[name]) if a and b]
    return max(ratios) if ratios else 1.0


def group(node: str, op: str, ratio: float, in_base: bool) -> str:
    from edgeprune.passes.keys.tggbc import PREFIX, is_kept_key_gather

    if node.startswith(PREFIX):
        return "tgGBC gathers of kept keys" if is_kept_key_gather(node) else "tgGBC scoring and the rest it inserted"
    return f"{'shrinking' if in_base and ratio > 1.01 else 'fixed'} {op}"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench_json", type=Path, help="`edgeprune bench --profile --json` output; first model = baseline")
    p.add_argument("base", type=Path, help="the baseline's .onnx")
    p.add_argument("rewritten", type=Path, help="the rewritten model's .onnx")
    p.add_argument("--model", help="the rewritten model's name in the JSON (default: the second model)")
    p.add_argument("--unknown-ratio", type=float, default=1.0,
                   help="how nodes ORT renamed by fusion scale (default 1: fixed)")
    args = p.parse_args(argv)
    data = json.loads(args.bench_json.read_text())
    models = {m["name"]: m for m in data["models"]}
    name = args.model or data["models"][1]["name"]
    base_rows = {r["node"]: r for r in data["models"][0]["profile"] or []}
    rows = {r["node"]: r for r in models[name]["profile"] or []}
    if not base_rows or not rows:
        print(f"error: {args.bench_json} has no profile; run edgeprune bench with --profile", file=sys.stderr)
        return 2
    counts_base, counts_new = element_counts(args.base), element_counts(args.rewritten)
    ratio = {n: data_ratio(n, counts_base, counts_new, args.unknown_ratio) for n in base_rows}
    scaled = {n: r["dur_us"] / ratio[n] for n, r in base_rows.items()}
    t_base, t_new, t_ideal = (sum(r["dur_us"] for r in base_rows.values()), sum(r["dur_us"] for r in rows.values()),
                              sum(scaled.values()))
    ideal = next((i["ideal"] for i in data.get("ideal_speedups", []) if i["name"] == name), None)
    print(f"{name}: kernel time {t_base / 1e3:.1f} -> {t_new / 1e3:.1f} ms per run, ratio {t_base / t_new:.3f}; "
          f"time ideal {t_base / t_ideal:.3f}; FLOPs ideal {f'{ideal:.3f}' if ideal else 'not recorded'}")
    groups: Dict[str, List[float]] = defaultdict(lambda: [0.0, 0.0])
    for node, r in rows.items():
        g = group(node, r["op_type"], ratio.get(node, 1.0), node in base_rows)
        groups[g][0] += scaled.get(node, 0.0)
        groups[g][1] += r["dur_us"]
    print(f"  {'group':40s} {'scaled ms':>10s} {'actual ms':>10s} {'beyond':>9s} {'of actual':>9s}")
    for g, (s, a) in sorted(groups.items(), key=lambda kv: kv[1][0] - kv[1][1]):
        print(f"  {g:40s} {s / 1e3:10.1f} {a / 1e3:10.1f} {(a - s) / 1e3:9.1f} {100 * (a - s) / t_new:8.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
