"""What ``edgeprune inspect`` reports: the discovered decoder, its sizes and FLOPs per layer.

Sizes come from the static graph: keys and queries from each cross-attention, the keys of
each layer's self-attention (queries, plus StreamPETR's temporal memory) from the matched
self-attentions, the FFN width from Linear -> ReLU/GELU -> Linear pairs whose outer width
is the embedding width. A self-attention the exporter folded into constants (the first
layer's, whose queries are all constants) costs nothing at run time and is not counted.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from edgeprune.passes.discovery.attention import find_attentions
from edgeprune.passes.discovery.discover import discover, is_cross_attention
from edgeprune.report.flops import DecoderFlops, DecoderSizes, PruningEstimate, decoder_flops, estimate_tggbc
from edgeprune.graph.index import GraphIndex, name_nodes
from edgeprune.graph.values import attr
from edgeprune.passes.discovery.structure import DecoderStructure

log = logging.getLogger(__name__)

_ACTIVATIONS = ("Relu", "Gelu", "FastGelu")


@dataclass(frozen=True)
class ModelDescription:
    path: str
    structure: DecoderStructure
    sizes: DecoderSizes
    flops: DecoderFlops
    estimate: PruningEstimate | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (``edgeprune inspect --json``)."""
        s = self.structure
        out: dict[str, Any] = {
            "path": self.path, "source": s.source, "num_layers": s.num_layers, "batch": s.batch,
            "num_queries": s.num_queries, "num_keys": s.num_keys, "num_heads": s.num_heads,
            "embed_dims": s.embed_dims, "num_classes": s.num_classes, "ffn_dims": self.sizes.ffn_dims,
            "cls_output": s.cls_output, "query_initializers": list(s.query_initializers),
            "class_head": self._class_head(),
            "layers": [self._layer(i) for i in range(s.num_layers)],
            "flops": {"total": self.flops.total, "cross_attention": self.flops.cross_total},
        }
        if self.estimate is not None:
            e = self.estimate
            out["pruning"] = {
                "r": e.r, "n": e.n, "k": e.k, "drops": list(e.drops),
                "keys_per_layer": [layer.num_keys for layer in e.after.layers],
                "flops_per_layer": [layer.total * e.after.batch for layer in e.after.layers],
                "flops": {"total": e.after.total, "cross_attention": e.after.cross_total},
                "reduction": e.reduction, "cross_attention_reduction": e.cross_reduction,
                "ideal_speedup": e.ideal_speedup,
            }
        return out

    def _layer(self, i: int) -> dict[str, Any]:
        layer, flops, b = self.structure.layers[i], self.flops.layers[i], self.flops.batch
        return {
            "index": i, "num_keys": layer.num_keys, "self_keys": self.sizes.self_keys[i],
            "probs": layer.probs.tensor, "probs_layout": layer.probs.layout,
            "fused_qk": list(layer.probs.fused_qk) if layer.probs.fused_qk else None,
            "key_inputs": [p.tensor for p in layer.key_inputs],
            "value_inputs": [p.tensor for p in layer.value_inputs],
            "masks": [m.tensor for m in layer.masks], "logits": layer.logits,
            "logits_source": logits_source(self.structure, layer),
            "flops": {"total": flops.total * b, "cross_attention": flops.cross.total * b,
                      "cross_attention_parts": {k: v * b for k, v in asdict(flops.cross).items()},
                      "self_attention": flops.self_attn.total * b if flops.self_attn else None,
                      "ffn": flops.ffn * b if flops.ffn else None},
        }


    def _class_head(self) -> dict[str, Any] | None:
        head = self.structure.class_head
        if head is None:
            return None
        return {"entry": head.entry, "exit": head.exit, "nodes": list(head.nodes), "stacked": head.stacked,
                "recomputes_layers": [layer.index for layer in self.structure.layers if layer.logits_recomputed]}


def logits_source(structure: DecoderStructure, layer: Any) -> str:
    """How a pass gets this layer's class logits, in words (``inspect`` shows it per layer)."""
    if layer.logits is not None:
        return "in the graph"
    if layer.logits_recomputed and structure.class_head is not None:
        return f"recomputed with the shared class head from {layer.head_input}"
    return f"missing: name them with --override layer.{layer.index}.logits=TENSOR"


def _position(index: GraphIndex, name: str) -> int:
    return index.position.get(name, -1)


def self_attention_keys(index: GraphIndex, structure: DecoderStructure) -> list[int | None]:
    """Keys of each layer's self-attention (None when folded away or not found)."""
    cross_pos = [_position(index, layer.pv_node) for layer in structure.layers]
    keys: list[int | None] = [None] * structure.num_layers
    for m in find_attentions(index):
        if m.num_queries != structure.num_queries or is_cross_attention(index, m):
            continue
        pos = _position(index, m.pv_node)
        layer = next((i for i, c in enumerate(cross_pos) if pos < c), None)
        if layer is not None and keys[layer] is None:
            keys[layer] = m.num_keys
    return keys


