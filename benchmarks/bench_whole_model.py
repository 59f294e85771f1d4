"""Whole-model latency (images in, detections out) before and after tgGBC, fp32 / fp16 / int8.

The tgGBC paper's OrangePi table (Table 3) measured on this machine: FocalPETR-R18 1408x512
(16896 keys), r=12000 of them pruned; paper (OrangePi 5, ONNX Runtime): fp32 1605.28 ->
1406.66 ms (1.14x), fp16 1600.71 -> 1353.09 ms (1.18x).

Steps: build the preset's whole detector (ResNet backbone, neck, 3D position encoder, 6-layer
decoder; seeded random weights), export it with edgeprune's exporter (``--scope full``),
rewrite it with the tgGBC pass, convert the unpruned and the tgGBC model to every precision
asked for with the rewrite driver's ``precision=`` (fp16; int8 = static QDQ; int8-dynamic),
and time all the models (2 per precision) interleaved in one session. Speedups are paired
bootstrap intervals: tgGBC vs unpruned at each precision (the paper's pairs), and every model
vs unpruned fp32 (unpruned fp32 is always built: it is the reference). Also records each
model's output drift from the unpruned fp32 model on the model's own example images (random
weights: not an accuracy).

Static int8 calibration: the int8 pass's ``--data DIR`` path (``Int8Pass(data=...)``, read by
``edgeprune.passes.precision.int8.dataset_feeds``): ``--calib-scenes`` scenes (default 4) of an
``edgeprune dataset synth`` split at the preset's image size (seed 7), generated into the run's
temp dir; one calibration run per scene (batch 1), minmax ranges. Each int8 model is calibrated
on the graph it quantizes (the tgGBC one on the pruned graph). The pass quantizes MatMul/Gemm
with constant weights only: the backbone's and neck's Convs stay fp32.

Setting: r defaults to the paper's fraction 12000/16896 of the preset's keys (12000 at
1408x512, 3000 at 704x256); n=2 and k=175 are the paper's standard setting for its Table 1
rows (its Tables 4 and 9 match Table 1 at n=2), which Table 3 re-measures.

The export skips onnxsim by default: after onnxsim, the first decoder layer's queries are a
folded constant in a whole-model graph and the tgGBC pass finds no decoder (``--onnxsim`` to
try again).

    python benchmarks/bench_whole_model.py                 # 1408x512, 20 rounds of 8 models (~20 min)
    python benchmarks/bench_whole_model.py --quick         # 704x256, 5 rounds
    python benchmarks/bench_whole_model.py --precision fp16   # fp32 + fp16 only (the paper's table)
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

log = logging.getLogger("bench_whole_model")
PAPER = {"focalpetr-r18-1408x512": {"fp32": (1605.28, 1406.66), "fp16": (1600.71, 1353.09)}}
PAPER_KEYS, PAPER_R = 16896, 12000
PRECISIONS = ("fp32", "fp16", "int8", "int8-dynamic")
CALIB_SEED = 7


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="focalpetr-r18-1408x512", help="model preset with a ResNet backbone")
    p.add_argument("--r", type=int, default=None, help="keys pruned (default: 12000/16896 of the preset's keys)")
    p.add_argument("--n", type=int, default=2, help="pruning layers (default 2)")
    p.add_argument("--k", type=int, default=175, help="top queries for the importance (default 175)")
    p.add_argument("--precision", choices=(*PRECISIONS, "all"), default="all",
                   help="precision(s) to time beside unpruned/tgGBC fp32, the reference (default all)")
    p.add_argument("--calib-scenes", type=int, default=4,
                   help="synthetic scenes for static int8 calibration (default 4; one run each)")
    c.add_timing_arguments(p, warmup=2, repeats=20)
    p.add_argument("--onnxsim", action="store_true", help="simplify the export with onnxsim (see above)")
    p.add_argument("--quick", action="store_true", help="focalpetr-r18-704x256, 1 warm-up, 5 rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.preset = "focalpetr-r18-704x256" if args.preset == p.get_default("preset") else args.preset
        args.warmup, args.repeats = 1, min(args.repeats, 5)
    return args


def default_r(num_keys: int) -> int:
    """The paper's pruned fraction (12000 of 16896 keys) at another key count, to 100 keys."""
    return int(round(num_keys * PAPER_R / PAPER_KEYS, -2))


def precisions(choice: str) -> Sequence[str]:
    """The precisions to build: fp32 always (the reference), then the one asked for, or all."""
    return PRECISIONS if choice == "all" else tuple(dict.fromkeys(("fp32", choice)))


def precision_pass(prec: str, calib_dir: Optional[Path]) -> Any:
    """What ``rewrite(precision=...)`` takes: the name, or for static int8 a pass with its data."""
    if prec != "int8":
        return prec
    from edgeprune.passes.precision.int8 import Int8Pass

    return Int8Pass(data=str(calib_dir))


