"""Find the decoder in an ONNX graph: per layer, its cross-attention, key/value inputs, masks, logits.

Two sources, in order:

1. The exporter's record (``metadata_props["edgeprune.decoder_map"]``, written by
   ``edgeprune export``) names each layer's probabilities and logits; the attention matcher
   then fills in projections and masks around those tensors. ``source="metadata"``.
2. Otherwise (a graph edgeprune did not export, or a stale record), match the graph
   (``source="matched"``): every Softmax / fused attention op is matched as attention
   (``attention``); cross-attentions are those whose keys are not derived from their
   queries (self-attention keys are the queries, or the queries plus temporal memory) and
   are not constants (a folded first self-attention); among several candidates, the
   group whose key count agrees with the number of stacked class outputs wins. Each
   layer's logits are the inputs of the Concat that stacks the class output
   ``[L, B, Nq, C]``, checked to depend on that layer's attention and not the next one.

``--override`` values (see ``overrides``) replace or supply any part. Shapes come from static
shape inference; only an override tensor it leaves symbolic (with fixed graph inputs) is
sized by one ONNX Runtime run.
"""
from __future__ import annotations

import logging
import re
from dataclasses import replace
from typing import Any, Iterable, Mapping, Sequence

from edgeprune.errors import InvalidModelError, PatternNotFoundError
from edgeprune.passes.discovery.attention import AttentionMatch, find_attentions, find_projection, \
    match_softmax_attention
from edgeprune.passes.discovery.class_head import find_class_head, follows_layers
from edgeprune.passes.discovery.guidance import dynamic_inputs, mask_candidates, no_decoder_message, \
    projection_guesses, symbolic_override_message
from edgeprune.graph.index import GraphIndex, name_nodes, walk_up
from edgeprune.graph.ops import LAYOUT_OPS, STACK_VIEWS
from edgeprune.graph.edit import shapes_with_folded_sizes
from edgeprune.graph.run import run_shapes
from edgeprune.graph.shapes import is_static
from edgeprune.graph.values import attr
from edgeprune.passes.discovery.overrides import Overrides, TensorSpec, parse_overrides, require_names
from edgeprune.passes.discovery.structure import AttentionProbs, ClassHead, DecoderLayer, DecoderStructure, \
    MaskInput, ProjectionInput

log = logging.getLogger(__name__)

CLS_OUTPUT_NAME = "all_cls_scores"
_CLS_HINT = re.compile(r"cls|score|logit|class", re.IGNORECASE)


def discover(model: Any, overrides: Overrides | Mapping[str, str] | Sequence[str] | None = None,
             *, index: GraphIndex | None = None) -> DecoderStructure:
    """The decoder structure of ``model`` (an ``onnx.ModelProto``).

    Gives unnamed nodes unique names in place (records refer to nodes by name). Raises
    PatternNotFoundError when no decoder is found and the overrides do not name one.
    """
    name_nodes(model)
    index = index or GraphIndex.build(model)
    ov = parse_overrides(overrides)
    require_names(index, ov)
    index = _with_override_shapes(model, _with_folded_sizes(model, index), ov)
    attentions = find_attentions(index)
    dmap = _usable_map(model, index)
    layers, source = None, "matched"
    if dmap is not None:
        layers = _layers_from_map(index, dmap, attentions)
        source = "metadata" if layers is not None else source
    if layers is None:
        layers = _matched_layers(index, attentions, ov)
    if ov.layers:
        layers = _fill_logits(index, _apply_overrides(index, layers, ov, attentions), ov)
    if not layers:
        raise PatternNotFoundError(no_decoder_message(index, attentions))
    layers, head = _with_class_head(index, layers, ov)
    return _assemble(index, layers, source, ov, dmap if source == "metadata" else None, head)


