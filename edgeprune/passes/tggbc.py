"""tgGBC key pruning as an ONNX graph pass (``edgeprune rewrite --method tggbc``).

Computes in the graph what :mod:`edgeprune.methods.tggbc` computes in PyTorch (the oracle;
``shared/docs/methods.md`` states the method). For each pruning layer ``l`` of the schedule
the pass inserts, all named ``tggbc/l{l}/...`` (the fp16 pass keeps that prefix in fp32)::

    logits_l [B, Nq, C] -> ReduceMax(C) -> Sigmoid                          c [B, Nq]
      [-> TopK(k) -> ScatterElements 0/1 mask -> c * mask]                   (k > 0: top queries)
    probs_l  [B, h, Nq, Nk_l] | [B*h, Nq, Nk_l] | [B, Nq, Nk_l] (head mean)
      (fused attention: softmax(Q K^T * scale + mask) recomputed from Q, K)
    MatMul(c [B, 1, 1, Nq], probs) -> ReduceSum(h) / h                      S [B, Nk_l]
    TopK(S, Nk_l - r_l, largest)                                             kept [B, Nk_{l+1}]
    kept indices chained across pruning layers (GatherElements)              into the original keys

and gathers, per batch element, every later layer's key-projection input, value-projection
input and per-key mask with the chained indices (``Gather`` for batch 1, ``GatherND``
with ``batch_dims=1`` otherwise), so later layers attend to the kept keys only and their
projections shrink. Static shape constants that carry the key count on those layers' key
paths (head reshapes, flattening reshapes before a Gemm) are retargeted; nodes shared by
layers that now see different key counts (onnxsim shares one flattening Reshape among
layers) are cloned per key count.

TensorRT documents TopK's K as at most 3840. With ``tensorrt=True`` a larger keep count is
selected by peeling: TopK of 3840 keys, mask them out (ScatterElements -inf), repeat; the
concatenated indices equal one big TopK exactly (same order, same tie rule).
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from edgeprune import _lazy
from edgeprune.errors import InvalidModelError, ParameterError, PatternNotFoundError
from edgeprune.methods.tggbc import CLASS_REDUCTIONS, TgGBCConfig, schedule     # torch-free: config and schedule
from edgeprune.passes.registry import BasePass
from edgeprune.passes.structure import DecoderLayer, DecoderStructure, MaskInput, ProjectionInput

log = logging.getLogger(__name__)

PREFIX = "tggbc/"
TENSORRT_TOPK_LIMIT = 3840      # TensorRT's documented maximum K of ITopKLayer
MIN_OPSET = 13                  # Squeeze/Unsqueeze/ReduceSum with axes as inputs, GatherND batch_dims
METADATA_KEY = "edgeprune.tggbc"
_FLOAT, _BOOL = 1, 9   # onnx.TensorProto element types


# --------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class PruningStep:
    """Layer ``layer`` scores its ``num_keys`` keys and keeps ``num_keep`` for the later layers."""

    layer: int
    num_keys: int
    num_drop: int
    topk_sizes: Tuple[int, ...]      # K of each TopK selecting the kept keys (several: TensorRT peeling)

    @property
    def num_keep(self) -> int:
        return self.num_keys - self.num_drop


@dataclass(frozen=True)
class KeyPruningPlan:
    """What the rewrite inserts; computed from the structure alone (no graph edit)."""

    config: TgGBCConfig
    tensorrt: bool
    batch: int
    num_queries: int
    steps: Tuple[PruningStep, ...]
    keys_per_layer: Tuple[int, ...]          # keys each layer attends to after pruning

    def stage(self, layer: int) -> int:
        """How many pruning steps happen before ``layer`` (0: it sees all keys)."""
        return sum(1 for s in self.steps if s.layer < layer)


def topk_sizes(keep: int, tensorrt: bool) -> Tuple[int, ...]:
    """K of each TopK selecting ``keep`` keys: one, or TensorRT-sized chunks (peeling)."""
    if not tensorrt or keep <= TENSORRT_TOPK_LIMIT:
        return (keep,)
    full, rest = divmod(keep, TENSORRT_TOPK_LIMIT)
    return (TENSORRT_TOPK_LIMIT,) * full + ((rest,) if rest else ())


def plan_key_pruning(structure: DecoderStructure, config: TgGBCConfig, tensorrt: bool = False) -> KeyPruningPlan:
    """Validate ``config`` against the decoder and lay out the pruning steps.

    A schedule entry on the last layer prunes nothing that is read later, so it adds no step.
    """
    config.validate(structure.num_keys, structure.num_layers, structure.num_queries)
    if tensorrt and config.k > TENSORRT_TOPK_LIMIT:
        raise ParameterError(f"--tensorrt: k={config.k} top queries exceeds TensorRT's TopK limit of "
                             f"{TENSORRT_TOPK_LIMIT}; use k <= {TENSORRT_TOPK_LIMIT} or k=0 (all queries)")
    drops = schedule(config.r, config.n, structure.num_layers) if config.enabled else [0] * structure.num_layers
    keys, steps, widths = structure.num_keys, [], []
    for layer, drop in zip(structure.layers, drops):
        widths.append(keys)
        if drop > 0 and layer.index < structure.num_layers - 1:
            steps.append(PruningStep(layer.index, keys, drop, topk_sizes(keys - drop, tensorrt)))
            keys -= drop
    return KeyPruningPlan(config, tensorrt, structure.batch, structure.num_queries, tuple(steps), tuple(widths))


# --------------------------------------------------------------------------- graph editing
@dataclass
class _Editor:
    """Adds uniquely named nodes to an onnx-graphsurgeon graph; knows the opset's op forms."""

    gs: Any
    graph: Any
    opset: int
    info: Dict[str, Tuple[int, Tuple[Any, ...]]]      # tensor -> (elem type, shape) of the input model
    scope: str = PREFIX
    count: int = 0
    tensors: Dict[str, Any] = field(default_factory=dict)   # the input model's tensors by name
    nodes: Dict[str, Any] = field(default_factory=dict)     # the input model's nodes by name
    position: Dict[str, int] = field(default_factory=dict)  # node name -> topological position

    def __post_init__(self) -> None:
        self.tensors = self.graph.tensors()
        self.nodes = {n.name: n for n in self.graph.nodes}
        self.position = {n.name: i for i, n in enumerate(self.graph.nodes)}

    def tensor(self, name: str) -> Any:
        if name not in self.tensors:
            raise PatternNotFoundError(f"tensor {name!r} named by the decoder structure is not in the graph")
        return self.tensors[name]

    def node(self, name: str) -> Any:
        if name not in self.nodes:
            raise PatternNotFoundError(f"node {name!r} named by the decoder structure is not in the graph")
        return self.nodes[name]

    def rank(self, name: str) -> int:
        return len(self.info.get(name, (0, ()))[1])

    @contextlib.contextmanager
    def scoped(self, scope: str) -> Iterator[None]:
        """Name the nodes added inside the block ``scope...``."""
        previous, self.scope = self.scope, scope
        try:
            yield
        finally:
            self.scope = previous

    def const(self, what: str, value: Any) -> Any:
        self.count += 1
        return self.gs.Constant(f"{self.scope}{what}_{self.count}", np.asarray(value))

    def ints(self, what: str, *values: int) -> Any:
        return self.const(what, np.asarray(values, dtype=np.int64))

    def op(self, op: str, inputs: Sequence[Any], what: str, outputs: int = 1, **attrs: Any) -> Any:
        self.count += 1
        name = f"{self.scope}{what}_{self.count}"
        outs = [self.gs.Variable(name if outputs == 1 else f"{name}:{i}") for i in range(outputs)]
        self.graph.nodes.append(self.gs.Node(op=op, name=name, attrs=attrs, inputs=list(inputs), outputs=outs))
        return outs[0] if outputs == 1 else outs

    def reshape(self, x: Any, what: str, *shape: int) -> Any:
        return self.op("Reshape", [x, self.ints("shape", *shape)], what)

    def reduce(self, op: str, x: Any, axis: int, what: str, keepdims: int = 0) -> Any:
        """ReduceMax/Min/Mean over one axis (axes became an input in opset 18)."""
        if self.opset >= 18:
            return self.op(op, [x, self.ints("axes", axis)], what, keepdims=keepdims)
        return self.op(op, [x], what, axes=[axis], keepdims=keepdims)

    def as_float(self, x: Any, name: str) -> Any:
        """Cast to float32 when the model computes ``name`` in another float type."""
        elem = self.info.get(name, (_FLOAT, ()))[0]
        return x if elem in (_FLOAT, 0) else self.op("Cast", [x], "to_fp32", to=_FLOAT)


