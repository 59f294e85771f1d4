"""ToMe baseline as an ONNX graph pass: merge similar image tokens (keys) between decoder layers.

Computes what :mod:`edgeprune.methods.tome` computes (the oracle; read its docstring for the
method). After layer ``l`` (``r_l > 0`` in tgGBC's schedule) the pass inserts, all named
``tome/...``::

    K^T of layer l [B, h, d, Nk] or [B*h, d, Nk]  (input 1 of its QK^T MatMul)
      -> Reshape [B, h, d, Nk] -> ReduceSum(h) -> Transpose -> L2-normalise        metric [B, Nk, d]
      -> Slice even / odd keys -> MatMul(A, B^T) -> TopK(1)                         best B match of each A key
      -> TopK(r) of the best similarities: merged A keys; NonZero of the rest: kept A keys
    every per-key tensor X [B, Nk, C] read by layers l+1.. (inputs of their key/value projections):
      X * size -> GatherElements (kept A) | ScatterElements(add) (merged A into B) -> Concat -> / new size

The head-sum of the keys replaces ToMe's head-mean: cosine similarity does not change under
scaling, and the sum needs no opset-dependent ReduceMean. Merging the projection inputs
``memory + key_pos`` and ``memory`` with the same sizes equals merging memory and key_pos
separately (a weighted average is linear). The size tensor ``[B, Nk, 1]`` starts at ones.

Limits (clear errors): fused attention ops (no separate key tensor to read), key padding
masks, projections shared by layers with different key counts (``prepare`` first undoes
onnxsim's merged projections). The similarity matrix is ``[B, Nk/2, Nk/2]`` (576 MB per
batch element at 24000 keys) and TopK selects ``r_l`` keys, beyond TensorRT's K <= 3840 on
large inputs: this baseline targets ONNX Runtime.
"""
from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from edgeprune._lazy import require
from edgeprune.errors import InternalError, ParameterError, PatternNotFoundError
from edgeprune.methods.tome import ToMeConfig, max_merges
from edgeprune.passes.registry import BasePass
from edgeprune.passes.structure import DecoderLayer, DecoderStructure, ProjectionInput

log = logging.getLogger(__name__)

PREFIX = "tome/"
MIN_OPSET = 16          # ScatterElements(reduction="add")


@dataclass(frozen=True)
class MergeStep:
    """One merge after decoder layer ``layer``: ``num_keys`` -> ``num_keys - r`` keys."""

    layer: int
    r: int
    num_keys: int
    keys_t: str            # input 1 of the layer's QK^T MatMul: K^T [B, h, d, Nk] or [B*h, d, Nk]


@dataclass(frozen=True)
class ToMePlan:
    """What the rewrite inserts; computed from the structure (no graph edit)."""

    steps: tuple[MergeStep, ...]
    batch: int
    num_heads: int
    keys_per_layer: tuple[int, ...]      # keys each layer attends to after merging


def plan_tome(model: Any, structure: DecoderStructure, config: ToMeConfig) -> ToMePlan:
    """Check the structure supports ToMe and locate each merging layer's keys (no graph edit)."""
    from edgeprune.passes.attention_match import score_path
    from edgeprune.passes.matching import GraphIndex

    per_layer = config.validate(structure.num_keys, structure.num_layers)
    _check_opset(model)
    index = GraphIndex.build(model)
    steps, keys, widths = [], structure.num_keys, []
    last = structure.num_layers - 1
    for layer, r_l in zip(structure.layers, per_layer):
        widths.append(keys)
        if r_l > 0 and layer.index < last:                 # a merge after the last layer feeds nothing
            steps.append(MergeStep(layer.index, r_l, keys, _keys_tensor(index, layer, score_path)))
            keys -= r_l
    for layer in structure.layers[1:]:
        _check_layer(layer)
    return ToMePlan(tuple(steps), structure.batch, structure.num_heads, tuple(widths))


def _check_opset(model: Any) -> None:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ParameterError(f"the ToMe pass needs opset >= {MIN_OPSET} (ScatterElements with reduction) but the "
                             f"model is opset {opset}; re-export with --opset 17")