def _with_class_head(index: GraphIndex, layers: list[DecoderLayer],
                     ov: Overrides) -> tuple[list[DecoderLayer], ClassHead | None]:
    """Layers without logits get the position the shared class head reads (to recompute them).

    The last layer's logits are the head's output itself, unless the head runs on the stack
    of all layers (then it runs after the last layer, and every layer recomputes).
    """
    if all(layer.logits is not None for layer in layers):
        return layers, None
    found = find_class_head(index, layers, ov.cls_output if ov.cls_output and not unstack(index, ov.cls_output)
                            else None)
    if found is None:
        return layers, None
    head, inputs = found
    last = len(layers) - 1
    updated = []
    for layer, tensor in zip(layers, inputs):
        if layer.logits is None and layer.index == last and not head.stacked:
            layer = replace(layer, logits=head.exit)
        elif layer.logits is None:
            layer = replace(layer, head_input=tensor)
        updated.append(layer)
    return updated, head


# ------------------------------------------------------------------ metadata
def _usable_map(model: Any, index: GraphIndex) -> Any:
    """The exporter's DecoderMap when present and consistent with the graph, else None."""
    from edgeprune.export.decoder_map import missing_tensors, read_decoder_map

    try:
        dmap = read_decoder_map(model)
    except InvalidModelError as exc:
        log.warning("ignoring the decoder map in the model's metadata (%s); matching the graph", exc)
        return None
    if dmap is None:
        return None
    missing = missing_tensors(model, dmap)
    if missing:
        log.warning("the decoder map in the model's metadata is stale (%d recorded tensors are not in the "
                    "graph, e.g. %s); matching the graph instead", len(missing), missing[0])
        return None
    return dmap


def _layers_from_map(index: GraphIndex, dmap: Any, attentions: Sequence[AttentionMatch]) -> list[DecoderLayer] | None:
    """Layers whose probabilities/logits the map names; None (stale) when a name does not match."""
    by_probs = {m.probs.tensor: m for m in attentions if m.probs.tensor}
    fused = [m for m in attentions if m.probs.layout == "fused" and is_cross_attention(index, m)]
    layers = []
    for lm in dmap.layers:
        if lm.cross_attn_probs is not None:
            name = lm.cross_attn_probs.name
            match = by_probs.get(name) or by_probs.get(_copied_from(index, name))
        else:
            match = fused[lm.index] if lm.index < len(fused) else None
        if match is None or match.num_queries != dmap.num_queries:
            recorded = lm.cross_attn_probs.name if lm.cross_attn_probs else "a fused attention op"
            why = (f"no attention reads {recorded}" if match is None
                   else f"{match.num_queries} queries in the graph, {dmap.num_queries} recorded")
            log.warning("the decoder map in the model's metadata is stale (layer %d: %s); matching the graph "
                        "instead", lm.index, why)
            return None
        layers.append(_layer(lm.index, match, lm.logits.name if lm.logits else None))
    return layers


def _copied_from(index: GraphIndex, tensor: str) -> str:
    """The tensor that a chain of Cast/Identity nodes ending in ``tensor`` copies.

    The fp16 conversion keeps Softmax in fp32 and gives its fp16 Cast the Softmax's old name, so
    a recorded probabilities name then names a copy of what attention matching finds.
    """
    return walk_up(index, tensor, through=_copy_input).tensor


def _copy_input(_: GraphIndex, node: Any) -> int | None:
    return 0 if node.op_type in ("Cast", "Identity") else None


# ------------------------------------------------------------------ matching
def _layer(i: int, match: AttentionMatch, logits: str | None) -> DecoderLayer:
    return DecoderLayer(index=i, probs=match.probs, key_inputs=match.key_inputs, value_inputs=match.value_inputs,
                        masks=match.masks, pv_node=match.pv_node, logits=logits, num_keys=match.num_keys,
                        key_path_nodes=match.path_nodes, qk_node=match.qk_node)


def is_cross_attention(index: GraphIndex, match: AttentionMatch) -> bool:
    """Keys that are neither constants nor derived from the queries come from elsewhere: memory."""
    key = match.key_input.tensor
    if index.is_constant(key):
        return False                                     # a first self-attention folded by the exporter
    if match.query_input is None:                        # no query projection to compare with:
        return match.query_constant or match.num_keys != match.num_queries   # folded queries, or by shape
    query = match.query_input.tensor
    roots = {query, _view_root(index, query)}     # nn.MultiheadAttention transposes q and k separately
    if key in roots or index.depends_on(key, roots):
        return False
    kp, qp = index.producer.get(key), index.producer.get(query)
    duplicate = kp is not None and qp is not None and kp.op_type == qp.op_type and list(kp.input) == list(qp.input)
    return not duplicate


