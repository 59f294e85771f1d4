"""Per-op profile of a model: ORT kernel times aggregated by op type and by decoder layer.

The agent reports one row per node (``{"op_type", "node", "provider", "dur_us"}``, mean kernel
time per run). A node belongs to decoder layer ``i`` when

1. the model's metadata ``edgeprune.decoder_map`` (JSON written by ``edgeprune export``) names
   it: every string in ``layers[i]`` that equals a node name, and every node whose name starts
   with ``layers[i]["scope"]`` when the map gives a scope; or otherwise
2. its name carries the layer's module path, as the TorchScript exporter writes it
   (``/transformer/decoder/layers.3/attentions.1/MatMul``): the number after ``layers.``
   inside a ``decoder`` scope, or after the first ``layers.`` when no name has a decoder scope.

Nodes of no layer are summed as ``other``.
"""
from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

log = logging.getLogger(__name__)

DECODER_MAP_KEY = "edgeprune.decoder_map"
_LAYER = re.compile(r"(?:^|[/._])layers?[._/](\d+)(?=[/._:]|$)")
_DECODER_LAYER = re.compile(r"decoder.*?[/._]layers?[._/](\d+)(?=[/._:]|$)")


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


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def layers_from_metadata(metadata: Mapping[str, str], nodes: Sequence[str]) -> dict[str, int]:
    """Node name -> layer index from ``edgeprune.decoder_map``; {} when absent or unusable."""
    text = metadata.get(DECODER_MAP_KEY)
    if not text:
        return {}
    try:
        layers = json.loads(text)["layers"]
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring metadata %s: not JSON with a 'layers' list (%s)", DECODER_MAP_KEY, exc)
        return {}
    names = set(nodes)
    mapping: dict[str, int] = {}
    for position, layer in enumerate(layers):
        index = int(layer.get("index", position)) if isinstance(layer, Mapping) else position
        scope = layer.get("scope") if isinstance(layer, Mapping) else None
        if isinstance(scope, str) and scope:
            mapping.update({n: index for n in nodes if n.startswith(scope)})
        mapping.update({s: index for s in _strings(layer) if s in names})
    return mapping


def _rows(totals: Mapping[str, float], counts: Mapping[str, int], grand: float,
          keys: Sequence[str]) -> tuple[ProfileRow, ...]:
    return tuple(ProfileRow(k, totals[k], counts[k], totals[k] / grand if grand > 0 else 0.0) for k in keys)


def _layer_keys(rows: Sequence[Mapping[str, Any]], metadata: Mapping[str, str]) -> list[str | None]:
    nodes = [str(r["node"]) for r in rows]
    mapped = layers_from_metadata(metadata, nodes)
    scoped = any("decoder" in n for n in nodes)
    keys: list[str | None] = []
    for n in nodes:
        layer = mapped.get(n, layer_from_name(n, scoped))
        keys.append(None if layer is None else f"layer {layer}")
    return keys


def aggregate(rows: Sequence[Mapping[str, Any]], metadata: Mapping[str, str] | None = None,
              model: str = "") -> ProfileSummary:
    """Group per-node rows by op type and by decoder layer."""
    grand = float(sum(float(r["dur_us"]) for r in rows))
    op_total: dict[str, float] = defaultdict(float)
    op_count: dict[str, int] = defaultdict(int)
    for r in rows:
        op_total[r["op_type"]] += float(r["dur_us"])
        op_count[r["op_type"]] += 1
    by_op = _rows(op_total, op_count, grand, sorted(op_total, key=lambda k: -op_total[k]))
    layer_total: dict[str, float] = defaultdict(float)
    layer_count: dict[str, int] = defaultdict(int)
    keys = _layer_keys(rows, metadata or {})
    for r, key in zip(rows, keys):
        layer_total[key or "other"] += float(r["dur_us"])
        layer_count[key or "other"] += 1
    by_layer: tuple[ProfileRow, ...] = ()
    if any(k is not None for k in keys):
        order = sorted((k for k in layer_total if k != "other"), key=lambda k: int(k.split()[1]))
        by_layer = _rows(layer_total, layer_count, grand, order + (["other"] if "other" in layer_total else []))
    return ProfileSummary(model=model, total_us=grand, by_op_type=by_op, by_layer=by_layer)


def _format_rows(title: str, rows: Sequence[ProfileRow], width: int) -> list[str]:
    lines = [f"  {title:<{width}}  {'us/run':>10}  {'share':>6}  {'nodes':>5}"]
    lines += [f"  {r.key:<{width}}  {r.total_us:>10.1f}  {r.share:>6.1%}  {r.nodes:>5}" for r in rows]
    return lines


def format_profile(summary: ProfileSummary, top: int = 15) -> str:
    """Terminal table: the ``top`` slowest op types, then the per-layer split if known."""
    lines = [f"profile of {summary.model}: {summary.total_us / 1000.0:.3f} ms kernel time per run"]
    shown = summary.by_op_type[:top]
    width = max([len("decoder layer")] + [len(r.key) for r in shown])
    lines += _format_rows("op type", shown, width)
    rest = summary.by_op_type[top:]
    if rest:
        lines.append(f"  ... {len(rest)} more op types, {sum(r.total_us for r in rest):.1f} us")
    if summary.by_layer:
        lines += _format_rows("decoder layer", summary.by_layer, width)
    return "\n".join(lines)
