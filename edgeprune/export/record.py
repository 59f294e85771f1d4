"""Turn the exporter's extra graph outputs into a :class:`DecoderMap` (ONNX side, no torch).

After simplification the extras (``edgeprune.l0.cross_attn_probs`` ...) are demoted: removed
from ``graph.output``, resolved to the tensor that really carries the value (through
``Identity`` nodes, and through view nodes that only fed the extra output, e.g. the
``Reshape`` of ``nn.MultiheadAttention``'s ``[B*h, Nq, Nk]`` weights), and the nodes nobody
needs any more are removed. What remains is the exporter's graph with recorded names that
are real tensors of it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from edgeprune import _lazy
from edgeprune.errors import InternalError
from edgeprune.graph.ops import ALIAS_OPS, RESHAPE_OPS
from edgeprune.graph.shapes import static_shapes
from edgeprune.export.decoder_map import DecoderMap, LayerMap, QueryTensor, TensorRef

log = logging.getLogger(__name__)


PREFIX = "edgeprune."
LAYER_ROLES = ("cross_attn_probs", "logits", "key_input", "value_input")
GLOBAL_ROLES = ("memory", "key_pos", "key_padding_mask")


def extra_name(role: str, layer: int | None = None) -> str:
    """``edgeprune.l3.logits`` / ``edgeprune.memory``."""
    return f"{PREFIX}{role}" if layer is None else f"{PREFIX}l{layer}.{role}"


@dataclass(frozen=True)
class PlannedExtra:
    """How one extra tensor reaches the graph.

    ``kind``: ``"output"`` (exported as graph output ``name``), ``"alias"`` (same tensor as
    graph input / output / earlier extra ``target``) or ``"absent"`` (the model has none).
    """

    name: str
    kind: str
    target: str | None = None
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class HeadFacts:
    """What the graph cannot tell about the head: configuration read from the torch model."""

    num_heads: int | None
    num_learned_queries: int | None
    attention: str                     # "manual" | "torch" | "unknown"
    scope: str
    preset: str | None
    other_dims: tuple[int, ...]        # sizes that could be confused with a query count


def _subgraph_inputs(node: Any) -> Iterator[str]:
    """Inputs read by nodes of If/Loop/Scan bodies (kept alive like direct inputs)."""
    for attr in node.attribute:
        for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for inner in graph.node:
                yield from inner.input
                yield from _subgraph_inputs(inner)


def live_node_ids(graph: Any) -> set[int]:
    """Indices of nodes that contribute to some graph output."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    needed = [o.name for o in graph.output]
    live: set[int] = set()
    while needed:
        index = producer.get(needed.pop())
        if index is None or index in live:
            continue
        live.add(index)
        node = graph.node[index]
        needed.extend(n for n in node.input if n)
        needed.extend(_subgraph_inputs(node))
    return live


def _resolve(name: str, graph: Any, live: set[int]) -> str | None:
    """The live tensor holding ``name``'s value, walking up aliases and dead view nodes."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    current = name
    for _ in range(len(graph.node) + 1):
        index = producer.get(current)
        if index is None:                          # graph input or initializer
            return current
        node = graph.node[index]
        if node.op_type in ALIAS_OPS or (index not in live and node.op_type in RESHAPE_OPS):
            current = node.input[0]
            continue
        return current if index in live else None
    raise InternalError(f"cycle while resolving {name!r} in the exported graph")


def remove_dead_nodes(graph: Any) -> int:
    """Drop nodes no output needs and initializers no node reads; returns nodes removed."""
    live = live_node_ids(graph)
    kept = [node for i, node in enumerate(graph.node) if i in live]
    removed = len(graph.node) - len(kept)
    del graph.node[:]
    graph.node.extend(kept)
    used = {n for node in kept for n in node.input} | {o.name for o in graph.output}
    used.update(n for node in kept for n in _subgraph_inputs(node))
    inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    return removed


_NONDETERMINISTIC_PREFIXES = ("Random", "Multinomial", "Dropout")


def _cse_key(node: Any, rename: Mapping[str, str]) -> tuple[Any, ...] | None:
    """What makes two nodes compute the same thing; None for nodes never merged."""
    if not node.output or node.op_type.startswith(_NONDETERMINISTIC_PREFIXES):
        return None
    if any(attr.HasField("g") or len(attr.graphs) for attr in node.attribute):
        return None
    attrs = tuple(sorted((a.name, a.SerializeToString()) for a in node.attribute))
    return (node.domain, node.op_type, tuple(rename.get(i, i) for i in node.input), attrs, len(node.output))


def eliminate_common_subexpressions(graph: Any) -> dict[str, str]:
    """Merge nodes with the same op, inputs and attributes (as onnxsim does); returns renames.

    The exporter runs this after demoting its extra outputs: while they were graph outputs
    onnxsim could not merge e.g. the identical ``memory + key_pos`` of every layer, and a
    later onnxsim run would, dropping recorded names. Nodes writing graph outputs are kept.
    """
    rename: dict[str, str] = {}
    seen: dict[tuple[Any, ...], Any] = {}
    graph_outputs = {o.name for o in graph.output}
    kept = []
    for node in graph.node:
        key = _cse_key(node, rename)
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
        first = seen.get(key) if key is not None else None
        if first is not None and not graph_outputs.intersection(node.output):
            rename.update((dup, orig) for dup, orig in zip(node.output, first.output) if dup)
            continue
        if key is not None:
            seen.setdefault(key, node)
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return rename


def _static_target(graph: Any, node: Any) -> bool:
    """A Reshape whose target is a constant without 0 entries (0 would copy an input dim)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    target = inits.get(node.input[1]) if len(node.input) > 1 else None
    if target is None:
        return False
    allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
    return allowzero or bool((numpy_helper.to_array(target) != 0).all())


