"""Per-op profile of a model: ORT kernel times aggregated by op type and by decoder layer.

The agent reports one row per node (``{"op_type", "node", "provider", "dur_us"}``, mean kernel
time per run). A node belongs to decoder layer ``i`` when its module path says so: the number
after ``layers.`` inside a ``decoder`` scope (or after the first ``layers.`` when no node has a
decoder scope). The module path is

* the node name, as the TorchScript exporter writes it (``/layers.3/cross_attn/MatMul``);
* with the graph at hand (:func:`graph_node_layers`, needs ``onnx``): the node's
  ``pkg.torch.onnx.name_scopes`` / ``namespace`` metadata, as the dynamo exporter writes it
  for nodes named ``node_MatMul_12``; the producers of the tensors that
  ``edgeprune.decoder_map`` (written by ``edgeprune export``) records per layer; and for
  nodes onnxsim renamed (``Gemm_4``), the layer of their producers.

Limit: a dynamo export whose node metadata was dropped (onnxsim does) has only the decoder
map's few tensors per layer to go by; most of its nodes then count as ``other``.

Nodes of no layer are summed as ``other``.
"""
from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence


log = logging.getLogger(__name__)

DECODER_MAP_KEY = "edgeprune.decoder_map"
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"   # node metadata of torch's dynamo exporter
NAMESPACE_KEY = "namespace"
_LAYER = re.compile(r"(?:^|[/._])layers?[._/](\d+)(?!\d)")
_DECODER_LAYER = re.compile(r"decoder.*?[/._]layers?[._/](\d+)(?!\d)")


@dataclass(frozen=True)
class ProfileRow:
    """Kernel time of one group (an op type or a layer), per run."""

    key: str
    total_us: float
    nodes: int
    share: float        # fraction of the model's total kernel time


@dataclass(frozen=True)
class ProfileSummary:
    model: str
    total_us: float
    by_op_type: tuple[ProfileRow, ...]   # slowest first
    by_layer: tuple[ProfileRow, ...]     # layer order, then "other"; empty when no layer is known


def layer_from_name(node: str, decoder_scoped: bool = False) -> int | None:
    """Decoder layer index in a node name (``/decoder/layers.3/...`` -> 3), or None."""
    match = (_DECODER_LAYER if decoder_scoped else _LAYER).search(node)
    return int(match.group(1)) if match else None


def _node_scope(node: Any) -> str:
    """The module path of a node: dynamo's name-scope metadata, else the node name."""
    meta = {p.key: p.value for p in node.metadata_props}
    return meta.get(NAME_SCOPES_KEY) or meta.get(NAMESPACE_KEY) or node.name


def _decoder_map_layers(model: Any) -> dict[str, int]:
    """Node name -> layer for the producers of the tensors ``edgeprune.decoder_map`` records."""
    text = next((p.value for p in model.metadata_props if p.key == DECODER_MAP_KEY), None)
    if not text:
        return {}
    try:
        layers = json.loads(text)["layers"]
        wanted = {ref["name"]: int(layer["index"]) for layer in layers for ref in layer.values()
                  if isinstance(ref, dict) and "name" in ref}
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring metadata %s of the profiled model: %s", DECODER_MAP_KEY, exc)
        return {}
    return {node.name: wanted[out] for node in model.graph.node for out in node.output if out in wanted}


def _is_scoped(node: Any) -> bool:
    """True when the node's module path is known (a ``/``-scoped name or dynamo metadata)."""
    return "/" in node.name or any(p.key in (NAME_SCOPES_KEY, NAMESPACE_KEY) for p in node.metadata_props)


def _propagate(node: Any, labels: Mapping[str, int | None], producers: Mapping[str, str]) -> int | None:
    """Layer of a generically named node (``Gemm_4``, renamed by onnxsim): its producers' layer
    when they agree on exactly one."""
    found = {labels.get(producers[i]) for i in node.input if i in producers} - {None}
    return found.pop() if len(found) == 1 else None