def _linear_width(index: GraphIndex, node: Any, side: str) -> int | None:
    """Input (side='in') or output width of a MatMul/Gemm with a constant 2-D weight."""
    if node is None or node.op_type not in ("MatMul", "Gemm") or not index.is_constant(node.input[1]):
        return None
    shape = index.shape(node.input[1])
    if shape is None or len(shape) != 2:
        return None
    rows, cols = (shape[1], shape[0]) if node.op_type == "Gemm" and attr(node, "transB", 0) else shape
    return rows if side == "in" else cols


def ffn_width(index: GraphIndex, embed_dims: int) -> int | None:
    """Most common hidden width F of Linear(E->F) -> activation -> Linear(F->E), F != E."""
    widths: Counter = Counter()
    for act in (n for n in index.graph.node if n.op_type in _ACTIVATIONS):
        up = index.producer.get(act.input[0])
        if up is not None and up.op_type == "Add":
            data = [i for i in up.input if not index.is_constant(i)]
            up = index.producer.get(data[0]) if len(data) == 1 else None
        hidden = _linear_width(index, up, "out")
        if hidden is None or hidden == embed_dims or _linear_width(index, up, "in") != embed_dims:
            continue
        down = [_linear_width(index, u, "out") for u in index.users(act.output[0])]
        if embed_dims in down:
            widths[hidden] += 1
    return widths.most_common(1)[0][0] if widths else None


def decoder_sizes(index: GraphIndex, structure: DecoderStructure, model: Any = None) -> DecoderSizes:
    """Sizes of the decoder as the graph computes it: the keys each layer really reads and, for
    a tgGBC-pruned model (its rewrite record), the layers that score keys and their k."""
    s = structure
    record = _tggbc_record(model) if model is not None else {}
    return DecoderSizes(num_layers=s.num_layers, num_queries=s.num_queries, num_keys=s.num_keys,
                        embed_dims=s.embed_dims, num_heads=s.num_heads, batch=max(s.batch, 1),
                        self_keys=tuple(self_attention_keys(index, s)), ffn_dims=ffn_width(index, s.embed_dims),
                        layer_keys=tuple(layer.num_keys for layer in s.layers),
                        scoring_layers=tuple(record.get("pruning_layers", ())), scoring_k=int(record.get("k", 0)))


def _tggbc_record(model: Any) -> dict[str, Any]:
    """The plan a tgGBC rewrite recorded in the model's metadata ({} when there is none)."""
    from edgeprune.passes.keys.tggbc import METADATA_KEY

    raw = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        log.warning("ignoring an unreadable %s record", METADATA_KEY)
        return {}


def describe_model(path: str | os.PathLike, *, overrides: Sequence[str] | None = None,
                   r: int | None = None, n: int | None = None, k: int = 0) -> ModelDescription:
    """Discover the decoder of the model at ``path``; with ``r``/``n``, also the tgGBC estimate."""
    from edgeprune.graph.files import load_model

    model = load_model(path)
    name_nodes(model)
    index = GraphIndex.build(model)
    structure = discover(model, overrides, index=index)
    sizes = decoder_sizes(index, structure, model)
    estimate = estimate_tggbc(sizes, r, n if n is not None else 1, k) if r is not None else None
    return ModelDescription(str(path), structure, sizes, decoder_flops(sizes), estimate)


def rewrite_recorded(path: str | os.PathLike) -> bool:
    """Whether ``path`` carries edgeprune's rewrite record (``edgeprune rewrite`` made it)."""
    from edgeprune.graph.files import load_model
    from edgeprune.passes.driver import REWRITE_KEY

    model = load_model(path, load_external_data=False)
    return any(p.key == REWRITE_KEY for p in model.metadata_props)


def decoder_alone(model: Any) -> bool:
    """Whether ``model`` is a decoder alone, so its decoder FLOPs are all it computes (to count).

    The exporter's record says its scope; without one, a Conv means a backbone is in the graph.
    """
    from edgeprune.export.decoder_map import read_decoder_map

    dmap = read_decoder_map(model)
    if dmap is not None:
        return dmap.scope == "decoder"
    return not any(n.op_type == "Conv" for n in model.graph.node)


def graph_flops(path: str | os.PathLike) -> int | None:
    """Decoder FLOPs of the decoder graph at ``path`` as it is (what ``inspect`` prints as its
    total). None when discovery finds no decoder there, or when the graph holds more than the
    decoder (a whole detector: its backbone is not counted, so the ratio would mean nothing),
    or when it is quantized (its int8 products are not float MatMuls with weights to count: a
    static int8 decoder came out at 0.45x the fp32 FLOPs, an "ideal" of 2.24x that no one
    should read)."""
    from edgeprune.errors import EdgepruneError
    from edgeprune.graph.files import load_model
    from edgeprune.graph.ops import QUANTIZED_OPS

    model = load_model(path, load_external_data=False)
    if not decoder_alone(model):
        log.info("no FLOPs for %s: it is more than a decoder (only decoder FLOPs are counted)", path)
        return None
    if any(n.op_type in QUANTIZED_OPS for n in model.graph.node):
        log.info("no FLOPs for %s: it is quantized (only float products are counted)", path)
        return None
    try:
        return describe_model(path).flops.total
    except EdgepruneError as exc:
        log.info("no FLOPs for %s: %s", path, str(exc).splitlines()[0])
        return None