def _opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _tensor_info(model: Any) -> Dict[str, Tuple[int, Tuple[Any, ...]]]:
    """Element type and shape of every tensor (static inference on a weight-free copy)."""
    onnx = _lazy.require("onnx")
    from edgeprune.passes.shapes import light_model

    light = light_model(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError):
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False)
    info: Dict[str, Tuple[int, Tuple[Any, ...]]] = {}
    g = inferred.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim) \
            if tt.HasField("shape") else ()
        info[vi.name] = (tt.elem_type, dims)
    for init in model.graph.initializer:
        info[init.name] = (init.data_type, tuple(int(d) for d in init.dims))
    return info


# --------------------------------------------------------------------------- scoring
def _per_head_probs(ed: _Editor, layer: DecoderLayer, plan: KeyPruningPlan, keys: int) -> Tuple[Any, int]:
    """Layer ``layer``'s cross-attention probabilities as [B, h, Nq, Nk_l] and h (1 when already averaged)."""
    p, b, nq = layer.probs, plan.batch, plan.num_queries
    if p.layout == "fused":
        return _fused_probs(ed, layer, plan), p.num_heads
    probs = ed.as_float(ed.tensor(p.tensor), p.tensor)
    if p.layout == "BQK_mean":
        return ed.reshape(probs, "attn", b, 1, nq, keys), 1
    if p.layout == "(BH)QK":
        return ed.reshape(probs, "heads", b, p.num_heads, nq, keys), p.num_heads     # b-major, as torch's MHA
    if p.layout != "BHQK":
        raise PatternNotFoundError(f"layer {layer.index}: unknown probabilities layout {p.layout!r}")
    return probs, p.num_heads


