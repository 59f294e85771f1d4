"""Export a preset (decoder alone or whole detector) to ONNX, validated against PyTorch.

Examples:
  edgeprune export --list-models
  edgeprune export --model streampetr-r50-704x256 --scope decoder -o decoder.onnx
  edgeprune export --model streampetr-r50-704x256 -o decoder.onnx --exporter dynamo
  edgeprune export --model focalpetr-r18-704x256 --scope full -o full.onnx
  edgeprune export --model petr-r50-800x320 -o small.onnx --layers 2 --attention torch

The graph is traced with static shapes (batch from --batch), simplified with onnxsim when
installed, checked with onnx.checker, loaded in ONNX Runtime and compared with PyTorch on
seeded inputs; the comparison table is printed and a failure exits 1 (the file is not
written) unless --no-validate. The decoder structure (per-layer attention probabilities,
key/value inputs, class logits, query tensors) is stored in the model's metadata under
'edgeprune.decoder_map' for `edgeprune rewrite`.
"""
from __future__ import annotations

import argparse
import logging

from edgeprune.errors import ParameterError

NAME = "export"
HELP = "export a model preset to a validated ONNX file"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to export")
    what.add_argument("--model", metavar="PRESET", help="model preset (see --list-models)")
    what.add_argument("--scope", choices=("decoder", "full"), default="decoder",
                      help="decoder: the transformer head (inputs memory, key_pos); "
                           "full: images [B, 6, 3, H, W] through backbone and head (default: decoder)")
    what.add_argument("--checkpoint", metavar="PATH", help="torch state dict to load (default: seeded random weights)")
    what.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default: 0)")
    what.add_argument("--attention", choices=("manual", "torch"), default=None,
                      help="attention as MatMul/Softmax code (manual) or nn.MultiheadAttention (torch); "
                           "default: the preset's (manual)")
    what.add_argument("--layers", type=int, metavar="N", help="decoder layers (default: the preset's, 6)")
    what.add_argument("--list-models", action="store_true", help="print the presets and exit")
    how = parser.add_argument_group("how to export")
    how.add_argument("-o", "--output", metavar="OUT.onnx", help="output file")
    how.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                     help="torch.onnx exporter (default: torchscript)")
    how.add_argument("--opset", type=int, metavar="N", help="ONNX opset (default: 17 torchscript, 18 dynamo)")
    how.add_argument("--batch", type=int, default=1, metavar="N", help="static batch size (default: 1)")
    how.add_argument("--no-simplify", action="store_true", help="skip onnxsim")
    how.add_argument("--no-validate", action="store_true", help="skip the comparison with PyTorch")
    how.add_argument("--tolerance", type=float, default=1e-4, metavar="T",
                     help="max absolute difference allowed per output (default: 1e-4)")


def format_presets() -> str:
    """The presets as a table (name, family, backbone, image size, keys, queries, full scope)."""
    from edgeprune.models.presets import list_presets

    header = ("preset", "family", "backbone", "image WxH", "keys", "queries", "full export")
    rows = []
    for p in list_presets():
        d = p.decoder
        queries = f"{d.num_queries}+{d.num_propagated}" if d.num_propagated else str(d.num_queries)
        full = "yes" if p.supports_full_export else "no"
        rows.append((p.name, p.family, p.backbone, "x".join(map(str, p.image_size)), str(p.num_keys), queries, full))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.append("full export: a backbone we implement (ResNet-18/50/101); other presets export with --scope decoder")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.list_models:
        print(format_presets())
        return 0
    if not args.model or not args.output:
        missing = " and ".join(flag for flag, value in (("--model", args.model), ("-o/--output", args.output))
                               if not value)
        raise ParameterError(f"{missing} required, e.g. edgeprune export --model streampetr-r50-704x256 "
                             "-o decoder.onnx (presets: edgeprune export --list-models)")
    from edgeprune.export.exporter import resolve_options
    from edgeprune.io import check_command_files
    from edgeprune.models.presets import get_preset

    # Everything cheap to check is checked before the model is built and traced.
    resolve_options(args.exporter, args.opset, args.batch, args.tolerance)
    preset = get_preset(args.model)
    check_command_files({"--checkpoint": args.checkpoint}, {"-o": args.output})
    if args.layers is not None and args.layers < 1:
        raise ParameterError(f"--layers must be >= 1 (got {args.layers}); the preset has {preset.decoder.num_layers}")
    return _export(args, preset)


def _export(args: argparse.Namespace, preset: object) -> int:
    from edgeprune.export.exporter import export_onnx
    from edgeprune.export.validate import ExportValidationError
    from edgeprune.models.build import build_model

    log.info("building %s (%s scope%s)", args.model, args.scope,
             f", checkpoint {args.checkpoint}" if args.checkpoint else f", seed {args.seed}")
    model = build_model(preset, args.scope, seed=args.seed, checkpoint=args.checkpoint,
                        attention=args.attention, num_layers=args.layers)
    try:
        report = export_onnx(model, args.output, exporter=args.exporter, opset=args.opset, batch=args.batch,
                             seed=args.seed, simplify=not args.no_simplify, validate=not args.no_validate,
                             tolerance=args.tolerance)
    except ExportValidationError as exc:
        print(exc.report.format())
        raise
    print(report.validation.format() if report.validation else "validation against torch skipped (--no-validate)")
    dmap = report.decoder_map
    if dmap is not None:
        probs = "recorded" if dmap.probs_present else "not a separate tensor"
        print(f"decoder map: {dmap.num_layers} layers, {dmap.num_queries} queries, {dmap.num_keys} keys, "
              f"attention probabilities {probs}, {len(dmap.query_tensors)} query tensors")
    print(report.summary())
    return 0