def reanchor_reshapes(graph: Any, names: Sequence[str]) -> int:
    """Make Reshapes read the recorded tensor again where onnxsim fused them past it.

    onnxsim turns ``Reshape(Reshape(x, s1), s2)`` into ``Reshape(x, s2)``; when the inner
    Reshape produces a recorded tensor T (e.g. ``memory`` [B, Nk, E] whose flattened copy
    [B*Nk, E] feeds a value projection), the projection then reads ``x`` (e.g. [B, 6, hw, E]),
    which has no key axis for a pass to gather. Reading T instead computes the same values.
    """
    producer = {o: n for n in graph.node for o in n.output}
    count = 0
    for name in names:
        inner = producer.get(name)
        if inner is None or inner.op_type != "Reshape":
            continue
        for node in graph.node:
            if (node is not inner and node.op_type == "Reshape" and node.input[0] == inner.input[0]
                    and _static_target(graph, node)):
                node.input[0] = name
                count += 1
    return count


def demote_outputs(model: Any, names: Sequence[str]) -> dict[str, str | None]:
    """Remove graph outputs ``names``; return ``{name: tensor now holding it, or None}``.

    None means the value was computed only for that output; its nodes are removed.
    Duplicate computations are then merged so that a later onnxsim keeps the names.
    """
    graph = model.graph
    wanted = set(names)
    kept = [o for o in graph.output if o.name not in wanted]
    del graph.output[:]
    graph.output.extend(kept)
    live = live_node_ids(graph)
    resolved = {name: _resolve(name, graph, live) for name in names}
    reanchored = reanchor_reshapes(graph, [real for real in resolved.values() if real])
    removed = remove_dead_nodes(graph)
    rename = eliminate_common_subexpressions(graph)
    log.debug("demoted %d extra outputs, re-anchored %d reshapes, removed %d nodes only they needed, "
              "merged %d duplicates", len(names), reanchored, removed, len(rename))
    return {name: (rename.get(real, real) if real else None) for name, real in resolved.items()}


def _constants(model: Any) -> Iterator[tuple[str, Any, str]]:
    """(name, TensorProto, kind) of every initializer and Constant node value."""
    for tensor in model.graph.initializer:
        yield tensor.name, tensor, "initializer"
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            yield node.output[0], node.attribute[0].t, "constant"


def find_query_tensors(model: Any, counts: Sequence[int]) -> tuple[tuple[QueryTensor, ...], tuple[str, ...]]:
    """Constants with an axis of one of ``counts`` (queries) and int64 shape constants holding one.

    Matching is by size, so a count equal to another model dimension also matches that
    dimension's tensors; the exporter notes when counts collide.
    """
    numpy_helper = _lazy.require("onnx.numpy_helper")
    onnx = _lazy.require("onnx")
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                   onnx.TensorProto.BFLOAT16}
    tensors, shape_consts = [], []
    for name, tensor, kind in _constants(model):
        dims = tuple(tensor.dims)
        if tensor.data_type in float_types:
            for axis, size in enumerate(dims):
                if size in counts:
                    tensors.append(QueryTensor(name, dims, axis, size, kind))
                    break
        elif tensor.data_type == onnx.TensorProto.INT64 and len(dims) == 1 and 0 < dims[0] <= 8:
            if any(int(v) in counts for v in numpy_helper.to_array(tensor)):
                shape_consts.append(name)
    return tuple(tensors), tuple(shape_consts)


def tensor_ref(name: str | None, shapes: Mapping[str, tuple[int, ...]]) -> TensorRef | None:
    """A :class:`TensorRef` for ``name`` (None stays None); a missing shape is our bug."""
    if name is None:
        return None
    if name not in shapes:
        raise InternalError(f"no static shape for recorded tensor {name!r}")
    return TensorRef(name, shapes[name])