def _fused_probs(ed: _Editor, layer: DecoderLayer, plan: KeyPruningPlan) -> Any:
    """softmax(Q K^T * scale + mask) recomputed from a fused attention op's inputs: [B, h, Nq, Nk]."""
    p, b, h = layer.probs, plan.batch, layer.probs.num_heads
    if p.fused_qk is None:
        raise PatternNotFoundError(f"layer {layer.index}: fused attention without its Q/K inputs; name the "
                                   "probabilities with --override layer.N.probs=TENSOR")
    fused = ed.node(layer.pv_node)
    if fused.attrs.get("is_causal", 0) or fused.attrs.get("kv_num_heads", h) != h or fused.attrs.get("softcap", 0):
        raise PatternNotFoundError(f"layer {layer.index}: the fused attention {fused.name} is causal, grouped-query "
                                   "or soft-capped; tgGBC recomputes plain cross-attention only")
    q, k = fused.inputs[0], fused.inputs[1]                                     # current (maybe gathered) K
    q, k = ed.as_float(q, p.fused_qk[0]), ed.as_float(k, p.fused_qk[1])
    rank = ed.rank(p.fused_qk[0])
    width = ed.info[p.fused_qk[0]][1][-1]
    if p.fused_bias is not None:
        bias = ed.as_float(ed.tensor(p.fused_bias), p.fused_bias)
        q = ed.op("Add", [q, ed.op("Slice", [bias, ed.ints("s", 0), ed.ints("e", width)], "q_bias")], "q")
        k = ed.op("Add", [k, ed.op("Slice", [bias, ed.ints("s", width), ed.ints("e", 2 * width)], "k_bias")], "k")
    if rank == 3:                                                               # [B, S, h*d]
        head_dim = width // h
        q = ed.op("Transpose", [ed.reshape(q, "q_heads", b, -1, h, head_dim)], "q_t", perm=[0, 2, 1, 3])
        kt = ed.op("Transpose", [ed.reshape(k, "k_heads", b, -1, h, head_dim)], "k_t", perm=[0, 2, 3, 1])
    elif rank == 4:                                                             # [B, h, S, d]
        head_dim = width
        kt = ed.op("Transpose", [k], "k_t", perm=[0, 1, 3, 2])
    else:
        raise PatternNotFoundError(f"layer {layer.index}: fused attention Q has rank {rank}; expected 3 or 4")
    scale = p.scale if p.scale is not None else 1.0 / float(np.sqrt(head_dim))
    scores = ed.op("Mul", [ed.op("MatMul", [q, kt], "qk"), ed.const("scale", np.float32(scale))], "scores")
    for mask in layer.masks:
        scores = ed.op("Add", [scores, _fused_mask_bias(ed, fused, mask, b)], "masked")
    return ed.op("Softmax", [scores], "probs", axis=-1)


