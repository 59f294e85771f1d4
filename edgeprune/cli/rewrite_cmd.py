"""Rewrite an exported model with a graph pass: tgGBC key pruning, GPQ query shrinking, ToMe, random, fp16, int8.

The decoder is found automatically (the exporter's record, or by matching the graph);
--override names any tensor it cannot find. The result is checked (onnx.checker, ONNX
Runtime) and run against the input model on the same inputs; the drift of every output is
printed. The output is written atomically: on any error no file is left behind.

examples:
  edgeprune rewrite decoder.onnx -o pruned.onnx --method tggbc --r 21000 --n 2 --k 175
  edgeprune rewrite decoder.onnx -o random.onnx --method random --r 21000 --n 2 --seed 0
  edgeprune rewrite decoder.onnx -o small.onnx --method gpq --keep-indices kept.json
  edgeprune rewrite decoder.onnx -o half.onnx --precision fp16
  edgeprune rewrite decoder.onnx -o q.onnx --method tggbc --r 2000 --precision int8 --calib calib.npz
  edgeprune rewrite full.onnx -o q.onnx --precision int8 --data scenes/
  edgeprune rewrite decoder.onnx -o q.onnx --precision int8-dynamic
  edgeprune rewrite foreign.onnx -o pruned.onnx --method tggbc --r 1000 \\
      --override layer.0.logits=/head/cls_0/Add_output_0
  edgeprune rewrite dynamic_batch.onnx -o pruned.onnx --method tggbc --r 1000 --inputs batch2.npz
"""
from __future__ import annotations

import argparse

NAME = "rewrite"
HELP = "prune / shrink / convert an ONNX model with graph passes (tgGBC, GPQ, ToMe, random, fp16, int8)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from edgeprune.cli.args import add_calibration_arguments, add_input_arguments, add_key_count_arguments
    from edgeprune.passes import registry

    parser.add_argument("model", metavar="IN.onnx", help="model to rewrite")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="where to write the result")
    parser.add_argument("--method", choices=registry.method_names(), default="none",
                        help="graph pass to apply (default: none)")
    parser.add_argument("--precision", choices=registry.precision_names(), default="fp32",
                        help="number format of the result (default fp32)")
    parser.add_argument("--override", action="append", default=[], metavar="PART=TENSOR",
                        help="name a tensor discovery cannot find: layer.N.{probs,key,value,mask,logits}=TENSOR, "
                             "cls_output=NAME, heads=H (repeatable)")
    check = parser.add_argument_group("verification")
    check.add_argument("--no-verify", action="store_true", help="skip running both models and comparing outputs")
    add_input_arguments(check, purpose="verification inputs (their sizes also fix symbolic input sizes)")
    add_key_count_arguments(parser.add_argument_group("key reduction (--method tggbc, tome, random)"))
    add_calibration_arguments(parser.add_argument_group("calibration (--method gpq --keep-queries, --precision int8)"))
    registry.add_pass_arguments(parser)


def _refuse_unused_key_counts(args: argparse.Namespace) -> None:
    """--r/--n/--k belong to the key-reduction methods; elsewhere they used to be ignored silently."""
    from edgeprune.errors import ParameterError
    from edgeprune.passes import registry
    from edgeprune.passes.keys.feed import KeyReductionPass

    given = [f"--{flag} {value}" for flag, value in (("r", args.r), ("n", args.n), ("k", args.k)) if value is not None]
    if given and not issubclass(registry.get_method(args.method), KeyReductionPass):
        users = [m for m in registry.method_names() if issubclass(registry.get_method(m), KeyReductionPass)]
        raise ParameterError(f"{' '.join(given)} has no effect with --method {args.method}; key counts are for "
                             f"--method {' / '.join(users)}")


def _refuse_unused_calibration(args: argparse.Namespace) -> None:
    """--calib/--data calibrate GPQ's one-shot ranking or static int8; elsewhere they would be ignored."""
    from edgeprune.errors import ParameterError

    given = [flag for flag, value in (("--calib", args.calib), ("--data", args.data)) if value is not None]
    gpq_reads = args.method == "gpq" and getattr(args, "keep_queries", None) is not None and args.data is None
    sensitivity = getattr(args, "int8_sensitivity", None) is not None
    if sensitivity and args.precision not in ("int8", "int8-dynamic"):
        raise ParameterError(f"--int8-sensitivity has no effect with --precision {args.precision}; it is for "
                             "--precision int8 / int8-dynamic")
    probes = args.precision == "int8-dynamic" and sensitivity
    if given and args.precision != "int8" and not gpq_reads and not probes:
        raise ParameterError(f"{' '.join(given)} has no effect here; calibration is for --precision int8 "
                             "(--calib X.npz or --data DIR), --precision int8-dynamic --int8-sensitivity TOL "
                             "and --method gpq --keep-queries K --calib X.npz")


def run(args: argparse.Namespace) -> int:
    from edgeprune.io import check_command_files
    from edgeprune.passes import registry
    from edgeprune.passes.driver import rewrite
    from edgeprune.passes.verify import load_inputs

    check_command_files({"IN.onnx": args.model, "--inputs": args.inputs, "--calib": args.calib,
                         "--keep-indices": getattr(args, "keep_indices", None)}, {"-o": args.output})
    _refuse_unused_key_counts(args)
    _refuse_unused_calibration(args)
    passes = registry.build_passes(args)
    precision_cls = registry.get_precision(args.precision)
    precision = precision_cls.from_args(args) if precision_cls is not None else "fp32"
    inputs = load_inputs(args.inputs) if args.inputs else None
    report = rewrite(args.model, args.output, passes, overrides=args.override, precision=precision,
                     verify=not args.no_verify, seed=args.seed, verify_inputs=inputs)
    for line in report.lines():
        print(line)
    return 0