def _keys_tensor(index: Any, layer: DecoderLayer, score_path: Any) -> str:
    """K^T read by the layer's QK^T MatMul; refuses fused attention (no key tensor to read)."""
    where = f"decoder layer {layer.index}"
    if layer.probs.layout == "fused" or layer.probs.tensor is None:
        raise PatternNotFoundError(f"ToMe needs the key tensor of {where}'s attention, but it is a fused "
                                   "attention op; use --method tggbc, or export with unfused attention")
    softmax = index.producer.get(layer.probs.tensor)
    path = score_path(index, softmax) if softmax is not None and softmax.op_type == "Softmax" else None
    if path is None:
        raise PatternNotFoundError(f"ToMe could not find the QK^T MatMul before {layer.probs.tensor} ({where}); "
                                   "name the probabilities with --override layer.N.probs=TENSOR")
    keys_t = path.qk.input[1]
    shape = index.shape(keys_t)
    if shape is None or len(shape) not in (3, 4) or shape[-1] != layer.num_keys:
        raise PatternNotFoundError(f"ToMe expects K^T [B, h, d, Nk] or [B*h, d, Nk] with Nk={layer.num_keys} at "
                                   f"{keys_t} ({where}), found shape {shape}")
    return keys_t


def _check_layer(layer: DecoderLayer) -> None:
    """A later layer's keys must be mergeable: no mask, a known batch axis."""
    if layer.masks:
        raise PatternNotFoundError(f"decoder layer {layer.index} applies a key mask ({layer.masks[0].tensor}); "
                                   "ToMe cannot merge masked keys: use --method tggbc")
    for pin in layer.key_inputs + layer.value_inputs:
        if pin.batch_axis is None and pin.key_axis != 0:
            raise PatternNotFoundError(f"decoder layer {layer.index}: cannot tell the batch axis of {pin.tensor}; "
                                       "ToMe needs key/value projection inputs [B, Nk, E] or [Nk, B, E]")


class _Builder:
    """Appends ``tome/``-named nodes and initializers to a graph; names are unique."""

    def __init__(self, graph: Any) -> None:
        self.graph, self.count = graph, 0
        self.helper = require("onnx.helper")
        self.numpy_helper = require("onnx.numpy_helper")

    def name(self, what: str) -> str:
        self.count += 1
        return f"{PREFIX}{what}_{self.count}"

    def const(self, what: str, value: Any) -> str:
        name = self.name(what)
        self.graph.initializer.append(self.numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], what: str, outputs: int = 1, **attrs: Any) -> Any:
        name = self.name(what)
        outs = [name] if outputs == 1 else [f"{name}:{i}" for i in range(outputs)]
        self.graph.node.append(self.helper.make_node(op_type, list(inputs), outs, name=name, **attrs))
        return outs[0] if outputs == 1 else outs

    def ints(self, what: str, *values: int) -> str:
        return self.const(what, np.asarray(values, dtype=np.int64))

    def take_every_other(self, x: str, start: int, n: int) -> str:
        """x[:, start::2] along axis 1."""
        return self.op("Slice", [x, self.ints("start", start), self.ints("end", n), self.ints("axis", 1),
                                 self.ints("step", 2)], "split")


@dataclass(frozen=True)
class _Matching:
    """Tensors of one matching (all int64): positions in A and B as in methods.tome.Matching."""

    unmerged: str      # [B, Na - r]
    merged: str        # [B, r]
    destination: str   # [B, r]
    step: MergeStep


def _metric(b: _Builder, step: MergeStep, batch: int, heads: int) -> str:
    """K^T -> normalised head-sum of the keys [B, Nk, d]."""
    kt = b.op("Reshape", [step.keys_t, b.ints("shape", batch, heads, -1, step.num_keys)], "keys")   # [B, h, d, Nk]
    summed = b.op("ReduceSum", [kt, b.ints("axes", 1)], "head_sum", keepdims=0)                    # [B, d, Nk]
    metric = b.op("Transpose", [summed], "metric", perm=[0, 2, 1])                                  # [B, Nk, d]
    norm = b.op("Sqrt", [b.op("ReduceSum", [b.op("Mul", [metric, metric], "sq"), b.ints("axes", -1)],
                              "sumsq", keepdims=1)], "norm")                                        # [B, Nk, 1]
    return b.op("Div", [metric, norm], "unit")