def _fused_mask_bias(ed: _Editor, fused: Any, mask: MaskInput, batch: int) -> Any:
    """An additive bias from a fused op's mask input (as currently wired): broadcastable to scores."""
    tensor = fused.inputs[mask.input_index]
    elem = ed.info.get(mask.tensor, (_FLOAT, ()))[0]
    if fused.op == "MultiHeadAttention" and mask.input_index == 4:             # key_padding_mask [B, Nk], 1 = keep
        if ed.rank(mask.tensor) != 2:
            raise PatternNotFoundError(f"{fused.name}: key_padding_mask {mask.tensor} is not [B, Nk]; tgGBC reads "
                                       "only that form of MultiHeadAttention's mask")
        fill = float(fused.attrs.get("mask_filter_value", -10000.0))
        blocked = ed.op("Equal", [tensor, ed.const("zero", np.zeros((), dtype=np.int32))], "blocked")
        bias = ed.op("Where", [blocked, ed.const("fill", np.float32(fill)), ed.const("zero", np.float32(0))], "bias")
        return ed.reshape(bias, "bias4", batch, 1, 1, -1)
    if elem == _BOOL:                                                           # ONNX Attention: True = attend
        return ed.op("Where", [tensor, ed.const("zero", np.float32(0)), ed.const("ninf", np.float32(-np.inf))],
                     "bias")
    return ed.as_float(tensor, mask.tensor)


def _query_weights(ed: _Editor, layer: DecoderLayer, plan: KeyPruningPlan) -> Any:
    """Per-query weights of the importance sum: c, or c masked to the top-k queries; [B, Nq]."""
    cfg, b, nq = plan.config, plan.batch, plan.num_queries
    if not cfg.use_class_score and cfg.k <= 0:
        return ed.const("ones", np.ones((b, nq), dtype=np.float32))
    if layer.logits is None:
        raise PatternNotFoundError(f"tgGBC needs layer {layer.index}'s class logits, which discovery did not find; "
                                   f"supply them with --override layer.{layer.index}.logits=TENSOR")
    logits = ed.as_float(ed.tensor(layer.logits), layer.logits)
    logits = ed.reshape(logits, "logits", b, nq, -1)                           # [B, Nq, C]
    reduce_op = {"max": "ReduceMax", "mean": "ReduceMean", "min": "ReduceMin"}[cfg.class_reduce]
    conf = ed.op("Sigmoid", [ed.reduce(reduce_op, logits, -1, "class_reduce")], "confidence")   # [B, Nq]
    weights = conf if cfg.use_class_score else ed.const("ones", np.ones((b, nq), dtype=np.float32))
    if cfg.k > 0:
        _, top = ed.op("TopK", [conf, ed.ints("k", cfg.k)], "top_queries", outputs=2, axis=-1, largest=1, sorted=1)
        chosen = ed.op("ScatterElements", [ed.const("zeros", np.zeros((b, nq), dtype=np.float32)), top,
                                           ed.const("ones", np.ones((b, cfg.k), dtype=np.float32))],
                       "query_mask", axis=1)                                    # [B, Nq] 0/1
        weights = ed.op("Mul", [weights, chosen], "weights")
    return weights


def _select_keys(ed: _Editor, scores: Any, step: PruningStep, batch: int) -> Any:
    """Indices of the ``num_keep`` largest scores [B, Nk_l] -> [B, num_keep], descending.

    Several TopK sizes (TensorRT): take the largest chunk, overwrite it with -inf, repeat.
    """
    remaining, chunks = scores, []
    for i, size in enumerate(step.topk_sizes):
        _, idx = ed.op("TopK", [remaining, ed.ints("k", size)], "keep", outputs=2, axis=-1, largest=1, sorted=1)
        chunks.append(idx)
        if i + 1 < len(step.topk_sizes):
            fill = ed.const("taken", np.full((batch, size), -np.inf, dtype=np.float32))
            remaining = ed.op("ScatterElements", [remaining, idx, fill], "remaining", axis=1)
    return chunks[0] if len(chunks) == 1 else ed.op("Concat", chunks, "kept", axis=1)


def _keep_indices(ed: _Editor, layer: DecoderLayer, step: PruningStep, plan: KeyPruningPlan) -> Any:
    """Layer ``layer``'s kept key indices [B, Nk_l - r_l] (into its own keys)."""
    scores = _importance(ed, layer, plan, step.num_keys)                        # [B, Nk_l]
    return _select_keys(ed, scores, step, plan.batch)