def _real_names(plan: Sequence[PlannedExtra], resolved: Mapping[str, str | None]) -> dict[str, str | None]:
    """Extra name -> the graph tensor now holding it (aliases followed), or None."""
    names: dict[str, str | None] = {}
    for extra in plan:
        if extra.kind == "output":
            names[extra.name] = resolved.get(extra.name)
        elif extra.kind == "alias" and extra.target is not None:
            names[extra.name] = names.get(extra.target, extra.target)
        else:
            names[extra.name] = None
    return names


def _probs_layout(ref: TensorRef | None) -> str | None:
    if ref is None:
        return None
    return {4: "BHQK", 3: "(BH)QK"}.get(len(ref.shape), "unknown")


def _check_shapes(plan: Sequence[PlannedExtra], names: Mapping[str, str | None],
                  shapes: Mapping[str, tuple[int, ...]]) -> None:
    """A tensor recorded under its own extra name must have the shape torch produced."""
    for extra in plan:
        if extra.kind == "output" and names.get(extra.name) == extra.name and shapes.get(extra.name) != extra.shape:
            raise InternalError(f"{extra.name}: graph shape {shapes.get(extra.name)} != torch shape {extra.shape}")


def _layers(names: Mapping[str, str | None], shapes: Mapping[str, tuple[int, ...]], count: int) -> tuple[LayerMap, ...]:
    layers = []
    for index in range(count):
        def ref(role: str) -> TensorRef | None:
            return tensor_ref(names.get(extra_name(role, index)), shapes)
        probs = ref("cross_attn_probs")
        layers.append(LayerMap(index, probs, _probs_layout(probs), ref("key_input"), ref("value_input"), ref("logits")))
    return tuple(layers)


def build_decoder_map(model: Any, plan: Sequence[PlannedExtra], resolved: Mapping[str, str | None],
                      facts: HeadFacts, input_names: Sequence[str], output_names: Sequence[str],
                      exporter: str, batch: int) -> DecoderMap | None:
    """Assemble the :class:`DecoderMap` of a graph whose extras were demoted by :func:`demote_outputs`."""
    names = _real_names(plan, resolved)
    count = sum(1 for extra in plan if extra.name.endswith(".logits"))
    if count == 0:
        log.warning("the head returned no per-layer logits: no decoder map recorded")
        return None
    shapes = static_shapes(model, [n for n in names.values() if n])
    _check_shapes(plan, names, shapes)
    layers = _layers(names, shapes, count)
    if layers[0].logits is None:
        raise InternalError("layer 0 logits were recorded but are not in the graph")
    *lead, classes = layers[0].logits.shape                 # [B, Nq, C] or folded [B*Nq, C]
    nq = int(np.prod(lead)) // batch
    memory = tensor_ref(names.get(extra_name("memory")), shapes)
    keys_ref = memory or layers[0].key_input or layers[0].value_input
    probs = layers[0].cross_attn_probs
    num_keys = keys_ref.shape[-2] if keys_ref else (probs.shape[-1] if probs else -1)
    embed = keys_ref.shape[-1] if keys_ref else -1
    heads = facts.num_heads or (probs.shape[1] if probs and len(probs.shape) == 4 else -1)
    learned = facts.num_learned_queries or nq
    counts = sorted({nq, learned})
    query_tensors, shape_consts = find_query_tensors(model, counts)
    notes = _notes(layers, counts, facts.other_dims + (num_keys, batch))
    return DecoderMap(num_layers=count, num_queries=nq, num_learned_queries=learned, num_keys=num_keys,
                      num_heads=heads, embed_dims=embed, num_classes=classes, batch=batch, scope=facts.scope,
                      exporter=exporter, attention=facts.attention, inputs=tuple(input_names),
                      outputs=tuple(output_names), memory=memory,
                      key_pos=tensor_ref(names.get(extra_name("key_pos")), shapes),
                      key_padding_mask=tensor_ref(names.get(extra_name("key_padding_mask")), shapes),
                      layers=layers, query_tensors=query_tensors, query_shape_constants=shape_consts,
                      preset=facts.preset, notes=notes)


def _notes(layers: Sequence[LayerMap], counts: Sequence[int], other_dims: Sequence[int]) -> tuple[str, ...]:
    notes = []
    if any(layer.cross_attn_probs is None for layer in layers):
        notes.append("cross-attention probabilities are not a separate tensor in this graph; "
                     "discovery must recompute them")
    clash = sorted(set(counts) & set(other_dims))
    if clash:
        notes.append(f"query count(s) {clash} equal another model dimension: query_tensors may list "
                     "tensors whose matching axis is not the query axis")
    return tuple(notes)
