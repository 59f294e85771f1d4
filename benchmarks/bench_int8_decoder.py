"""int8 vs fp32 of the tgGBC-pruned decoder, side by side (ONNX Runtime CPU on this machine).

Exports a preset's decoder (``edgeprune export --scope decoder``), rewrites it with tgGBC
(default: StreamPETR-R50 704x256, 4224 keys, r=2000 n=1 k=900), then quantizes that
with ``--precision int8`` (static QDQ, calibrated on ``--calib-samples`` seeded random
decoder inputs, :mod:`edgeprune.passes.precision.int8`'s defaults) and
``--precision int8-dynamic``, and times the three interleaved in one ``edgeprune bench``
session (fp32 first: the speedup baseline). Also reports each int8 model's output
deviation from the fp32 tgGBC decoder relative to the output's range (max - min), on
inputs not used for calibration, and the share of the keys tgGBC keeps that match fp32's.
Writes ``<out>/int8_decoder-<preset>.json`` and ``.md``.

    python benchmarks/bench_int8_decoder.py --threads 1             # minutes
    python benchmarks/bench_int8_decoder.py --profile               # + where the time goes, Amdahl's bound
    python benchmarks/bench_int8_decoder.py --quick                 # smoke run: 2 layers, few repeats
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import _common as c            # puts the checkout on sys.path
from edgeprune.cli.args import add_key_count_arguments  # noqa: E402

log = logging.getLogger("bench_int8_decoder")
VARIANTS = ("int8", "int8-dynamic")
DEFAULT_SETTING = (2000, 1, 900)        # r, n, k; other settings get their own result files
# Op types of ORT's optimised CPU graphs, grouped for "where the time goes". Weight GEMMs are what
# int8 speeds up (with their quantize/dequantize work); the attention products (q k^T, p v: two
# activations, kept float by the pass) and Softmax are not; everything else is "other". A MatMul
# (or the FusedMatMul ORT makes of it, named "<node>/MatMulScaleFusion/") is a weight GEMM when
# its B input is a constant in the model file: bias-free projections stay MatMul in fp32.
WEIGHT_GEMMS = frozenset({"Gemm", "FusedGemm", "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                          "MatMulInteger", "QLinearMatMul", "QuantizeLinear", "DequantizeLinear",
                          "DynamicQuantizeLinear"})
MATMULS = frozenset({"MatMul", "FusedMatMul"})
ATTENTION = MATMULS | {"Softmax"}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="streampetr-r50-704x256")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's 6)")
    add_key_count_arguments(p, **dict(zip("rnk", DEFAULT_SETTING)))
    p.add_argument("--calib-samples", type=int, default=4, help="random calibration feeds for static int8")
    p.add_argument("--eval-seeds", type=int, default=3, help="input seeds the deviation is measured on")
    c.add_timing_arguments(p, warmup=2, repeats=15)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 layers, 1 warm-up + 3 timed runs")
    p.add_argument("--profile", action="store_true",
                   help="also profile each model (ORT per-node kernel times) and report where the time goes")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.warmup, args.repeats = args.layers or 2, 1, 3
    return args


def feeds(model_path: Path, seed: int) -> Dict[str, Any]:
    """Seeded decoder inputs: N(0, 1), reference points in [0, 1) (as the export's examples)."""
    import numpy as np
    import onnx

    rng = np.random.default_rng(seed)
    graph = onnx.load(str(model_path), load_external_data=False).graph
    out = {}
    for value in graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        out[value.name] = (rng.random(shape) if value.name == "prev_ref" else rng.standard_normal(shape)).astype(np.float32)
    return out


def build(args: argparse.Namespace, work: Path) -> Dict[str, Any]:
    """Export, tgGBC, and the two int8 rewrites of the tgGBC decoder; paths and seconds."""
    import numpy as np

    from edgeprune.methods.tggbc import TgGBCConfig
    from edgeprune.passes.keys.tggbc import KeyPruningPass
    from edgeprune.passes.precision.int8 import Int8DynamicPass, Int8Pass

    base, pruned = work / "decoder.onnx", work / "tggbc-fp32.onnx"
    c.export_model(args.preset, "decoder", base, layers=args.layers)
    tggbc = KeyPruningPass(TgGBCConfig(r=args.r, n=args.n, k=args.k))
    seconds = {"tggbc": c.timed_rewrite(base, pruned, [tggbc])}
    samples = [feeds(base, 1000 + i) for i in range(args.calib_samples)]
    calib = work / "calib.npz"
    np.savez(calib, **{k: np.stack([s[k] for s in samples]) for k in samples[0]})
    paths = {"fp32": pruned}
    for name, precision in (("int8", Int8Pass(calib=str(calib))), ("int8-dynamic", Int8DynamicPass())):
        paths[name] = work / f"tggbc-{name}.onnx"
        seconds[name] = c.timed_rewrite(base, paths[name], [tggbc], precision=precision)
    weights = {p.stem: weight_matmuls(p) for p in paths.values()} if args.profile else {}
    return {"paths": paths, "seconds": seconds, "weights": weights}


def fidelity(paths: Dict[str, Path], seeds: int) -> Dict[str, Dict[str, float]]:
    """Per int8 variant: max |dev| / range of each output and the kept-key share, worst over seeds."""
    import numpy as np
    import onnx

    from edgeprune.graph.run import cpu_session

    ref_model = onnx.load(str(paths["fp32"]))
    kept = [n.output[1] for n in ref_model.graph.node if n.name.startswith("tggbc/") and n.op_type == "TopK"
            and "keep" in n.name]
    out: Dict[str, Dict[str, float]] = {v: {} for v in VARIANTS}
    for seed in range(seeds):
        x = feeds(paths["fp32"], seed)
        ref = _run(paths["fp32"], x, kept, cpu_session)
        for v in VARIANTS:
            got = _run(paths[v], x, kept, cpu_session)
            for k in c.OUTPUTS:
                dev = float(np.abs(got[k] - ref[k]).max() / (ref[k].max() - ref[k].min()))
                out[v][k] = max(out[v].get(k, 0.0), dev)
            shares = [len(set(ref[t].ravel().tolist()) & set(got[t].ravel().tolist())) / ref[t].size for t in kept]
            out[v]["kept_keys_share"] = min(out[v].get("kept_keys_share", 1.0), *shares)
    return out


def _run(path: Path, x: Dict[str, Any], extra: List[str], session: Any) -> Dict[str, Any]:
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    model.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in extra)
    sess = session(model, optimize=True)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, x)))