def _importance(ed: _Editor, layer: DecoderLayer, plan: KeyPruningPlan, keys: int) -> Any:
    """``S_j = sum_i w_i * mean_h A[h, i, j]`` as mean_h of per-head weighted sums: [B, Nk_l].

    Summing queries per head first (one batched vector-matrix product over the contiguous
    probabilities) reads them once; a ReduceMean over the head axis first is several times
    slower in ONNX Runtime on 24000 keys.
    """
    b, nq = plan.batch, plan.num_queries
    probs, heads = _per_head_probs(ed, layer, plan, keys)                        # [B, h, Nq, Nk_l]
    weights = ed.reshape(_query_weights(ed, layer, plan), "weights_4d", b, 1, 1, nq)
    per_head = ed.op("MatMul", [weights, probs], "per_head_importance")        # [B, h, 1, Nk_l]
    if heads == 1:
        return ed.reshape(per_head, "scores", b, keys)
    summed = ed.op("ReduceSum", [per_head, ed.ints("axes", 1)], "head_sum", keepdims=0)   # [B, 1, Nk_l]
    mean = ed.op("Mul", [summed, ed.const("inv_heads", np.float32(1.0 / heads))], "head_mean")
    return ed.reshape(mean, "scores", b, keys)


# --------------------------------------------------------------------------- gathering
@dataclass(frozen=True)
class _KeyAxes:
    """Where keys and batch run in a per-key tensor, and whether its rows hold B*h entries."""

    key_axis: int
    batch_axis: Optional[int]
    heads_in_batch: bool = False


def gather_scope(plan: KeyPruningPlan, stage: int) -> str:
    """Name prefix of the gathers feeding ``stage``: those of the pruning layer that chose the keys."""
    return f"{PREFIX}l{plan.steps[stage - 1].layer}/gather/"


@dataclass
class _Gatherer:
    """Gathers per-key tensors with one stage's chained indices; one copy per (tensor, stage)."""

    ed: _Editor
    plan: KeyPruningPlan
    num_heads: int
    cache: Dict[Tuple[str, int, _KeyAxes], Any] = field(default_factory=dict)
    indices: Dict[int, Any] = field(default_factory=dict)     # stage -> chained indices [B, K]

    def gathered(self, data: Any, axes: _KeyAxes, stage: int) -> Any:
        key = (data.name, stage, axes)
        if key not in self.cache:
            with self.ed.scoped(gather_scope(self.plan, stage)):
                self.cache[key] = self._gather(data, axes, self.indices[stage])
        return self.cache[key]

    def _gather(self, data: Any, axes: _KeyAxes, comp: Any) -> Any:
        ed, b = self.ed, self.plan.batch
        if b == 1:                                                              # same keys for every row
            return ed.op("Gather", [data, ed.reshape(comp, "flat_idx", -1)], "keys", axis=axes.key_axis)
        if axes.batch_axis is None:
            raise PatternNotFoundError(f"cannot gather {data.name} per batch element: no batch axis (batch {b}); "
                                       "export with batch 1 or name the tensor with --override")
        rows = comp
        if axes.heads_in_batch:                                                 # [B, K] -> [B*h, K], b-major
            rows = ed.reshape(ed.op("Expand", [ed.reshape(comp, "idx_b1k", b, 1, -1),
                                               ed.ints("heads", 1, self.num_heads, 1)], "idx_bhk"),
                              "idx_rows", b * self.num_heads, -1)
        rank = ed.rank(data.name)
        if rank < 2:
            raise PatternNotFoundError(f"cannot gather {data.name}: its rank is unknown")
        perm = [axes.batch_axis, axes.key_axis] + [a for a in range(rank) if a not in (axes.batch_axis, axes.key_axis)]
        moved = data if perm == list(range(rank)) else ed.op("Transpose", [data], "batch_keys_first", perm=perm)
        idx = ed.op("Unsqueeze", [rows, ed.ints("axes", -1)], "idx")           # [B, K, 1]
        out = ed.op("GatherND", [moved, idx], "keys", batch_dims=1)
        if perm == list(range(rank)):
            return out
        return ed.op("Transpose", [out], "restore_layout", perm=[perm.index(a) for a in range(rank)])



# --------------------------------------------------------------------------- rewiring
def _pins(layer: DecoderLayer) -> Tuple[ProjectionInput, ...]:
    return layer.key_inputs + layer.value_inputs


def _key_nodes(layer: DecoderLayer) -> List[str]:
    """Nodes that carry layer ``layer``'s keys before attention: projection inputs' consumers and paths."""
    return list(dict.fromkeys([p.consumer for p in _pins(layer)] + list(layer.key_path_nodes)))


def _shared_nodes(structure: DecoderStructure, plan: KeyPruningPlan) -> FrozenSet[str]:
    """Key-path nodes used by layers that see different key counts (they get one copy per count)."""
    stages: Dict[str, set] = {}
    for layer in structure.layers:
        for name in _key_nodes(layer):
            stages.setdefault(name, set()).add(plan.stage(layer.index))
    return frozenset(n for n, s in stages.items() if len(s) > 1)


