"""What pruning costs in accuracy, on the trained demo detector (issue 10's tables, our scale).

Exports the ``demo`` preset (its shipped weights, or ``--weights``) at full scope, then:

1. ``edgeprune sweep`` (in process, one results directory, resumable) over
   - r at 25/50/75/90% of the 1056 keys, n=2, k=175, for tgGBC, random pruning and ToMe
     (the same kept keys per layer: all three use tgGBC's schedule);
   - n in 1..5 at r=50%, k=175; k in {50, 175, all} at r=50%, n=2;
   - fp16 of the baseline and of r=50% n=2 k=175;
   each row: mAP, NDS, latency and speedup paired with the baseline in one interleaved run.
2. tgGBC's importance ablations at r=50% n=2 k=175 (no class score; mean / min over classes).
3. GPQ: one-shot ranking (``--keep-queries K --calib``, ranked on ``--calib-data``) against
   the GPQPruner fine-tunes given with ``--gpq K=WEIGHTS`` (their ``.keep.json`` beside them).
4. int8 (static, calibrated on ``--calib-data``) and int8-dynamic, with and without tgGBC, each
   also with ``--int8-sensitivity`` (sensitive weight GEMMs kept float, probed on ``--calib-data``),
   and the share of tgGBC's kept keys that match fp32's on the evaluation scenes.

Writes ``<out>/demo_accuracy.md`` and ``.json``; the sweep's own table, csv and Pareto plot
stay in ``<work>/sweep``. Every command is recorded. Minutes on 2 cores:

    edgeprune dataset synth -o scenes-test --scenes 100 --seed 9001
    edgeprune dataset synth -o scenes-calib --scenes 16 --seed 77
    python benchmarks/demo_accuracy.py --data scenes-test --calib-data scenes-calib \\
        --gpq 100=demo-gpq100.pt --gpq 50=demo-gpq50.pt --work demo-accuracy
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import _common as c            # puts the checkout on sys.path

log = logging.getLogger("demo_accuracy")
PCTS = ("25%", "50%", "75%", "90%")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="evaluation scenes (a seed never used in training)")
    p.add_argument("--calib-data", required=True, help="scenes for GPQ one-shot ranking and int8 calibration")
    p.add_argument("--int8-sensitivity", type=float, default=0.05,
                   help="tolerance of the int8 rows that keep sensitive GEMMs float (default 0.05)")
    p.add_argument("--weights", default=None, help="demo weights (default: the shipped ones)")
    p.add_argument("--gpq", action="append", default=[], metavar="K=WEIGHTS",
                   help="a GPQ fine-tune keeping K queries (train-demo --gpq-keep K); repeatable")
    p.add_argument("--work", type=Path, default=Path("demo-accuracy"), help="models and the sweep (resumable)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N scenes only")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per model and setting")
    p.add_argument("--out", type=Path, default=c.RESULTS)
    return p.parse_args(argv)


def export_demo(weights: Optional[str], path: Path) -> Path:
    from edgeprune.cli.main import main

    if not path.is_file():
        extra = ["--checkpoint", weights] if weights else []
        code = main(["export", "--model", "demo", "--scope", "full", "-o", str(path), *extra])
        if code != 0:
            raise SystemExit(f"export of the demo failed (exit {code})")
    return path


# ---------------------------------------------------------------- 1. the sweep
def sweep_groups(num_keys: int) -> Dict[str, List[Any]]:
    """The sweep's settings, grouped by the table they make."""
    from edgeprune.sweep.settings import BASELINE, Setting, parse_r

    def r_of(pct: str) -> int:
        return parse_r(pct, num_keys)[0]

    base = Setting(BASELINE)
    half = r_of("50%")
    # ToMe merges at most half of a layer's keys, so with n=2 it stops below 75%
    by_r = [base] + [Setting(m, r_of(p), 2, 175 if m == "tggbc" else 0) for p in PCTS
                     for m in ("tggbc", "random", "tome") if m != "tome" or p in ("25%", "50%")]
    return {
        "keys pruned (n=2, k=175 for tgGBC): tgGBC vs random vs ToMe at the same kept keys": by_r,
        "pruning layers n (r=50%, k=175)": [base] + [Setting("tggbc", half, n, 175) for n in range(1, 6)],
        "top queries k (r=50%, n=2)": [base] + [Setting("tggbc", half, 2, k) for k in (50, 175, 0)],
        "fp16 (ONNX Runtime CPU)": [base, Setting(BASELINE, precision="fp16"), Setting("tggbc", half, 2, 175),
                                    Setting("tggbc", half, 2, 175, "fp16")],
    }