def weight_matmuls(path: Path) -> frozenset:
    """Names of the model's MatMul nodes whose B input (the weight) is a constant: the weight
    GEMMs as the int8 sensitivity probe finds them."""
    import onnx

    from edgeprune.passes.precision.sensitivity import candidates

    graph = onnx.load(str(path), load_external_data=False).graph
    return frozenset(n.name for n in candidates(graph, ("MatMul",), set()))


def time_split(rows: Sequence[Mapping[str, Any]], weights: frozenset) -> Dict[str, float]:
    """Kernel ms per run of one profiled model (per-node rows): weight GEMMs, attention + Softmax, other."""
    split = {"weight GEMMs": 0.0, "attention + Softmax": 0.0, "other": 0.0}
    for row in rows:
        op, node = row["op_type"], str(row["node"])
        weight = op in WEIGHT_GEMMS or (op in MATMULS and node.split("/MatMulScaleFusion")[0] in weights)
        group = "weight GEMMs" if weight else "attention + Softmax" if op in ATTENTION else "other"
        split[group] += float(row["dur_us"]) / 1000.0
    return split


def amdahl(fp32: Dict[str, float], int8: Dict[str, float]) -> Dict[str, float]:
    """What int8 of the weight GEMMs alone can give: their measured speedup, and the whole
    decoder's speedup if they cost nothing at all (Amdahl's bound: the rest stays float)."""
    total = sum(fp32.values())
    gemm = fp32["weight GEMMs"]
    return {"gemm_speedup": gemm / int8["weight GEMMs"] if int8["weight GEMMs"] else float("nan"),
            "bound_free_gemms": total / (total - gemm) if total > gemm else float("nan"),
            "float_share": fp32["attention + Softmax"] / total}