@dataclass
class _Rewirer:
    """Feeds the layers of one stage their gathered keys; clones key-path nodes shared across stages."""

    ed: _Editor
    gatherer: _Gatherer
    plan: KeyPruningPlan
    shared: FrozenSet[str]
    clones: Dict[Tuple[str, int], Any] = field(default_factory=dict)
    replaced: Dict[Tuple[str, int], Any] = field(default_factory=dict)   # (original tensor, stage) -> copy

    def layer(self, layer: DecoderLayer, stage: int) -> List[Any]:
        """Rewire ``layer`` (at ``stage`` > 0); returns the nodes now reading gathered keys."""
        pins = {(p.consumer, p.input_index): p for p in _pins(layer)}
        order = self.ed.position
        entries = []
        for name in sorted(_key_nodes(layer), key=lambda n: order.get(n, 0)):
            node = self._clone(self.ed.node(name), stage) if name in self.shared else self.ed.node(name)
            for i, tensor in enumerate(list(node.inputs)):
                pin = pins.get((name, i))
                if pin is not None:
                    axes = _KeyAxes(pin.key_axis, pin.batch_axis)
                    node.inputs[i] = self.gatherer.gathered(self.ed.tensor(pin.tensor), axes, stage)
                elif (tensor.name, stage) in self.replaced:
                    node.inputs[i] = self.replaced[(tensor.name, stage)]
            entries.append(node)
        for mask in layer.masks:
            entries += self._mask(layer, mask, stage)
        return entries

    def _clone(self, node: Any, stage: int) -> Any:
        key = (node.name, stage)
        if key not in self.clones:
            gs, step = self.ed.gs, self.plan.steps[stage - 1]
            name = f"{PREFIX}l{step.layer}/copy/{node.name}"
            outs = [gs.Variable(f"{name}:{i}") for i in range(len(node.outputs))]
            copy = gs.Node(op=node.op, name=name, attrs=dict(node.attrs), inputs=list(node.inputs),
                           outputs=outs, domain=node.domain)
            self.ed.graph.nodes.append(copy)
            for old, new in zip(node.outputs, outs):
                self.replaced[(old.name, stage)] = new
            self.clones[key] = copy
            log.debug("cloned %s for the layers after pruning step %d", node.name, stage)
        return self.clones[key]

    def _mask(self, layer: DecoderLayer, mask: MaskInput, stage: int) -> List[Any]:
        """Gather a per-key mask at its consumer; masks broadcast over keys need nothing."""
        shape = self.ed.info.get(mask.tensor, (0, ()))[1]
        if shape and shape[mask.key_axis] == 1:
            return []
        if mask.consumer in self.shared:
            raise PatternNotFoundError(f"the mask consumer {mask.consumer} is shared by decoder layers that see "
                                       "different numbers of keys; tgGBC cannot prune for only some of them")
        node = self.ed.node(mask.consumer)
        data, axes = self.ed.tensor(mask.tensor), _KeyAxes(mask.key_axis, mask.batch_axis, mask.heads_in_batch)
        if self.plan.batch > 1 and mask.batch_axis is None:
            data, axes = self._batched_mask(layer, mask, node, stage)
        node.inputs[mask.input_index] = self.gatherer.gathered(data, axes, stage)
        return [node]

    def _batched_mask(self, layer: DecoderLayer, mask: MaskInput, consumer: Any, stage: int) -> Tuple[Any, _KeyAxes]:
        """A mask broadcast over the batch, expanded to one row per batch element (or per b, h)."""
        ed, b = self.ed, self.plan.batch
        rank = ed.rank(mask.tensor)
        target = 4 if layer.probs.layout == "fused" else ed.rank(consumer.outputs[0].name)
        if rank == 0 or target < rank:
            raise PatternNotFoundError(f"cannot expand the mask {mask.tensor} of layer {layer.index} to batch {b}: "
                                       "its shape is unknown")
        heads = layer.probs.layout == "(BH)QK"
        rows = b * layer.probs.num_heads if heads else b
        with ed.scoped(gather_scope(self.plan, stage)):
            data = ed.tensor(mask.tensor)
            if target > rank:
                data = ed.op("Unsqueeze", [data, ed.ints("axes", *range(target - rank))], "mask_rank")
            data = ed.op("Expand", [data, ed.ints("rows", rows, *([1] * (target - 1)))], "mask_rows")
        ed.info[data.name] = (ed.info[mask.tensor][0], (rows,) + (None,) * (target - 1))
        return data, _KeyAxes(mask.key_axis + target - rank, 0, heads)


# --------------------------------------------------------------------------- static shapes
_SHAPE_INPUT = {"Reshape": 1, "Expand": 1, "ConstantOfShape": 0}