def _view_root(index: GraphIndex, tensor: str) -> str:
    """The tensor ``tensor`` is a view of (through Transpose/Reshape/Cast ...)."""
    node = index.producer.get(tensor)
    while node is not None and node.op_type in LAYOUT_OPS:
        tensor = node.input[0]
        node = index.producer.get(tensor)
    return tensor


def _select_cross(candidates: list[AttentionMatch], expected: int | None) -> list[AttentionMatch]:
    """All candidates, or (when their count disagrees with the stacked outputs) the agreeing key group."""
    if expected is None or len(candidates) == expected:
        return candidates
    groups: dict[int, list[AttentionMatch]] = {}
    for m in candidates:
        groups.setdefault(m.num_keys, []).append(m)
    fitting = [g for g in groups.values() if len(g) == expected]
    if len(fitting) == 1:
        return fitting[0]
    names = ", ".join(f"{m.node} ({m.num_keys} keys)" for m in candidates)
    raise PatternNotFoundError(
        f"found {len(candidates)} cross-attention candidates ({names}) but the class output stacks {expected} "
        f"layers; name each decoder layer's probabilities with --override layer.N.probs=TENSOR")


def _matched_layers(index: GraphIndex, attentions: Sequence[AttentionMatch], ov: Overrides) -> list[DecoderLayer]:
    cross = [m for m in attentions if is_cross_attention(index, m)]
    for m in attentions:
        log.debug("attention %s: %s, %d queries x %d keys", m.node, "cross" if m in cross else "self",
                  m.num_queries, m.num_keys)
    cls_output = ov.cls_output or find_cls_output(index)
    logits = unstack(index, cls_output) if cls_output else None
    if not cross:
        return []
    cross = _select_cross(cross, len(logits) if logits else None)
    if logits is not None and not _logits_follow_layers(index, cross, logits):
        log.warning("the inputs of %s do not follow the decoder layers one to one; layer logits left unset",
                    cls_output)
        logits = None
    return [_layer(i, m, logits[i] if logits else None) for i, m in enumerate(cross)]


# ------------------------------------------------------------------ logits
def _producer_through(index: GraphIndex, tensor: str, ops: Iterable[str]) -> tuple[str, Any | None]:
    node = index.producer.get(tensor)
    while node is not None and node.op_type in ops:
        tensor = node.input[0]
        node = index.producer.get(tensor)
    return tensor, node


def _stack_inputs(index: GraphIndex, output: str) -> list[str] | None:
    """Inputs of the axis-0 Concat producing ``output`` (through Identity), or None."""
    _, node = _producer_through(index, output, ("Identity",))
    if node is None or node.op_type != "Concat" or attr(node, "axis") != 0:
        return None
    return list(node.input)


def _is_linear(index: GraphIndex, tensor: str) -> bool:
    """True when ``tensor`` (through views) is a Linear's output: MatMul/Gemm [+ constant bias]."""
    _, node = _producer_through(index, tensor, STACK_VIEWS)
    if node is not None and node.op_type == "Add":
        data = [i for i in node.input if not index.is_constant(i)]
        node = index.producer.get(data[0]) if len(data) == 1 else None
    return node is not None and node.op_type in ("MatMul", "Gemm")


def find_cls_output(index: GraphIndex) -> str | None:
    """The graph output stacking per-layer class logits: by name, else the one made of Linear outputs."""
    stacked = [o for o in index.outputs if _stack_inputs(index, o)]
    if CLS_OUTPUT_NAME in stacked:
        return CLS_OUTPUT_NAME
    named = [o for o in stacked if _CLS_HINT.search(o)]
    if len(named) == 1:
        return named[0]
    linear = [o for o in stacked if all(_is_linear(index, t) for t in _stack_inputs(index, o) or [])]
    if len(linear) == 1:
        return linear[0]
    if stacked:
        log.debug("cannot tell which of the stacked outputs %s holds class logits; use --override cls_output=NAME",
                 stacked)
    return None


