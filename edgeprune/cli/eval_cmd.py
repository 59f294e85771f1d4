"""Score an ONNX detector on a dataset with nuScenes' detection metrics.

Runs a whole-model export (input `images`; any edgeprune rewrite of it, any precision)
over every scene of a dataset made by `edgeprune dataset synth`, decodes the last decoder
layer (PETR's top-300 (query, class) pairs) and reports mAP over centre-distance thresholds
0.5 / 1 / 2 / 4 m, AP per class, the TP errors that apply (ATE m, ASE 1-IoU, AOE rad) and
NDS over them. Definitions: nuscenes-devkit's (edgeprune/evaluation/metrics.py).

examples:
  edgeprune eval full.onnx --data scenes-test
  edgeprune eval full_tggbc.onnx --data scenes-test --json metrics.json
"""
from __future__ import annotations

import argparse
import json

NAME = "eval"
HELP = "detection accuracy (nuScenes mAP, NDS, TP errors) of an ONNX model on a dataset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from edgeprune.evaluation.evaluate import MIN_VISIBLE_PIXELS, TOP_N

    parser.add_argument("model", metavar="MODEL.onnx", help="whole-model ONNX export (input 'images')")
    parser.add_argument("--data", required=True, metavar="DIR", help="dataset directory (edgeprune dataset synth)")
    parser.add_argument("--json", default=None, metavar="F", help="also write the metrics as JSON to F")
    parser.add_argument("--top", type=int, default=TOP_N, help=f"detections kept per scene (default {TOP_N})")
    parser.add_argument("--min-visible-pixels", type=int, default=MIN_VISIBLE_PIXELS,
                        help=f"ground truth needs this many unoccluded pixels (default {MIN_VISIBLE_PIXELS})")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N scenes only")


def metric_lines(m) -> list[str]:
    """The table ``eval`` prints: summary, then one row per class."""
    errors = m.mean_tp_errors
    lines = [f"mAP {m.mean_ap:.4f}   NDS {m.nds:.4f}   mATE {errors['trans_err']:.4f}   "
             f"mASE {errors['scale_err']:.4f}   mAOE {errors['orient_err']:.4f}   ({m.num_samples} scenes)",
             f"{'class':<14}{'GT':>6}{'AP':>8}" + "".join(f"{'AP@' + str(d):>9}" for d in next(iter(m.ap.values())))
             + f"{'ATE':>8}{'ASE':>8}{'AOE':>8}"]
    for name in m.class_names:
        tp = m.tp_errors[name]
        lines.append(f"{name:<14}{m.num_gt[name]:>6}{m.class_ap[name]:>8.4f}"
                     + "".join(f"{v:>9.4f}" for v in m.ap[name].values())
                     + "".join(f"{tp[k]:>8.4f}" for k in ("trans_err", "scale_err", "orient_err")))
    return lines


def run(args: argparse.Namespace) -> int:
    from edgeprune.cli.progress import progress_bar
    from edgeprune.evaluation.evaluate import evaluate_model
    from edgeprune.io import check_command_files, write_report

    check_command_files({"MODEL.onnx": args.model}, {"--json": args.json}, stdout=("--json",))
    with progress_bar(None, unit="scene") as progress:
        metrics = evaluate_model(args.model, args.data, top_n=args.top, min_visible_pixels=args.min_visible_pixels,
                                 limit=args.limit, progress=progress)
    for line in metric_lines(metrics):
        print(line)
    if args.json:
        write_report(args.json, json.dumps(dict(metrics.to_dict(), model=args.model, data=args.data), indent=1) + "\n", suffix=".json")
    return 0