def calibration_scenes(work: Path, image_size: Sequence[int], scenes: int) -> Path:
    """A small synthetic split at the model's image size, for static int8 (the pass's --data)."""
    from edgeprune.data.synth import generate_dataset

    out = work / "calib"
    generate_dataset(str(out), scenes=scenes, seed=CALIB_SEED, image_size=tuple(image_size))
    return out


def build(args: argparse.Namespace, work: Path) -> Dict[str, Any]:
    """Export the detector and write its tgGBC and precision variants; returns paths, inputs, timings."""
    from edgeprune.methods.tggbc import TgGBCConfig
    from edgeprune.passes.keys.tggbc import KeyPruningPass

    model, exported = c.export_model(args.preset, "full", work / "base-fp32.onnx", simplify=args.onnxsim)
    args.r = default_r(model.preset.num_keys) if args.r is None else args.r
    tggbc = [KeyPruningPass(TgGBCConfig(r=args.r, n=args.n, k=args.k))]
    precs = precisions(args.precision)
    calib = calibration_scenes(work, model.preset.image_size, args.calib_scenes) if "int8" in precs else None
    paths: Dict[str, Path] = {}
    seconds: Dict[str, float] = {}
    for prec in precs:
        for variant, passes in (("base", []), ("tggbc", tggbc)):
            name = f"{variant}-{prec}"
            paths[name] = work / f"{name}.onnx"
            if name != "base-fp32":
                seconds[name] = c.timed_rewrite(exported.path, paths[name], passes,
                                                precision=precision_pass(prec, calib))
    feeds = {k: v.numpy() for k, v in model.example_inputs(batch=1, seed=1).items()}
    return {"paths": paths, "feeds": feeds, "num_keys": model.preset.num_keys, "rewrite_seconds": seconds,
            "export_seconds": exported.seconds, "image_size": model.preset.image_size}


def decoder_flops(path: Path, args: argparse.Namespace) -> Dict[str, Any]:
    from edgeprune.report.describe import describe_model

    est = describe_model(path, r=args.r, n=args.n, k=args.k).estimate
    return {"keys_per_layer": [layer.num_keys for layer in est.after.layers], "gflops_before": est.before.total / 1e9,
            "gflops_after": est.after.total / 1e9, "ideal_decoder_speedup": est.ideal_speedup}


# the table's speedup column: tgGBC vs unpruned at its precision, unpruned vs unpruned fp32
BASELINES = {**{f"tggbc-{p}": f"base-{p}" for p in PRECISIONS},
             **{f"base-{p}": "base-fp32" for p in PRECISIONS if p != "fp32"}}
VS_FP32 = {f"{v}-{p}": "base-fp32" for p in PRECISIONS for v in ("base", "tggbc") if (v, p) != ("base", "fp32")}
LABELS = {f"{v}-{p}": f"{name} {p}{' (static QDQ)' if p == 'int8' else ''}"
          for p in PRECISIONS for v, name in (("base", "unpruned"), ("tggbc", "tgGBC"))}


def ci(sp: Any) -> str:
    return f"{sp.ratio:.2f}x [{sp.ci_low:.2f}, {sp.ci_high:.2f}]"


def precision_lines(rows: List[c.Row], vs_fp32: List[c.Row], drift: Dict[str, Any]) -> List[str]:
    """One line per precision: both models' medians, tgGBC's speedup, both vs unpruned fp32, drift."""
    by, fp32 = {r.model: r for r in rows}, {r.model: r for r in vs_fp32}
    out = ["| precision | unpruned ms | tgGBC ms | tgGBC speedup (95% CI) | unpruned vs unpruned fp32 | "
           "tgGBC vs unpruned fp32 | cls drift, unpruned / tgGBC (last layer max abs) |", "|---|---|---|---|---|---|---|"]
    for prec in PRECISIONS:
        base, pruned = by.get(f"base-{prec}"), by.get(f"tggbc-{prec}")
        if base is None or pruned is None:
            continue
        d_base = drift.get(f"base-{prec}", {}).get("all_cls_scores", {}).get("max_abs_last_layer", 0.0)
        d_pruned = drift[f"tggbc-{prec}"]["all_cls_scores"]["max_abs_last_layer"]
        base_vs = ci(fp32[base.model].speedup) if fp32[base.model].speedup else "baseline"
        out.append(f"| {prec} | {base.stats.median:.1f} | {pruned.stats.median:.1f} | {ci(pruned.speedup)} | "
                   f"{base_vs} | {ci(fp32[pruned.model].speedup)} | {d_base:.3g} / {d_pruned:.3g} |")
    return out