def unstack(index: GraphIndex, output: str) -> list[str] | None:
    """Per-layer tensors of a stacked output: [B, Nq, C] when it exists, else the [1, B, Nq, C] slice."""
    inputs = _stack_inputs(index, output)
    if inputs is None:
        return None
    per_layer = []
    for tensor in inputs:
        node = index.producer.get(tensor)
        shape = index.shape(tensor)
        if node is not None and node.op_type in ("Unsqueeze", "Reshape") and shape is not None:
            inner = index.shape(node.input[0])
            if inner is not None and tuple(inner) == tuple(shape[1:]):
                tensor = node.input[0]
        per_layer.append(tensor)
    return per_layer


def _attention_output(index: GraphIndex, layer: AttentionMatch | DecoderLayer) -> str:
    return index.nodes[layer.pv_node].output[0]


def _logits_follow_layers(index: GraphIndex, cross: Sequence[AttentionMatch], logits: Sequence[str]) -> bool:
    """logits[l] depends on layer l's attention output and not on layer l+1's."""
    return follows_layers(index, logits, [_attention_output(index, m) for m in cross])


def _fill_logits(index: GraphIndex, layers: list[DecoderLayer], ov: Overrides) -> list[DecoderLayer]:
    """Layers named by overrides get their logits from the stacked class output when it fits."""
    if all(layer.logits is not None for layer in layers):
        return layers
    cls_output = ov.cls_output or find_cls_output(index)
    logits = unstack(index, cls_output) if cls_output else None
    if logits is None or len(logits) != len(layers):
        return layers
    known = [layer for layer in layers if layer.pv_node in index.nodes]
    if len(known) == len(layers) and not _logits_follow_layers(index, layers, logits):
        log.warning("the inputs of %s do not follow the decoder layers one to one; layer logits left unset",
                    cls_output)
        return layers
    return [layer if layer.logits is not None else replace(layer, logits=logits[i]) for i, layer in enumerate(layers)]


# ------------------------------------------------------------------ overrides
def _with_folded_sizes(model: Any, index: GraphIndex) -> GraphIndex:
    """With fixed inputs, attention shapes inference left open get resolved through folded sizes."""
    softmax = [n.output[0] for n in index.graph.node if n.op_type == "Softmax"]
    if dynamic_inputs(index) or all(is_static(index.shape(t)) for t in softmax):
        return index
    return GraphIndex.build(model, {**index.shapes, **shapes_with_folded_sizes(model)})


def _with_override_shapes(model: Any, index: GraphIndex, ov: Overrides) -> GraphIndex:
    """The index with static shapes for every override tensor static inference left symbolic.

    With fixed graph inputs their sizes are fixed too, only not inferable (sizes computed
    from data, ops inference does not know): one ONNX Runtime run on seeded inputs gives them.
    With symbolic inputs there is no one size to use: refused with the fix.
    """
    named = [spec.tensor for parts in ov.layers.values() for spec in parts.values()]
    unknown = [t for t in dict.fromkeys(named) if index.has_tensor(t) and not is_static(index.shape(t))]
    if not unknown:
        return index
    dynamic = dynamic_inputs(index)
    if dynamic:
        raise PatternNotFoundError(symbolic_override_message(index, unknown, dynamic))
    sizes = run_shapes(model, unknown)
    log.debug("override tensors with symbolic shapes resolved by an ONNX Runtime run: %s", sizes)
    return GraphIndex.build(model, {**index.shapes, **sizes})