def _matching(b: _Builder, step: MergeStep, batch: int, heads: int) -> _Matching:
    """Bipartite soft matching (methods.tome.bipartite_soft_matching) in ONNX ops."""
    unit = _metric(b, step, batch, heads)
    na = max_merges(step.num_keys)
    a = b.take_every_other(unit, 0, step.num_keys)                                                  # [B, Na, d]
    bt = b.op("Transpose", [b.take_every_other(unit, 1, step.num_keys)], "b_t", perm=[0, 2, 1])     # [B, d, Nb]
    scores = b.op("MatMul", [a, bt], "similarity")                                                  # [B, Na, Nb]
    best, best_idx = b.op("TopK", [scores, b.ints("k", 1)], "best", outputs=2, axis=-1, largest=1, sorted=1)
    best = b.op("Squeeze", [best, b.ints("axes", -1)], "best_sim")                                  # [B, Na]
    best_idx = b.op("Squeeze", [best_idx, b.ints("axes", -1)], "best_b")                           # [B, Na]
    _, merged = b.op("TopK", [best, b.ints("k", step.r)], "merged", outputs=2, axis=-1, largest=1, sorted=1)
    destination = b.op("GatherElements", [best_idx, merged], "destination", axis=1)                 # [B, r]
    return _Matching(_unmerged(b, merged, batch, na, step.r), merged, destination, step)


def _unmerged(b: _Builder, merged: str, batch: int, na: int, r: int) -> str:
    """Positions in A not in ``merged`` [B, r], ascending: NonZero lists them in row-major order."""
    flags = b.op("ScatterElements", [b.const("zeros", np.zeros((batch, na), dtype=np.float32)), merged,
                                     b.const("ones", np.ones((batch, r), dtype=np.float32))], "is_merged", axis=1)
    kept = b.op("Equal", [flags, b.const("zero", np.zeros((), dtype=np.float32))], "is_kept")     # [B, Na] bool
    where = b.op("NonZero", [kept], "kept_where")                                                  # [2, B*(Na-r)]
    positions = b.op("Gather", [where, b.ints("row", 1)], "kept_pos", axis=0)                      # [1, B*(Na-r)]
    return b.op("Reshape", [positions, b.ints("shape", batch, na - r)], "unmerged")                # [B, Na - r]


def _expand_index(b: _Builder, index: str, rows: int, width: int, batch: int) -> str:
    """[B, M] -> [B, M, C] for GatherElements / ScatterElements along axis 1."""
    return b.op("Expand", [b.op("Unsqueeze", [index, b.ints("axes", -1)], "idx3"),
                           b.ints("shape", batch, rows, width)], "idx")


def _merge_sum(b: _Builder, x: str, m: _Matching, width: int, batch: int) -> str:
    """methods.tome.merge_sum: [B, Nk, C] -> [B, Nk - r, C]."""
    n, r = m.step.num_keys, m.step.r
    na = max_merges(n)
    src, dst = b.take_every_other(x, 0, n), b.take_every_other(x, 1, n)
    kept = b.op("GatherElements", [src, _expand_index(b, m.unmerged, na - r, width, batch)], "kept", axis=1)
    moved = b.op("GatherElements", [src, _expand_index(b, m.merged, r, width, batch)], "moved", axis=1)
    dst = b.op("ScatterElements", [dst, _expand_index(b, m.destination, r, width, batch), moved], "into_b",
               axis=1, reduction="add")                                                              # [B, Nb, C]
    return b.op("Concat", [kept, dst], "merged_keys", axis=1)


@dataclass
class _Chains:
    """Merged copies of per-key tensors, by (original tensor, number of merges applied)."""

    builder: _Builder
    batch: int
    matchings: list[_Matching]
    sizes: list[str]                    # sizes[s]: [B, Nk_s, 1] after s merges (sizes[0] unused: ones)
    cache: dict[tuple[str, int], str]

    def merged(self, tensor: str, width: int, stage: int) -> str:
        """``tensor`` [B, Nk, C] after the first ``stage`` merges (size-weighted)."""
        if stage == 0:
            return tensor
        key = (tensor, stage)
        if key not in self.cache:
            prev = self.merged(tensor, width, stage - 1)
            weighted = prev if stage == 1 else self.builder.op("Mul", [prev, self.sizes[stage - 1]], "weighted")
            summed = _merge_sum(self.builder, weighted, self.matchings[stage - 1], width, self.batch)
            self.cache[key] = self.builder.op("Div", [summed, self.sizes[stage]], "average")
        return self.cache[key]


def _sizes(b: _Builder, matchings: list[_Matching], batch: int) -> list[str]:
    """Sizes after each merge: sizes[s] [B, Nk_s, 1]; sizes[0] is ones [B, Nk, 1]."""
    first = matchings[0].step.num_keys if matchings else 0
    sizes = [b.const("ones", np.ones((batch, first, 1), dtype=np.float32))]
    for m in matchings:
        sizes.append(_merge_sum(b, sizes[-1], m, 1, batch))
    return sizes