def run_sweep_tables(model: Path, args: argparse.Namespace, num_keys: int) -> Tuple[List[str], Dict[str, Any]]:
    from edgeprune.runners.bench import BenchOptions
    from edgeprune.sweep.run import SweepOptions, run_sweep
    from edgeprune.sweep.table import build_table, format_markdown

    groups = sweep_groups(num_keys)
    grid = list(dict.fromkeys(s for g in groups.values() for s in g))
    options = SweepOptions(str(args.data), BenchOptions(warmup=2, repeats=args.repeats), args.limit)
    store = run_sweep(model, grid, args.work / "sweep", options)
    lines, tables = [], {}
    for title, settings in groups.items():
        table = build_table(store, settings, max_map_drop=1.0)
        lines += [f"### {title}", "", format_markdown(table).rstrip(), ""]
        tables[title] = table.to_dict()
    return lines, tables


# ---------------------------------------------------------------- 2-4. rewrites evaluated one by one
def evaluate(path: Path, args: argparse.Namespace) -> Dict[str, float]:
    from edgeprune.evaluation.evaluate import evaluate_model

    m = evaluate_model(path, args.data, limit=args.limit)
    return {"mAP": m.mean_ap, "NDS": m.nds}


def calibration_images(args: argparse.Namespace, path: Path, count: int = 8) -> Path:
    """``--calib-data``'s first scenes as a GPQ/int8 calibration file ``images [S, 1, 6, 3, H, W]``."""
    import numpy as np

    from edgeprune.data.format import load_dataset, model_images

    if not path.is_file():
        ds = load_dataset(args.calib_data)
        images = np.stack([model_images(ds.images(i)[None]) for i in range(min(count, len(ds)))])
        with c.atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, images=images)
    return path


def rewrite_once(src: Path, dst: Path, passes: Sequence[Any], precision: Any = "fp32") -> Path:
    if not dst.is_file():
        c.timed_rewrite(src, dst, passes, precision)
    return dst


def tggbc(r: int, **options: Any) -> Any:
    from edgeprune.methods.tggbc import TgGBCConfig
    from edgeprune.passes.keys.tggbc import KeyPruningPass

    return KeyPruningPass(TgGBCConfig(r=r, n=2, k=175, **options))


def ablation_rows(model: Path, args: argparse.Namespace, half: int) -> List[List[str]]:
    settings = {"max over classes (tgGBC)": {}, "no class score": {"use_class_score": False},
                "mean over classes": {"class_reduce": "mean"}, "min over classes": {"class_reduce": "min"}}
    rows = []
    for label, options in settings.items():
        slug = label.split(" (")[0].replace(" ", "-")
        path = rewrite_once(model, args.work / f"ablation-{slug}.onnx", [tggbc(half, **options)])
        m = evaluate(path, args)
        rows.append([label, f"{m['mAP']:.4f}", f"{m['NDS']:.4f}"])
    return rows


def gpq_rows(model: Path, args: argparse.Namespace, calib: Path, base: Dict[str, float],
             num_queries: int) -> List[List[str]]:
    from edgeprune.passes.queries.gpq import QueryPruningPass, load_calibration, load_keep_indices
    from edgeprune.training.loop import keep_indices_path

    rows = [[f"{num_queries} (unpruned)", "-", f"{base['mAP']:.4f}", f"{base['NDS']:.4f}"]]
    for spec in args.gpq:
        keep, weights = spec.split("=", 1)
        one_shot = rewrite_once(model, args.work / f"gpq{keep}-one-shot.onnx",
                                [QueryPruningPass(keep_queries=int(keep), calib=load_calibration(str(calib)))])
        tuned_full = export_demo(weights, args.work / f"gpq{keep}-finetuned-full.onnx")
        tuned = rewrite_once(tuned_full, args.work / f"gpq{keep}-finetuned.onnx",
                             [QueryPruningPass(keep_indices=load_keep_indices(str(keep_indices_path(weights))))])
        for label, path in (("one-shot ranking", one_shot), ("GPQPruner fine-tune", tuned)):
            m = evaluate(path, args)
            rows.append([keep, label, f"{m['mAP']:.4f}", f"{m['NDS']:.4f}"])
    return rows