def _probs_layer(index: GraphIndex, i: int, spec: TensorSpec, attentions: Sequence[AttentionMatch],
                 ov: Overrides, old: DecoderLayer | None) -> DecoderLayer:
    """Layer ``i`` from a probabilities override, matched around it when possible."""
    logits = old.logits if old is not None else None
    match = next((m for m in attentions if m.probs.tensor == spec.tensor), None)
    producer = index.producer.get(spec.tensor)
    if match is None and producer is not None and producer.op_type == "Softmax":
        match = match_softmax_attention(index, producer)
    if match is not None:
        return _layer(i, match, logits)
    shape = index.shape(spec.tensor) or ()
    if len(shape) not in (3, 4) or not all(isinstance(d, int) for d in shape):
        raise PatternNotFoundError(f"--override layer.{i}.probs: tensor {spec.tensor!r} has shape {shape}; expected "
                                   "a static [B, h, Nq, Nk], [B*h, Nq, Nk] or head-averaged [B, Nq, Nk]")
    if len(shape) == 4:
        probs = AttentionProbs(spec.tensor, "BHQK", shape[1])
    elif ov.heads and ov.heads > 1 and shape[0] % ov.heads == 0:
        probs = AttentionProbs(spec.tensor, "(BH)QK", ov.heads)
    else:
        probs = AttentionProbs(spec.tensor, "BQK_mean", ov.heads or 1)
    pv = next((u.name for u in index.users(spec.tensor) if u.op_type == "MatMul" and u.input[0] == spec.tensor), "")
    return DecoderLayer(index=i, probs=probs, key_inputs=(), value_inputs=(), masks=(), pv_node=pv,
                        logits=logits, num_keys=int(shape[-1]),
                        unmatched_masks=tuple(mask_candidates(index, spec.tensor, int(shape[-1]))),
                        guesses=projection_guesses(index, spec.tensor, int(shape[-1])))


def _consumer(index: GraphIndex, spec: TensorSpec, what: str, previous: Sequence[Any],
              ops: Iterable[str]) -> tuple[str, int]:
    """(consumer node, input index) the override's tensor feeds: named, previously matched, or unique."""
    users = index.users(spec.tensor)
    if spec.node is not None:
        chosen = [u for u in users if u.name == spec.node]
        if not chosen:
            raise PatternNotFoundError(f"--override {what}: node {spec.node!r} does not read {spec.tensor!r} "
                                       f"(readers: {', '.join(u.name for u in users) or 'none'})")
    else:
        known = {p.consumer for p in previous}
        chosen = [u for u in users if u.name in known] or [u for u in users if u.op_type in ops]
    if len(chosen) != 1:
        raise PatternNotFoundError(
            f"--override {what}: tensor {spec.tensor!r} feeds {len(users)} nodes "
            f"({', '.join(u.name for u in users) or 'none'}); name the one to use as {what}={spec.tensor}@NODE")
    node = chosen[0]
    return node.name, list(node.input).index(spec.tensor)


def _projection_override(index: GraphIndex, i: int, part: str, spec: TensorSpec,
                         layer: DecoderLayer) -> ProjectionInput:
    what = f"layer.{i}.{part}"
    previous = layer.key_inputs if part == "key" else layer.value_inputs
    consumer, idx = _consumer(index, spec, what, previous, ("MatMul", "Gemm", "Reshape"))
    shape = index.shape(spec.tensor) or ()
    axes = [a for a, d in enumerate(shape[:-1]) if d == layer.num_keys]
    if not axes:
        raise PatternNotFoundError(f"--override {what}: tensor {spec.tensor!r} has shape {tuple(shape)} with no "
                                   f"axis of {layer.num_keys} keys (layer {i}'s probabilities have that many)")
    rest = [a for a in range(len(shape) - 1) if a != axes[0]]
    node = index.nodes[consumer]
    projection = consumer if node.op_type in ("MatMul", "Gemm") else ""
    found = find_projection(index, node.output[0], layer.num_keys) if not projection else None
    return ProjectionInput(spec.tensor, consumer, idx, axes[0], rest[0] if len(rest) == 1 else None,
                           projection or (found.input.projection if found else ""))


def _mask_override(index: GraphIndex, i: int, spec: TensorSpec, layer: DecoderLayer) -> MaskInput:
    what = f"layer.{i}.mask"
    consumer, idx = _consumer(index, spec, what, layer.masks,
                              ("Add", "Where", "Attention", "MultiHeadAttention"))
    shape = index.shape(spec.tensor) or (None,)
    return MaskInput(spec.tensor, consumer, idx, len(shape) - 1)