def profile_lines(report: Any, labels: Dict[str, str],
                  weights: Mapping[str, frozenset]) -> Tuple[List[str], Dict[str, Any]]:
    """Markdown table of the time split per model, and the bound against the fp32 model."""
    splits = {m.name: time_split(m.profile, weights[m.name])
              for m in report.models if m.profile is not None and m.name in weights}
    if "tggbc-fp32" not in splits:
        return [], {}
    groups = list(splits["tggbc-fp32"])
    lines = ["", "Where the time goes (ORT per-node kernel ms per run, each model profiled in its own session):", "",
             "| model | " + " | ".join(groups) + " | total |", "|---|" + "---|" * (len(groups) + 1)]
    lines += [f"| {labels.get(n, n)} | " + " | ".join(f"{v[g]:.1f}" for g in groups) + f" | {sum(v.values()):.1f} |"
              for n, v in splits.items()]
    bounds = {n: amdahl(splits["tggbc-fp32"], v) for n, v in splits.items() if n != "tggbc-fp32"}
    for n, b in bounds.items():
        lines.append(f"- {labels.get(n, n)}: weight GEMMs {b['gemm_speedup']:.2f}x faster than fp32's; "
                     f"attention + Softmax are {b['float_share']:.0%} of the fp32 decoder and stay float, so "
                     f"even free weight GEMMs (the rest unchanged) give at most {b['bound_free_gemms']:.2f}x (Amdahl).")
    return lines, {"splits_ms": splits, "bounds": bounds}


def without_node_rows(report: Dict[str, Any]) -> Dict[str, Any]:
    """The report minus each model's per-node profile rows (thousands; the per-op summary stays)."""
    for model in report["models"]:
        model.pop("profile", None)
    return report


def markdown(args: argparse.Namespace, facts: Dict[str, Any], rows: List[c.Row], built: Dict[str, Any],
             fid: Dict[str, Dict[str, float]], warnings: List[str], profile: List[str]) -> str:
    extra = {f"tggbc-{v}": [f"{fid[v]['all_cls_scores']:.3f}", f"{fid[v]['all_bbox_preds']:.3f}",
                            f"{fid[v]['kept_keys_share'] * 100:.1f}%", f"{built['seconds'][v]:.1f}"] for v in VARIANTS}
    extra["tggbc-fp32"] = ["0", "0", "100%", f"{built['seconds']['tggbc']:.1f}"]
    return "\n".join([
        f"# int8 tgGBC decoder: {args.preset}, {args.layers or 6} layers, r={args.r} n={args.n} k={args.k}",
        "", f"command: `{facts['command']}`", "", c.machine_line(facts), "",
        f"Batch 1; {args.warmup} warm-up run(s) per model, then rounds of one run per model (fp32, int8, "
        "int8-dynamic) in one `edgeprune bench` session; speedups: paired bootstrap against fp32 tgGBC.", "",
        *c.table(rows, extra, ["cls dev / range", "box dev / range", "kept keys = fp32", "rewrite s"]),
        *warnings, *profile, "",
        f"Deviation: max |int8 - fp32| over all layers / (max - min of fp32), worst of {args.eval_seeds} input seeds "
        f"not used for calibration (static int8: {args.calib_samples} random calibration feeds, minmax). Kept keys: "
        "share of the keys tgGBC keeps in int8 that fp32 keeps too (worst seed). Weights are seeded random, so this "
        "says how far int8 moves the outputs, not what it does to mAP.", ""])


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    c.setup_logging(log.name)
    facts = dict(c.machine_facts(args.threads), command=c.command_line())
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        built = build(args, Path(tmp))
        fid = fidelity(built["paths"], args.eval_seeds)
        facts["load_start"] = c.load_average()        # the timing's own start (the rewrites came first)
        report = c.time_models(list(built["paths"].values()), warmup=args.warmup, repeats=args.repeats,
                               threads=args.threads, time_budget=args.time_budget, profile=args.profile)
        c.finish(facts)
    labels = {"tggbc-fp32": "tgGBC fp32", "tggbc-int8": "tgGBC int8 (static QDQ)",
              "tggbc-int8-dynamic": "tgGBC int8-dynamic"}
    rows = c.rows(report, labels, {"tggbc-int8": "tggbc-fp32", "tggbc-int8-dynamic": "tggbc-fp32"})
    profile, split = profile_lines(report, labels, built["weights"])
    text = markdown(args, facts, rows, built, fid, c.drift_warnings(report), profile)
    result = {"benchmark": "int8_decoder", "args": vars(args), "machine": facts, "seconds": built["seconds"],
              "fidelity": fid, "speedups": [asdict(r.speedup) for r in rows if r.speedup is not None],
              "time_split": split,
              "report": without_node_rows(report.to_dict())}
    setting = "" if (args.r, args.n, args.k) == DEFAULT_SETTING else f"-r{args.r}-n{args.n}-k{args.k}"
    setting += f"-{args.layers}layers" if args.layers and not args.quick else ""
    c.write_results(args.out / f"int8_decoder-{args.preset}{setting}{'-quick' if args.quick else ''}", result, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