def paper_lines(args: argparse.Namespace, rows: List[c.Row]) -> List[str]:
    """This machine's pairs beside the paper's OrangePi figures."""
    paper = PAPER.get(args.preset)
    by = {r.model: r for r in rows}
    out = ["| precision | unpruned ms (here) | tgGBC ms (here) | speedup here (95% CI) | paper (OrangePi 5) |",
           "|---|---|---|---|---|"]
    for prec in ("fp32", "fp16"):
        base, pruned = by.get(f"base-{prec}"), by.get(f"tggbc-{prec}")
        if base is None or pruned is None:
            continue
        sp = pruned.speedup
        ref = (f"{paper[prec][0]:.2f} -> {paper[prec][1]:.2f} ms ({paper[prec][0] / paper[prec][1]:.2f}x, "
               f"{(paper[prec][1] / paper[prec][0] - 1) * 100:+.2f}%)") if paper else "no published row"
        out.append(f"| {prec} | {base.stats.median:.1f} | {pruned.stats.median:.1f} | "
                   f"{sp.ratio:.2f}x [{sp.ci_low:.2f}, {sp.ci_high:.2f}] | {ref} |")
    return out


def drift_lines(drift: Dict[str, Any]) -> List[str]:
    out = ["| model | all_cls_scores max abs (last layer) | all_bbox_preds max abs (last layer) |", "|---|---|---|"]
    for name, d in drift.items():
        cls, box = d["all_cls_scores"], d["all_bbox_preds"]
        out.append(f"| {LABELS[name]} | {cls['max_abs']:.3g} ({cls['max_abs_last_layer']:.3g}) | "
                   f"{box['max_abs']:.3g} ({box['max_abs_last_layer']:.3g}) |")
    return out


def markdown(args: argparse.Namespace, facts: Dict[str, Any], rows: List[c.Row], vs_fp32: List[c.Row],
             built: Dict[str, Any], flops: Dict[str, Any], drift: Dict[str, Any], warnings: List[str]) -> str:
    w, h = built["image_size"]
    extra = {r.model: [ci(r.speedup) if r.speedup else "-"] for r in vs_fp32}
    calib = (f"Static int8 (QDQ, U8S8, per-channel 7-bit weights, MatMul/Gemm only: Convs stay fp32) calibrated "
             f"with the int8 pass's --data path on {args.calib_scenes} synthetic scenes "
             f"(`edgeprune dataset synth --scenes {args.calib_scenes} --seed {CALIB_SEED} --image-size {w}x{h}`, "
             "made in a temp dir), one run per scene." if "int8" in precisions(args.precision) else "")
    return "\n".join([
        f"# Whole model (images -> detections), {args.preset}: tgGBC r={args.r} n={args.n} k={args.k}", "",
        f"command: `{facts['command']}`", "", c.machine_line(facts), "",
        f"6 cameras x 3 x {h} x {w} images in, {built['num_keys']} keys; keys per decoder layer "
        f"{flops['keys_per_layer']}; decoder {flops['gflops_before']:.1f} -> {flops['gflops_after']:.1f} GFLOPs "
        f"(ideal decoder speedup {flops['ideal_decoder_speedup']:.2f}x). Export "
        f"{'with' if args.onnxsim else 'without'} onnxsim; {args.warmup} warm-up run(s) per model, then "
        "rounds of one run per model, in the table's order.", "",
        calib, "", *c.table(rows, extra, ["vs unpruned fp32 (95% CI)"]), *warnings, "",
        "Per precision:", "", *precision_lines(rows, vs_fp32, drift), "",
        "ideal / measured / ideal: not given for whole models: edgeprune counts decoder FLOPs only, not the "
        f"backbone's; the decoder's ideal {flops['ideal_decoder_speedup']:.2f}x bounds the whole model's from above.",
        "", "Paper's Table 3 beside this machine:", "", *paper_lines(args, rows), "",
        "Output drift from the unpruned fp32 model on the model's example images (seeded random weights: "
        "a numerical check, not mAP):", "", *drift_lines(drift), ""])


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    c.setup_logging(log.name)
    facts = dict(c.machine_facts(args.threads), command=c.command_line())
    with tempfile.TemporaryDirectory(prefix="bench-whole-") as tmp:
        built = build(args, Path(tmp))
        flops = decoder_flops(built["paths"]["base-fp32"], args)
        report = c.time_models(list(built["paths"].values()), warmup=args.warmup, repeats=args.repeats,
                               threads=args.threads, time_budget=args.time_budget)
        c.finish(facts)
        drift = c.output_drift(built["paths"]["base-fp32"],
                               {k: v for k, v in built["paths"].items() if k != "base-fp32"}, built["feeds"])
    rows = c.rows(report, LABELS, BASELINES)
    vs_fp32 = c.rows(report, LABELS, VS_FP32)
    text = markdown(args, facts, rows, vs_fp32, built, flops, drift, c.drift_warnings(report))
    result = {"benchmark": "whole_model", "args": vars(args), "machine": facts, "flops": flops, "drift": drift,
              "rewrite_seconds": built["rewrite_seconds"], "export_seconds": built["export_seconds"],
              "speedups": {r.model: asdict(r.speedup) if r.speedup else None for r in rows},
              "speedups_vs_unpruned_fp32": {r.model: asdict(r.speedup) if r.speedup else None for r in vs_fp32},
              "report": report.to_dict()}
    c.write_results(args.out / f"whole_model-{args.preset}{'-quick' if args.quick else ''}", result, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