def _override_layer(index: GraphIndex, i: int, layer: DecoderLayer, ov: Overrides) -> DecoderLayer:
    for part in ("key", "value"):
        spec = ov.get(i, part)
        if spec is not None:
            pin = _projection_override(index, i, part, spec, layer)
            layer = replace(layer, **{f"{part}_inputs": (pin,)})
    spec = ov.get(i, "mask")
    if spec is not None:
        layer = replace(layer, masks=(_mask_override(index, i, spec, layer),))
    spec = ov.get(i, "logits")
    if spec is not None:
        layer = replace(layer, logits=spec.tensor)
    return layer


def _apply_overrides(index: GraphIndex, layers: list[DecoderLayer], ov: Overrides,
                     attentions: Sequence[AttentionMatch]) -> list[DecoderLayer]:
    if not ov.layers:
        return layers
    count = max(len(layers), max(ov.layers) + 1)
    result = []
    for i in range(count):
        old = layers[i] if i < len(layers) else None
        spec = ov.get(i, "probs")
        layer = _probs_layer(index, i, spec, attentions, ov, old) if spec is not None else old
        if layer is None:
            raise PatternNotFoundError(
                f"layer {i}'s cross-attention was not found (matched {len(layers)} layers), so its other "
                f"overrides cannot apply; add --override layer.{i}.probs=TENSOR")
        result.append(_override_layer(index, i, layer, ov))
    return result


# ------------------------------------------------------------------ assembly
def _dim(shape: Any, axis: int) -> int:
    return int(shape[axis]) if shape and isinstance(shape[axis], int) else 0


def _probs_geometry(index: GraphIndex, layer: DecoderLayer) -> tuple[int, int]:
    """(batch, Nq) of a layer from its probabilities (or its fused op's Q input)."""
    probs = layer.probs
    if probs.layout == "fused" and probs.fused_qk:
        shape = index.shape(probs.fused_qk[0]) or ()
        return _dim(shape, 0), _dim(shape, -2 if len(shape) == 4 else 1)
    shape = index.shape(probs.tensor) or ()
    batch = _dim(shape, 0)
    if probs.layout == "(BH)QK" and probs.num_heads:
        batch //= probs.num_heads
    return batch, _dim(shape, -2)


def query_constants(index: GraphIndex, num_queries: int) -> tuple[str, ...]:
    """Initializers and Constant outputs with an axis of ``num_queries`` entries."""
    names = [t.name for t in index.graph.initializer if num_queries in t.dims]
    names += [n.output[0] for n in index.graph.node if n.op_type == "Constant"
              and num_queries in (index.shape(n.output[0]) or ())]
    return tuple(names)


def _classes(index: GraphIndex, layers: Sequence[DecoderLayer], cls_output: str | None) -> int:
    for tensor in [layers[0].logits, layers[-1].logits, cls_output]:
        shape = index.shape(tensor) if tensor else None
        if shape and isinstance(shape[-1], int):
            return int(shape[-1])
    return 0


def _embed(index: GraphIndex, layer: DecoderLayer) -> int:
    for pin in layer.key_inputs + layer.value_inputs:
        shape = index.shape(pin.tensor)
        if shape and isinstance(shape[-1], int):
            return int(shape[-1])
    return 0


def _assemble(index: GraphIndex, layers: list[DecoderLayer], source: str, ov: Overrides,
              dmap: Any, head: ClassHead | None = None) -> DecoderStructure:
    first = layers[0]
    batch, num_queries = _probs_geometry(index, first)
    cls_output = ov.cls_output or find_cls_output(index)
    queries = tuple(q.name for q in dmap.query_tensors) if dmap is not None else query_constants(index, num_queries)
    structure = DecoderStructure(
        layers=tuple(layers), batch=batch, num_queries=num_queries, num_keys=first.num_keys,
        num_classes=_classes(index, layers, cls_output), embed_dims=_embed(index, first),
        num_heads=first.probs.num_heads, source=source, query_initializers=queries,
        cls_output=cls_output, decoder_map=dmap, class_head=head)
    log.debug("decoder (%s): %d layers, %d queries, %d keys, %d heads, batch %d", source, structure.num_layers,
             num_queries, first.num_keys, first.probs.num_heads, batch)
    return structure
