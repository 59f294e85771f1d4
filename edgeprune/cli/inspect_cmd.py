"""Show the decoder edgeprune finds in an ONNX model, and FLOPs per layer before/after tgGBC.

Discovery uses the exporter's record when the model has one, otherwise it matches the graph
(any exporter, attention written by hand or as nn.MultiheadAttention, fused Attention ops).
FLOPs follow the tgGBC paper's appendix B (matrix products, scaling, softmax; per layer:
cross-attention, self-attention, FFN; plus the importance scoring when pruning).

examples:
  edgeprune inspect decoder.onnx
  edgeprune inspect decoder.onnx --r 21000 --n 2 --k 175
  edgeprune inspect decoder.onnx --json
  edgeprune inspect foreign.onnx --override layer.0.probs=/attn0/Softmax_output_0
"""
from __future__ import annotations

import argparse
import json
from typing import Any, List

from edgeprune.cli.args import add_key_count_arguments

NAME = "inspect"
HELP = "show the discovered decoder (layers, queries, keys, tensors) and FLOPs before/after pruning"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.onnx", help="ONNX model (decoder or whole detector)")
    add_key_count_arguments(parser.add_argument_group("tgGBC estimate (FLOPs after pruning, ideal speedup)"), k=0)
    parser.add_argument("--override", action="append", default=[], metavar="PART=TENSOR",
                        help="name a tensor discovery cannot find, e.g. layer.0.probs=NAME (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _g(flops: float) -> str:
    return f"{flops / 1e9:.3f}"


def _table(desc: Any) -> List[str]:
    s = desc.structure
    rows = [["layer", "keys", "self keys", "GFLOPs", "cross GFLOPs", "probs", "key input", "value input", "logits"]]
    for layer, flops in zip(s.layers, desc.flops.layers):
        b = desc.flops.batch
        rows.append([str(layer.index), str(layer.num_keys), str(desc.sizes.self_keys[layer.index] or "-"),
                     _g(flops.total * b), _g(flops.cross.total * b),
                     layer.probs.tensor or f"fused({layer.pv_node})",
                     ",".join(p.tensor for p in layer.key_inputs) or "?",
                     ",".join(p.tensor for p in layer.value_inputs) or "?",
                     layer.logits or ("recomputed (class head)" if layer.logits_recomputed else "?")])
    rows.append(["total", "", "", _g(desc.flops.total), _g(desc.flops.cross_total), "", "", "", ""])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]


def _head_lines(desc: Any) -> List[str]:
    """Which layers' logits are recomputed, and from where: the graph has only the last layer's head."""
    from edgeprune.report.describe import logits_source

    s = desc.structure
    head = s.class_head
    if head is None:
        return []
    lines = [f"class head: {len(head.nodes)} nodes from {head.entry} to {head.exit}"
             + (" (run once on every layer's stacked output)" if head.stacked else "")]
    lines += [f"  layer {layer.index} logits: {logits_source(s, layer)}" for layer in s.layers if layer.logits_recomputed]
    return lines


def _missing_lines(desc: Any) -> List[str]:
    """What tgGBC would still need, as the ready-to-paste flags its rewrite error gives."""
    from edgeprune.passes.discovery.guidance import LAYER_PARTS, missing_parts
    from edgeprune.passes.registry import get_method

    needs = get_method("tggbc").requires
    missing = missing_parts(desc.structure, [p for p in LAYER_PARTS if p in needs])
    if not missing:
        return []
    return [f"missing for --method tggbc: {len(missing)} part(s); name them with: "
            + " ".join(f"--override layer.{i}.{p}={t}" for i, p, t in missing)]


def _estimate_lines(desc: Any) -> List[str]:
    e = desc.estimate
    keys = [layer.num_keys for layer in e.after.layers]
    return [f"tgGBC r={e.r} n={e.n} k={e.k}: drops per layer {list(e.drops)}, keys per layer {keys}",
            f"  decoder GFLOPs {_g(e.before.total)} -> {_g(e.after.total)} ({-100 * e.reduction:.2f}%), "
            f"cross-attention {_g(e.before.cross_total)} -> {_g(e.after.cross_total)} "
            f"({-100 * e.cross_reduction:.2f}%), ideal speedup {e.ideal_speedup:.2f}x"]


def run(args: argparse.Namespace) -> int:
    from edgeprune.io import check_command_files
    from edgeprune.report.describe import describe_model

    check_command_files({"MODEL.onnx": args.model}, {})
    desc = describe_model(args.model, overrides=args.override, r=args.r, n=args.n, k=args.k)
    if args.json:
        print(json.dumps(desc.to_dict(), indent=2))
        return 0
    s = desc.structure
    print(f"{args.model}: decoder ({s.source}) with {s.num_layers} layers, {s.num_queries} queries, "
          f"{s.num_keys} keys, {s.num_heads} heads, width {s.embed_dims}, {s.num_classes} classes, "
          f"FFN {desc.sizes.ffn_dims or '?'}, batch {s.batch}")
    for line in _table(desc):
        print(line)
    for line in _head_lines(desc) + _missing_lines(desc):
        print(line)
    if desc.estimate is not None:
        for line in _estimate_lines(desc):
            print(line)
    return 0