def _constant_value(tensor: Any) -> Optional[np.ndarray]:
    """Value of a gs.Constant or of a Constant node's output, else None."""
    if hasattr(tensor, "values"):
        return np.asarray(tensor.values)
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is not None and producer.op == "Constant" and "value" in producer.attrs:
        value = producer.attrs["value"]
        return np.asarray(value.values if hasattr(value, "values") else value)
    return None


def _key_cone(entries: Sequence[Any], stops: FrozenSet[str]) -> List[Any]:
    """Nodes downstream of ``entries`` up to (including) the attention nodes ``stops``."""
    starts = {id(n) for n in entries}
    seen, todo, cone = set(), list(entries), []
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        cone.append(node)
        if node.name in stops:
            continue
        for out in node.outputs:
            todo.extend(c for c in out.outputs if not c.name.startswith(PREFIX) or id(c) in starts)
    return cone


def _retarget_shapes(ed: _Editor, nodes: Sequence[Any], old: int, new: int, batch: int, scope: str) -> int:
    """Static shape constants with ``old`` keys (or ``batch * old``) -> ``new``; returns how many changed."""
    changed = 0
    for node in nodes:
        idx = _SHAPE_INPUT.get(node.op)
        if idx is None or idx >= len(node.inputs):
            continue
        value = _constant_value(node.inputs[idx])
        if value is None or value.dtype != np.int64:
            continue
        hits = value == old
        if batch > 1:
            hits |= value == old * batch
        if not hits.any():
            continue
        patched = np.where(value == old, new, value)
        if batch > 1:
            patched = np.where(value == old * batch, new * batch, patched)
        node.inputs[idx] = ed.gs.Constant(f"{scope}{node.name}", patched.astype(np.int64))
        changed += 1
    return changed


# --------------------------------------------------------------------------- the rewrite
def _check_model(model: Any, structure: DecoderStructure) -> int:
    opset = _opset(model)
    if opset < MIN_OPSET:
        raise InvalidModelError(f"tgGBC needs opset >= {MIN_OPSET} but the model is opset {opset}; "
                                "re-export it with --opset 17")
    if structure.batch < 1:
        raise InvalidModelError(f"tgGBC needs a static batch size, but discovery found batch {structure.batch}; "
                                "export with a fixed batch (--batch B)")
    return opset


def _prune_stage(ed: _Editor, rewirer: _Rewirer, structure: DecoderStructure, plan: KeyPruningPlan,
                 stage: int) -> None:
    """Feed every layer of ``stage`` its gathered keys and retarget their static key counts."""
    layers = [layer for layer in structure.layers if plan.stage(layer.index) == stage]
    entries: List[Any] = []
    for layer in layers:
        entries += rewirer.layer(layer, stage)
    stops = frozenset(layer.pv_node for layer in layers)
    keys = plan.keys_per_layer[layers[0].index]
    scope = f"{PREFIX}l{plan.steps[stage - 1].layer}/shape/"
    changed = _retarget_shapes(ed, _key_cone(entries, stops), structure.num_keys, keys, plan.batch, scope)
    log.debug("tgGBC stage %d: layers %s read %d keys; %d shape constants retargeted",
              stage, [layer.index for layer in layers], keys, changed)


def rewrite_key_pruning(model: Any, structure: DecoderStructure, plan: KeyPruningPlan) -> Any:
    """Insert the scoring/selection nodes of ``plan`` and gather the later layers' keys.

    Returns a new ``onnx.ModelProto`` (``model`` itself when the plan prunes nothing, so
    ``r=0`` reproduces the input exactly).
    """
    if not plan.steps:
        return model
    gs = _lazy.require("onnx_graphsurgeon")
    ed = _Editor(gs, gs.import_onnx(model), _check_model(model, structure), _tensor_info(model))
    gatherer = _Gatherer(ed, plan, structure.num_heads)
    rewirer = _Rewirer(ed, gatherer, plan, _shared_nodes(structure, plan))
    chained = None
    for s, step in enumerate(plan.steps):
        with ed.scoped(f"{PREFIX}l{step.layer}/"):
            kept = _keep_indices(ed, structure.layers[step.layer], step, plan)        # [B, Nk_{l+1}]
            chained = kept if chained is None else ed.op("GatherElements", [chained, kept], "chained", axis=1)
        gatherer.indices[s + 1] = chained
        _prune_stage(ed, rewirer, structure, plan, s + 1)
    ed.graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return _export(gs, ed.graph, model, plan)