def kept_key_share(reference: Path, candidate: Path, args: argparse.Namespace) -> float:
    """Share of the keys tgGBC keeps in ``reference`` that ``candidate`` keeps too, over the scenes."""
    import onnx
    import onnxruntime as ort

    from edgeprune.data.format import load_dataset, model_images

    def session(path: Path) -> Tuple[Any, List[str]]:
        proto = onnx.load(str(path))
        kept = [n.output[1] for n in proto.graph.node if n.name.startswith("tggbc/") and n.op_type == "TopK"]
        proto.graph.output.extend(onnx.ValueInfoProto(name=t) for t in kept)
        return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]), kept

    (ref, kept), (cand, kept_c) = session(reference), session(candidate)
    ds = load_dataset(args.data)
    shares = []
    for i in range(len(ds) if args.limit is None else min(args.limit, len(ds))):
        feeds = {"images": model_images(ds.images(i)[None])}
        a = ref.run(kept, feeds)
        b = cand.run(kept_c, feeds)
        shares += [len(set(x.ravel().tolist()) & set(y.ravel().tolist())) / x.size for x, y in zip(a, b)]
    return sum(shares) / len(shares)


def int8_rows(model: Path, args: argparse.Namespace, half: int,
              base: Dict[str, float]) -> List[List[str]]:
    from dataclasses import replace

    from edgeprune.passes.precision.int8 import DEFAULT_CONFIG, Int8DynamicPass, Int8Pass

    fp32_tggbc = rewrite_once(model, args.work / "tggbc-fp32.onnx", [tggbc(half)])
    calib = str(args.calib_data)
    sensitive = replace(DEFAULT_CONFIG, sensitivity=args.int8_sensitivity)
    rows = [["fp32", f"{base['mAP']:.4f}", "-"]]
    m = evaluate(fp32_tggbc, args)
    rows.append(["fp32 + tgGBC", f"{m['mAP']:.4f}", "100%"])
    tol = f"sensitive GEMMs float (--int8-sensitivity {args.int8_sensitivity:g})"
    for name, precision in (("int8 (static QDQ)", Int8Pass(data=calib)), ("int8-dynamic", "int8-dynamic"),
                            (f"int8 (static QDQ), {tol}", Int8Pass(sensitive, data=calib)),
                            (f"int8-dynamic, {tol}", Int8DynamicPass(replace(sensitive, dynamic=True), data=calib))):
        plain = rewrite_once(model, args.work / f"int8-{len(rows)}.onnx", [], precision)
        pruned = rewrite_once(model, args.work / f"int8-tggbc-{len(rows)}.onnx", [tggbc(half)], precision)
        rows.append([name, f"{evaluate(plain, args)['mAP']:.4f}", "-"])
        rows.append([f"{name} + tgGBC", f"{evaluate(pruned, args)['mAP']:.4f}",
                     f"{100 * kept_key_share(fp32_tggbc, pruned, args):.1f}%"])
    return rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def main(argv: Optional[List[str]] = None) -> int:
    c.setup_logging(log.name)
    args = parse_args(argv)
    from edgeprune.sweep.settings import decoder_size, parse_r

    args.work.mkdir(parents=True, exist_ok=True)
    facts = c.machine_facts(None)
    model = export_demo(args.weights, args.work / "demo.onnx")
    size = decoder_size(str(model))
    num_keys = size.num_keys
    half = parse_r("50%", num_keys)[0]
    sweep_lines, tables = run_sweep_tables(model, args, num_keys)
    base = evaluate(model, args)
    calib = calibration_images(args, args.work / "calib.npz")
    ablation = ablation_rows(model, args, half)
    gpq = gpq_rows(model, args, calib, base, size.num_queries)
    int8 = int8_rows(model, args, half, base)
    c.finish(facts)
    md = ["# Accuracy of pruning on the trained demo detector", "", f"Command: `{c.command_line()}`", "",
          c.machine_line(facts), "", f"{num_keys} keys, {size.num_queries} queries, {size.num_layers} decoder layers; mAP/NDS on "
          f"{args.data} ({'all' if args.limit is None else args.limit} scenes).", "", "## Sweep", "", *sweep_lines,
          "## tgGBC importance ablations (r=50%, n=2, k=175)", "",
          *markdown_table(["importance", "mAP", "NDS"], ablation), "",
          "## GPQ: one-shot ranking vs GPQPruner fine-tune", "",
          *markdown_table(["queries kept", "how", "mAP", "NDS"], gpq), "",
          "## int8 (ONNX Runtime CPU): mAP and tgGBC's kept keys vs fp32", "",
          *markdown_table(["model", "mAP", "kept keys = fp32 tgGBC's"], int8), ""]
    c.write_results(args.out / "demo_accuracy", {"facts": facts, "command": c.command_line(), "sweep": tables,
                                                 "ablation": ablation, "gpq": gpq, "int8": int8}, "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