def _to_batch_first(b: _Builder, pin: ProjectionInput) -> tuple[str, bool]:
    """The projection input as [B, Nk, C]; True when it was [Nk, B, C] (transpose back after)."""
    if pin.key_axis == 1 and pin.batch_axis == 0:
        return pin.tensor, False
    if pin.key_axis == 0 and pin.batch_axis == 1:
        return b.op("Transpose", [pin.tensor], "batch_first", perm=[1, 0, 2]), True
    if pin.key_axis == 0 and pin.batch_axis is None:
        return b.op("Unsqueeze", [pin.tensor, b.ints("axes", 0)], "batch_first"), False
    raise PatternNotFoundError(f"ToMe cannot merge {pin.tensor}: keys on axis {pin.key_axis}, batch on axis "
                               f"{pin.batch_axis}; it needs [B, Nk, E] or [Nk, B, E]")


def _merged_input(chains: _Chains, index: Any, pin: ProjectionInput, stage: int) -> str:
    """The projection input of a later layer after ``stage`` merges, in its original layout."""
    b = chains.builder
    width = int(index.shape(pin.tensor)[-1])
    source, transposed = _to_batch_first(b, pin)
    merged = chains.merged(source, width, stage)
    if transposed:
        return b.op("Transpose", [merged], "keys_first", perm=[1, 0, 2])
    if pin.key_axis == 0 and pin.batch_axis is None:
        return b.op("Squeeze", [merged, b.ints("axes", 0)], "unbatched")
    return merged


def rewrite_tome(model: Any, structure: DecoderStructure, plan: ToMePlan) -> Any:
    """Insert the merges of ``plan`` into ``model`` (in place) and feed later layers the merged keys."""
    from edgeprune.passes.matching import GraphIndex

    if not plan.steps:
        return model
    index = GraphIndex.build(model)
    b = _Builder(model.graph)
    matchings = [_matching(b, step, plan.batch, plan.num_heads) for step in plan.steps]
    chains = _Chains(b, plan.batch, matchings, _sizes(b, matchings, plan.batch), {})
    _check_projections_private(index, structure, plan)
    shapes = _ShapeRetarget(b, index, structure.num_keys, plan.batch)
    for layer in structure.layers:
        stage = sum(1 for s in plan.steps if s.layer < layer.index)
        if stage == 0:
            continue
        keys = plan.keys_per_layer[layer.index]
        for pin in layer.key_inputs + layer.value_inputs:
            _feed(index, pin, _merged_input(chains, index, pin, stage), shapes, keys)
        for name in layer.key_path_nodes:
            shapes.retarget(index.nodes[name], keys)
    del model.graph.value_info[:]      # shapes of later layers changed; ORT re-infers them
    toposort(model)
    return model


def _check_projections_private(index: Any, structure: DecoderStructure, plan: ToMePlan) -> None:
    """A projection node read by layers that see different key counts cannot be rewired."""
    seen: dict[str, int] = {}
    for layer in structure.layers:
        stage = sum(1 for s in plan.steps if s.layer < layer.index)
        for pin in layer.key_inputs + layer.value_inputs:
            proj = pin.projection or pin.consumer
            if seen.setdefault(proj, stage) != stage:
                raise PatternNotFoundError(
                    f"the key/value projection {proj} is shared by decoder layers that see different numbers of "
                    f"keys (layer {layer.index}); ToMe cannot merge keys for only some of them (simplify the "
                    "model without merging projections, or use --method tggbc)")


def _feed(index: Any, pin: ProjectionInput, tensor: str, shapes: "_ShapeRetarget", keys: int) -> None:
    """Make this layer's projection read ``tensor`` instead of ``pin.tensor``.

    The projection's own input is rewired; when a flattening Reshape sits in between
    (``consumer != projection``, possibly shared with earlier layers) the layer gets a private
    copy of it with Nk retargeted.
    """
    proj_name = pin.projection or pin.consumer
    if proj_name == pin.consumer:
        index.nodes[proj_name].input[pin.input_index] = tensor
        return
    flatten, proj = index.nodes[pin.consumer], index.nodes[proj_name]
    private = shapes.builder.op("Reshape", [tensor, shapes.retargeted(flatten.input[1], keys)], "flatten")
    proj.input[:] = [private if i == flatten.output[0] else i for i in proj.input]


