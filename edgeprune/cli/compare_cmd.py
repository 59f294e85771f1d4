"""Compare two ONNX detectors: numeric drift per output and detection-level agreement.

Both models run on the same inputs: the scenes of a dataset (--data; whole-model exports)
or one .npz of arrays by input name (--inputs; any export, missing inputs seeded random).
Reported: each output's max abs / rel drift, and, on the last layer's top-N queries by
score matched by BEV centre distance, the overlap (matched fraction), max score drift,
class agreement and mean centre / size / heading error. Exit code 0 when every threshold
holds, 1 when one fails (the failures are printed), 2 on bad input.

examples:
  edgeprune compare full.onnx full_tggbc.onnx --data scenes-test
  edgeprune compare d.onnx d_fp16.onnx --inputs x.npz --max-score-drift 0.01 --json cmp.json
"""
from __future__ import annotations

import argparse
import json

NAME = "compare"
HELP = "numeric drift and detection agreement of two ONNX models, pass/fail by thresholds"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from edgeprune.evaluation.compare import Thresholds

    d = Thresholds()
    parser.add_argument("model_a", metavar="A.onnx", help="reference model")
    parser.add_argument("model_b", metavar="B.onnx", help="model compared with it (e.g. a rewrite)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="DIR", help="dataset directory (edgeprune dataset synth)")
    src.add_argument("--inputs", metavar="X.npz", help="input arrays by name")
    parser.add_argument("--json", default=None, metavar="F", help="also write the report as JSON to F")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="use the first N scenes only")
    parser.add_argument("--seed", type=int, default=0, help="seed of inputs missing from --inputs (default 0)")
    parser.add_argument("--top", type=int, default=100, help="queries compared per sample (default 100)")
    parser.add_argument("--match-distance", type=float, default=1.0, metavar="M",
                        help="max BEV centre distance of a match, metres (default 1.0)")
    th = parser.add_argument_group("pass/fail thresholds")
    th.add_argument("--min-overlap", type=float, default=d.min_overlap, help=f"(default {d.min_overlap})")
    th.add_argument("--max-score-drift", type=float, default=d.max_score_drift, help=f"(default {d.max_score_drift})")
    th.add_argument("--min-class-agreement", type=float, default=d.min_class_agreement,
                    help=f"(default {d.min_class_agreement})")
    th.add_argument("--max-center-error", type=float, default=d.max_center_error,
                    help=f"mean, metres (default {d.max_center_error})")
    th.add_argument("--max-abs", type=float, default=None, help="max abs drift of any output (default: not checked)")


def report_lines(report) -> list[str]:
    a = report.agreement
    lines = [f"inputs: {report.inputs}"] + [f"  {d.describe()}" for d in report.drift]
    lines += [f"detections (top {a.top_n} queries, {a.samples} samples): overlap {a.overlap:.4f}, "
              f"score drift {a.score_drift:.4g}, class agreement {a.class_agreement:.4f}, "
              f"centre error {a.center_error:.4g} m, size error {a.size_error:.4g}, heading error {a.yaw_error:.4g} rad"]
    lines += [f"FAIL: {f}" for f in report.failures] or ["PASS"]
    return lines


def run(args: argparse.Namespace) -> int:
    from edgeprune.cli.progress import progress_bar
    from edgeprune.evaluation.compare import Thresholds, compare_detectors
    from edgeprune.io import check_command_files, write_report
    from edgeprune.passes.verify import load_inputs

    check_command_files({"A.onnx": args.model_a, "B.onnx": args.model_b, "--inputs": args.inputs},
                        {"--json": args.json}, stdout=("--json",))
    th = Thresholds(args.min_overlap, args.max_score_drift, args.min_class_agreement, args.max_center_error, args.max_abs)
    inputs = load_inputs(args.inputs) if args.inputs else None
    with progress_bar(None, unit="scene") as progress:
        report = compare_detectors(args.model_a, args.model_b, data=args.data, inputs=inputs, top_n=args.top,
                                   match_distance=args.match_distance, thresholds=th, limit=args.limit,
                                   seed=args.seed, progress=progress)
    for line in report_lines(report):
        print(line)
    if args.json:
        write_report(args.json, json.dumps(dict(report.to_dict(), model_a=args.model_a, model_b=args.model_b), indent=1) + "\n", suffix=".json")
    return 0 if report.passed else 1