def _export(gs: Any, graph: Any, model: Any, plan: KeyPruningPlan) -> Any:
    """gs graph -> ModelProto keeping the input's metadata; stale intermediate shapes dropped."""
    out = gs.export_onnx(graph, do_type_check=False)
    del out.graph.value_info[:]                        # later layers' key counts changed
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    for prop in model.metadata_props:
        if prop.key != METADATA_KEY:
            out.metadata_props.add(key=prop.key, value=prop.value)
    out.metadata_props.add(key=METADATA_KEY, value=json.dumps(describe_plan(plan), sort_keys=True))
    return out


def describe_plan(plan: KeyPruningPlan) -> Dict[str, Any]:
    """The plan as plain data (recorded in the rewritten model's metadata)."""
    c = plan.config
    return {"r": c.r, "n": c.n, "k": c.k, "use_class_score": c.use_class_score, "class_reduce": c.class_reduce,
            "tensorrt": plan.tensorrt, "pruning_layers": [s.layer for s in plan.steps],
            "keys_pruned": [s.num_drop for s in plan.steps], "keys_per_layer": list(plan.keys_per_layer)}


# --------------------------------------------------------------------------- the pass
class KeyPruningPass(BasePass):
    """``--method tggbc``: prune image tokens between decoder layers, guided by class scores."""

    name: ClassVar[str] = "tggbc"
    help: ClassVar[str] = ("tgGBC: drop the r least important image tokens (keys) over the first n decoder "
                           "layers, importance = class-score-weighted attention (zero-shot, no retraining)")
    requires: ClassVar[FrozenSet[str]] = frozenset({"probs", "key", "value", "logits"})

    def __init__(self, config: TgGBCConfig, tensorrt: bool = False) -> None:
        self.config, self.tensorrt = config, tensorrt

    @classmethod
    def add_arguments(cls, group: Any) -> None:
        group.add_argument("--r", "--keys-pruned", dest="r", type=int, default=None, metavar="R",
                           help="keys (image tokens) pruned in total (tgGBC, ToMe)")
        group.add_argument("--n", "--pruning-layers", dest="n", type=int, default=None, metavar="N",
                           help="number of decoder layers that prune, from the first (default 1)")
        group.add_argument("--k", "--top-queries", dest="k", type=int, default=None, metavar="K",
                           help="tgGBC: queries with the highest class score used for importance (0 = all, default)")
        group.add_argument("--no-class-score", dest="no_class_score", action="store_true",
                           help="tgGBC ablation: importance from attention alone (queries still chosen by score)")
        group.add_argument("--class-reduce", dest="class_reduce", choices=CLASS_REDUCTIONS, default=None,
                           help="tgGBC ablation: reduce class logits by max (default), mean or min")
        group.add_argument("--tensorrt", dest="tensorrt", action="store_true",
                           help="target TensorRT: keep every TopK within its K <= 3840 limit")

    @classmethod
    def from_args(cls, args: Any) -> "KeyPruningPass":
        r = getattr(args, "r", None)
        if r is None:
            raise ParameterError("--method tggbc needs --r R (keys pruned in total), e.g. --r 21000 --n 2 --k 175")
        n = getattr(args, "n", None)
        k = getattr(args, "k", None)
        config = TgGBCConfig(r=r, n=1 if n is None else n, k=0 if k is None else k,
                             use_class_score=not getattr(args, "no_class_score", False),
                             class_reduce=getattr(args, "class_reduce", None) or "max")
        if config.r < 0 or config.n < 0 or config.k < 0:
            raise ParameterError(f"--r, --n and --k must be >= 0 (got r={config.r}, n={config.n}, k={config.k})")
        return cls(config, tensorrt=bool(getattr(args, "tensorrt", False)))

    def prepare(self, model: Any) -> Any:
        """Undo onnxsim's merged key projections (one MatMul + Split for all layers): later layers
        must be able to read fewer keys than earlier ones. Nothing changes when nothing is pruned."""
        if self.config.enabled:
            from edgeprune.passes.normalize import split_shared_projections

            split_shared_projections(model)
        return model

    def apply(self, model: Any, structure: DecoderStructure) -> Any:
        plan = plan_key_pruning(structure, self.config, self.tensorrt)
        log.info("tgGBC r=%d n=%d k=%d: pruning after layers %s, keys per layer %s", self.config.r, self.config.n,
                 self.config.k, [s.layer for s in plan.steps], list(plan.keys_per_layer))
        return rewrite_key_pruning(model, structure, plan)

    def __repr__(self) -> str:
        return f"KeyPruningPass({self.config!r}, tensorrt={self.tensorrt})"