class _ShapeRetarget:
    """Private copies of constant Reshape targets with Nk (or B*Nk) replaced by a layer's keys.

    Static exports bake Nk into the head reshapes of the key and value projections (and B*Nk
    into a flattening Reshape before a 2-D Gemm); shape constants are often shared between
    layers, so every rewired Reshape gets its own copy.
    """

    def __init__(self, builder: _Builder, index: Any, old_keys: int, batch: int) -> None:
        self.builder, self.index, self.old_keys, self.batch = builder, index, old_keys, batch

    def retargeted(self, shape_tensor: str, keys: int) -> str:
        value = self.index.value(shape_tensor)
        if value is None:
            raise PatternNotFoundError(f"the Reshape target {shape_tensor} on a key path is computed at run time; "
                                       "ToMe needs static shapes (export with static input shapes)")
        shape = np.asarray(value, dtype=np.int64).copy()
        flat = shape == self.old_keys * self.batch
        shape[shape == self.old_keys] = keys
        shape[flat] = keys * self.batch
        return self.builder.const("shape", shape)

    def retarget(self, node: Any, keys: int) -> None:
        if node.op_type == "Reshape" and not self.index.is_constant(node.input[0]):
            value = self.index.value(node.input[1])
            if value is not None and np.isin(np.asarray(value), (self.old_keys, self.old_keys * self.batch)).any():
                node.input[1] = self.retargeted(node.input[1], keys)


def toposort(model: Any) -> None:
    """Order ``model.graph.node`` topologically (in place; stable for already ordered nodes)."""
    graph = model.graph
    produced = {out: i for i, n in enumerate(graph.node) for out in n.output if out}
    deps = [{produced[x] for x in n.input if x in produced} for n in graph.node]
    users: dict[int, list[int]] = {}
    for i, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(i)
    waiting = [len(d) for d in deps]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, ()):
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(graph.node):
        raise InternalError("the ToMe rewrite created a cycle in the graph")
    nodes = [graph.node[i] for i in order]
    del graph.node[:]
    graph.node.extend(nodes)


def apply_tome(model: Any, structure: DecoderStructure, config: ToMeConfig) -> Any:
    """Plan and rewrite in one call (``model`` is modified and returned)."""
    plan = plan_tome(model, structure, config)
    log.info("ToMe: merges after layers %s, keys per layer %s", [s.layer for s in plan.steps],
             list(plan.keys_per_layer))
    return rewrite_tome(model, structure, plan)


class TokenMergingPass(BasePass):
    """``--method tome --r R --n N``: ToMe merging of the keys with tgGBC's schedule (a baseline)."""

    name = "tome"
    help = ("ToMe baseline: merge the r most similar image tokens (bipartite soft matching of the keys) "
            "over the first n decoder layers")
    requires = frozenset({"probs", "key", "value"})

    def __init__(self, r: int, n: int = 1) -> None:
        if r < 0 or n < 0:
            raise ParameterError(f"--r and --n must be >= 0 (got --r {r} --n {n})")
        self.config = ToMeConfig(r=r, n=n)

    @classmethod
    def add_arguments(cls, group: Any) -> None:
        # Same flags as the tgGBC pass: whichever registers first defines them (registry._SharedGroup).
        group.add_argument("--r", "--keys-pruned", dest="r", type=int, default=None, metavar="R",
                           help="keys (image tokens) pruned in total (tgGBC, ToMe)")
        group.add_argument("--n", "--pruning-layers", dest="n", type=int, default=None, metavar="N",
                           help="number of decoder layers that prune, from the first (default 1)")

    @classmethod
    def from_args(cls, args: Any) -> "TokenMergingPass":
        r = getattr(args, "r", None)
        if r is None:
            raise ParameterError("--method tome needs --r R (keys merged in total), e.g. --r 2000 --n 2")
        for option in ("k", "class_reduce", "no_class_score", "tensorrt"):
            if getattr(args, option, None):
                raise ParameterError(f"--{option.replace('_', '-')} is a tgGBC option; --method tome takes --r and --n")
        n = getattr(args, "n", None)
        return cls(r=r, n=1 if n is None else n)

    def prepare(self, model: Any) -> Any:
        """Undo onnxsim's merged key projections (one MatMul + Split for all layers): later layers
        must read fewer keys than earlier ones. Nothing changes when nothing is merged."""
        if self.config.enabled:
            from edgeprune.passes.normalize import split_shared_projections

            split_shared_projections(model)
        return model

    def apply(self, model: Any, structure: DecoderStructure) -> Any:
        return apply_tome(model, structure, self.config)

    def __repr__(self) -> str:
        return f"TokenMergingPass(r={self.config.r}, n={self.config.n})"