def graph_node_layers(path: str | Path) -> dict[str, int]:
    """Node name -> decoder layer, read from the graph (needs onnx).

    Sources, strongest first: producers of the tensors ``edgeprune.decoder_map`` records per
    layer; the module path of scoped nodes (name or dynamo metadata); and, in graphs that have
    scoped names, the producers' layer for generically named nodes (onnxsim renames the Gemm it
    fuses from MatMul + Add to ``Gemm_<n>``). Graph nodes are in topological order (ONNX rule),
    so producers are labelled before their consumers.
    """
    from edgeprune.graph.files import load_model    # one-line errors, protobuf whatever the suffix

    model = load_model(path, load_external_data=False)
    nodes = list(model.graph.node)
    anchors = _decoder_map_layers(model)
    scopes = {node.name: _node_scope(node) for node in nodes}
    decoder_scoped = any("decoder" in scope for scope in scopes.values())
    scoped_graph = any(_is_scoped(node) for node in nodes)
    producers = {out: node.name for node in nodes for out in node.output if out}
    labels: dict[str, int | None] = {}
    for node in nodes:
        if node.name in anchors:
            labels[node.name] = anchors[node.name]
        elif _is_scoped(node):
            labels[node.name] = layer_from_name(scopes[node.name], decoder_scoped)
        else:
            labels[node.name] = _propagate(node, labels, producers) if scoped_graph else None
    return {name: layer for name, layer in labels.items() if layer is not None and name}


def _rows(totals: Mapping[str, float], counts: Mapping[str, int], grand: float,
          keys: Sequence[str]) -> tuple[ProfileRow, ...]:
    return tuple(ProfileRow(k, totals[k], counts[k], totals[k] / grand if grand > 0 else 0.0) for k in keys)


def _mapped_layer(node: str, node_layers: Mapping[str, int], by_length: Sequence[str]) -> int | None:
    """Layer of a profiled node; ORT renames nodes it fuses (``fused node_linear``,
    ``<name>_<suffix>``), so those are looked up by the original name they start from."""
    if node in node_layers:
        return node_layers[node]
    bare = node[len("fused "):] if node.startswith("fused ") else node
    for name in by_length:
        if bare.startswith(name):
            return node_layers[name]
    return None


def _layer_keys(rows: Sequence[Mapping[str, Any]], node_layers: Mapping[str, int]) -> list[str | None]:
    nodes = [str(r["node"]) for r in rows]
    by_length = sorted(node_layers, key=len, reverse=True)
    scoped = any("decoder" in n for n in nodes)
    keys: list[str | None] = []
    for n in nodes:
        layer = _mapped_layer(n, node_layers, by_length)
        if layer is None:
            layer = layer_from_name(n, scoped)
        keys.append(None if layer is None else f"layer {layer}")
    return keys


def aggregate(rows: Sequence[Mapping[str, Any]], node_layers: Mapping[str, int] | None = None,
              model: str = "") -> ProfileSummary:
    """Group per-node rows by op type and by decoder layer.

    ``node_layers`` (from :func:`graph_node_layers`) takes precedence over node names.
    """
    grand = float(sum(float(r["dur_us"]) for r in rows))
    op_total: dict[str, float] = defaultdict(float)
    op_count: dict[str, int] = defaultdict(int)
    for r in rows:
        op_total[r["op_type"]] += float(r["dur_us"])
        op_count[r["op_type"]] += 1
    by_op = _rows(op_total, op_count, grand, sorted(op_total, key=lambda k: -op_total[k]))
    layer_total: dict[str, float] = defaultdict(float)
    layer_count: dict[str, int] = defaultdict(int)
    keys = _layer_keys(rows, node_layers or {})
    for r, key in zip(rows, keys):
        layer_total[key or "other"] += float(r["dur_us"])
        layer_count[key or "other"] += 1
    by_layer: tuple[ProfileRow, ...] = ()
    if any(k is not None for k in keys):
        order = sorted((k for k in layer_total if k != "other"), key=lambda k: int(k.split()[1]))
        by_layer = _rows(layer_total, layer_count, grand, order + (["other"] if "other" in layer_total else []))
    return ProfileSummary(model=model, total_us=grand, by_op_type=by_op, by_layer=by_layer)


def _format_rows(title: str, rows: Sequence[ProfileRow], width: int) -> list[str]:
    lines = [f"  {title:<{width}}  {'ms/run':>10}  {'share':>6}  {'nodes':>5}"]
    lines += [f"  {r.key:<{width}}  {r.total_us / 1000.0:>10.3f}  {r.share:>6.1%}  {r.nodes:>5}" for r in rows]
    return lines


def format_profile(summary: ProfileSummary, top: int = 15) -> str:
    """Terminal table: the ``top`` slowest op types, then the per-layer split if known."""
    lines = [f"profile of {summary.model}: {summary.total_us / 1000.0:.3f} ms kernel time per run"]
    shown = summary.by_op_type[:top]
    width = max([len("decoder layer")] + [len(r.key) for r in shown])
    lines += _format_rows("op type", shown, width)
    rest = summary.by_op_type[top:]
    if rest:
        lines.append(f"  ... {len(rest)} more op types, {sum(r.total_us for r in rest) / 1000.0:.3f} ms")
    if summary.by_layer:
        lines += _format_rows("decoder layer", summary.by_layer, width)
    return "\n".join(lines)
