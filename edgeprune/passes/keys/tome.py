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
Feeding the merged tensors to the later layers (rewiring, static shapes, per-stage copies of
shared key-path nodes ``tome/l{l}/copy/``) is :mod:`edgeprune.passes.keys.feed`, shared with tgGBC.

Limits (clear errors): fused attention ops (no separate key tensor to read), key padding
masks, projections shared by layers with different key counts (``prepare`` first undoes
onnxsim's merged projections), flattening Reshapes with run-time targets. The similarity
matrix is ``[B, Nk/2, Nk/2]`` (576 MB per batch element at 24000 keys) and TopK selects
``r_l`` keys, beyond TensorRT's K <= 3840 on large inputs: this baseline targets ONNX Runtime.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from edgeprune._lazy import require
from edgeprune.errors import ParameterError, PatternNotFoundError
from edgeprune.methods.tome import ToMeConfig, max_merges
from edgeprune.graph.edit import GraphEditor, WorkingModel, model_opset
from edgeprune.passes.keys.feed import (KeyAxes, KeyFeeder, KeyFeedPlan, KeyReductionPass, check_key_counts,
                                      key_counts_from_args, projection_inputs, refuse_tggbc_options)
from edgeprune.passes.discovery.structure import DecoderLayer, DecoderStructure

log = logging.getLogger(__name__)

PREFIX = "tome/"
MIN_OPSET = 16          # ScatterElements(reduction="add")


# --------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class MergeStep:
    """One merge after decoder layer ``layer``: ``num_keys`` -> ``num_keys - r`` keys."""

    layer: int
    r: int
    num_keys: int
    keys_t: str            # input 1 of the layer's QK^T MatMul: K^T [B, h, d, Nk] or [B*h, d, Nk]
    qk_node: str = ""      # that MatMul (the merge reads its input as wired when it is built)


@dataclass(frozen=True)
class ToMePlan:
    """What the rewrite inserts; computed from the structure (no graph edit)."""

    steps: tuple[MergeStep, ...]
    batch: int
    num_heads: int
    keys_per_layer: tuple[int, ...]      # keys each layer attends to after merging
    widths: tuple[tuple[str, int], ...] = ()   # (projection input, its feature size C) of the merged layers

    def feed(self, structure: DecoderStructure) -> KeyFeedPlan:
        """Which keys each layer reads, for :class:`~edgeprune.passes.keys.feed.KeyFeeder`."""
        return KeyFeedPlan.after_layers("ToMe", PREFIX, structure, [s.layer for s in self.steps],
                                        self.keys_per_layer)

    def width(self, tensor: str) -> int:
        return dict(self.widths)[tensor]


def plan_tome(model: Any, structure: DecoderStructure, config: ToMeConfig) -> ToMePlan:
    """Check the structure supports ToMe and locate each merging layer's keys (no graph edit)."""
    from edgeprune.graph.index import GraphIndex

    per_layer = config.validate(structure.num_keys, structure.num_layers)
    index = GraphIndex.build(model)
    steps, keys, widths = [], structure.num_keys, []
    last = structure.num_layers - 1
    for layer, r_l in zip(structure.layers, per_layer):
        widths.append(keys)
        if r_l > 0 and layer.index < last:                 # a merge after the last layer feeds nothing
            steps.append(MergeStep(layer.index, r_l, keys, *_keys_tensor(index, layer)))
            keys -= r_l
    for layer in structure.layers[1:]:
        _check_layer(layer)
    plan = ToMePlan(tuple(steps), structure.batch, structure.num_heads, tuple(widths))
    if not steps:
        return plan                          # nothing merged: any opset
    _check_opset(model)
    stages = plan.feed(structure).stages
    _check_projections_private(structure, stages)
    later = [layer for layer in structure.layers if stages[layer.index] > 0]
    return dataclasses.replace(plan, widths=_feature_widths(index, later))


def _check_opset(model: Any) -> None:
    opset = model_opset(model)
    if opset < MIN_OPSET:
        raise ParameterError(f"the ToMe pass needs opset >= {MIN_OPSET} (ScatterElements with reduction) but the "
                             f"model is opset {opset}; re-export with --opset 17")


def _keys_tensor(index: Any, layer: DecoderLayer) -> tuple[str, str]:
    """(K^T, the QK^T MatMul reading it) of the layer's attention; refuses fused attention."""
    from edgeprune.passes.discovery.attention import score_path

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
    return keys_t, path.qk.name


def _check_layer(layer: DecoderLayer) -> None:
    """A later layer's keys must be mergeable: no mask, a known batch axis."""
    if layer.masks:
        raise PatternNotFoundError(f"decoder layer {layer.index} applies a key mask ({layer.masks[0].tensor}); "
                                   "ToMe cannot merge masked keys: use --method tggbc")
    for pin in projection_inputs(layer):
        if pin.batch_axis is None and pin.key_axis != 0:
            raise PatternNotFoundError(f"decoder layer {layer.index}: cannot tell the batch axis of {pin.tensor}; "
                                       "ToMe needs key/value projection inputs [B, Nk, E] or [Nk, B, E]")


def _check_projections_private(structure: DecoderStructure, stages: tuple[int, ...]) -> None:
    """A projection node read by layers that see different key counts cannot be rewired."""
    seen: dict[str, int] = {}
    for layer in structure.layers:
        for pin in projection_inputs(layer):
            proj = pin.projection or pin.consumer
            if seen.setdefault(proj, stages[layer.index]) != stages[layer.index]:
                raise PatternNotFoundError(
                    f"the key/value projection {proj} is shared by decoder layers that see different numbers of "
                    f"keys (layer {layer.index}); ToMe cannot merge keys for only some of them (simplify the "
                    "model without merging projections, or use --method tggbc)")


def _feature_widths(index: Any, layers: list[DecoderLayer]) -> tuple[tuple[str, int], ...]:
    """C of every projection input [.., Nk, C] the merges rewrite; a flattening Reshape between it
    and its projection (``consumer != projection``) must have a static target to retarget."""
    widths: dict[str, int] = {}
    for layer in layers:
        for pin in projection_inputs(layer):
            shape = index.shape(pin.tensor)
            if not shape or not isinstance(shape[-1], int):
                raise PatternNotFoundError(f"ToMe needs the static feature size of {pin.tensor} (decoder layer "
                                           f"{layer.index}), found shape {shape}; export with static input shapes")
            widths[pin.tensor] = int(shape[-1])
            if (pin.projection or pin.consumer) != pin.consumer:
                target = index.nodes[pin.consumer].input[1]
                if index.value(target) is None:
                    raise PatternNotFoundError(f"the Reshape target {target} on a key path is computed at run "
                                               "time; ToMe needs static shapes (export with static input shapes)")
    return tuple(sorted(widths.items()))


# --------------------------------------------------------------------------- matching
@dataclass(frozen=True)
class _Matching:
    """Tensors of one matching (all int64): positions in A and B as in methods.tome.Matching."""

    unmerged: Any      # [B, Na - r]
    merged: Any        # [B, r]
    destination: Any   # [B, r]
    step: MergeStep


def _every_other(ed: GraphEditor, x: Any, start: int, n: int) -> Any:
    """x[:, start::2] along axis 1."""
    return ed.op("Slice", [x, ed.ints("start", start), ed.ints("end", n), ed.ints("axis", 1), ed.ints("step", 2)],
                 "split")


def _metric(ed: GraphEditor, step: MergeStep, batch: int, heads: int) -> Any:
    """K^T (as currently wired: already merged keys for a later merge) -> normalised head-sum [B, Nk, d]."""
    keys_t = ed.node(step.qk_node).inputs[1]
    kt = ed.reshape(keys_t, "keys", batch, heads, -1, step.num_keys)                              # [B, h, d, Nk]
    summed = ed.op("ReduceSum", [kt, ed.ints("axes", 1)], "head_sum", keepdims=0)                 # [B, d, Nk]
    metric = ed.op("Transpose", [summed], "metric", perm=[0, 2, 1])                               # [B, Nk, d]
    norm = ed.op("Sqrt", [ed.op("ReduceSum", [ed.op("Mul", [metric, metric], "sq"), ed.ints("axes", -1)],
                                "sumsq", keepdims=1)], "norm")                                    # [B, Nk, 1]
    return ed.op("Div", [metric, norm], "unit")


def _matching(ed: GraphEditor, step: MergeStep, batch: int, heads: int) -> _Matching:
    """Bipartite soft matching (methods.tome.bipartite_soft_matching) in ONNX ops."""
    unit = _metric(ed, step, batch, heads)
    na = max_merges(step.num_keys)
    a = _every_other(ed, unit, 0, step.num_keys)                                                  # [B, Na, d]
    bt = ed.op("Transpose", [_every_other(ed, unit, 1, step.num_keys)], "b_t", perm=[0, 2, 1])    # [B, d, Nb]
    scores = ed.op("MatMul", [a, bt], "similarity")                                               # [B, Na, Nb]
    best, best_idx = ed.op("TopK", [scores, ed.ints("k", 1)], "best", outputs=2, axis=-1, largest=1, sorted=1)
    best = ed.op("Squeeze", [best, ed.ints("axes", -1)], "best_sim")                              # [B, Na]
    best_idx = ed.op("Squeeze", [best_idx, ed.ints("axes", -1)], "best_b")                        # [B, Na]
    _, merged = ed.op("TopK", [best, ed.ints("k", step.r)], "merged", outputs=2, axis=-1, largest=1, sorted=1)
    destination = ed.op("GatherElements", [best_idx, merged], "destination", axis=1)              # [B, r]
    return _Matching(_unmerged(ed, merged, batch, na, step.r), merged, destination, step)


def _unmerged(ed: GraphEditor, merged: Any, batch: int, na: int, r: int) -> Any:
    """Positions in A not in ``merged`` [B, r], ascending: NonZero lists them in row-major order."""
    flags = ed.op("ScatterElements", [ed.const("zeros", np.zeros((batch, na), dtype=np.float32)), merged,
                                      ed.const("ones", np.ones((batch, r), dtype=np.float32))], "is_merged", axis=1)
    kept = ed.op("Equal", [flags, ed.const("zero", np.zeros((), dtype=np.float32))], "is_kept")   # [B, Na] bool
    where = ed.op("NonZero", [kept], "kept_where")                                                # [2, B*(Na-r)]
    positions = ed.op("Gather", [where, ed.ints("row", 1)], "kept_pos", axis=0)                   # [1, B*(Na-r)]
    return ed.reshape(positions, "unmerged", batch, na - r)                                       # [B, Na - r]


def _expand_index(ed: GraphEditor, index: Any, rows: int, width: int, batch: int) -> Any:
    """[B, M] -> [B, M, C] for GatherElements / ScatterElements along axis 1."""
    return ed.op("Expand", [ed.op("Unsqueeze", [index, ed.ints("axes", -1)], "idx3"),
                            ed.ints("shape", batch, rows, width)], "idx")


def _merge_sum(ed: GraphEditor, x: Any, m: _Matching, width: int, batch: int) -> Any:
    """methods.tome.merge_sum: [B, Nk, C] -> [B, Nk - r, C]."""
    n, r = m.step.num_keys, m.step.r
    na = max_merges(n)
    src, dst = _every_other(ed, x, 0, n), _every_other(ed, x, 1, n)
    kept = ed.op("GatherElements", [src, _expand_index(ed, m.unmerged, na - r, width, batch)], "kept", axis=1)
    moved = ed.op("GatherElements", [src, _expand_index(ed, m.merged, r, width, batch)], "moved", axis=1)
    dst = ed.op("ScatterElements", [dst, _expand_index(ed, m.destination, r, width, batch), moved], "into_b",
                axis=1, reduction="add")                                                            # [B, Nb, C]
    return ed.op("Concat", [kept, dst], "merged_keys", axis=1)


# --------------------------------------------------------------------------- merging
@dataclass
class _Merger:
    """The key transform of ToMe: size-weighted merges of per-key tensors, one copy per (tensor, stage)."""

    ed: GraphEditor
    plan: ToMePlan
    matchings: list[_Matching] = field(default_factory=list)
    sizes: list[Any] = field(default_factory=list)      # sizes[s]: [B, Nk_s, 1] after s merges (sizes[0]: ones)
    batch_first: dict[tuple[str, KeyAxes], Any] = field(default_factory=dict)
    cache: dict[tuple[str, int], Any] = field(default_factory=dict)     # (batch-first tensor, stage) -> merged

    def add(self, m: _Matching) -> None:
        """The next merge; its sizes follow from the previous ones."""
        if not self.sizes:
            self.sizes.append(self.ed.const("ones", np.ones((self.plan.batch, m.step.num_keys, 1), dtype=np.float32)))
        self.matchings.append(m)
        self.sizes.append(_merge_sum(self.ed, self.sizes[-1], m, 1, self.plan.batch))

    def scope(self, stage: int) -> str:
        return PREFIX

    def __call__(self, data: Any, axes: KeyAxes, stage: int) -> Any:
        """A projection input after ``stage`` merges, in its original layout."""
        key = (data.name, axes)
        if key not in self.batch_first:
            self.batch_first[key] = _to_batch_first(self.ed, data, axes)
        source = self.batch_first[key]                                                  # [B, Nk, C]
        merged = self._merged(source, self.plan.width(data.name), stage)               # [B, Nk_s, C]
        if axes.key_axis == 0 and axes.batch_axis == 1:
            return self.ed.op("Transpose", [merged], "keys_first", perm=[1, 0, 2])
        if axes.key_axis == 0 and axes.batch_axis is None:
            return self.ed.op("Squeeze", [merged, self.ed.ints("axes", 0)], "unbatched")
        return merged

    def _merged(self, tensor: Any, width: int, stage: int) -> Any:
        """``tensor`` [B, Nk, C] after the first ``stage`` merges (size-weighted)."""
        if stage == 0:
            return tensor
        key = (tensor.name, stage)
        if key not in self.cache:
            prev = self._merged(tensor, width, stage - 1)
            weighted = prev if stage == 1 else self.ed.op("Mul", [prev, self.sizes[stage - 1]], "weighted")
            summed = _merge_sum(self.ed, weighted, self.matchings[stage - 1], width, self.plan.batch)
            self.cache[key] = self.ed.op("Div", [summed, self.sizes[stage]], "average")
        return self.cache[key]


def _to_batch_first(ed: GraphEditor, data: Any, axes: KeyAxes) -> Any:
    """A projection input [B, Nk, C], [Nk, B, C] or [Nk, C] as [B, Nk, C]."""
    if axes.key_axis == 1 and axes.batch_axis == 0:
        return data
    if axes.key_axis == 0 and axes.batch_axis == 1:
        return ed.op("Transpose", [data], "batch_first", perm=[1, 0, 2])
    if axes.key_axis == 0 and axes.batch_axis is None:
        return ed.op("Unsqueeze", [data, ed.ints("axes", 0)], "batch_first")
    raise PatternNotFoundError(f"ToMe cannot merge {data.name}: keys on axis {axes.key_axis}, batch on axis "
                               f"{axes.batch_axis}; it needs [B, Nk, E] or [Nk, B, E]")


# --------------------------------------------------------------------------- the rewrite
def rewrite_tome(working: WorkingModel, structure: DecoderStructure, plan: ToMePlan) -> None:
    """Insert the merges of ``plan`` and feed later layers the merged keys, in place.

    Leaves ``working`` untouched when the plan merges nothing.
    """
    if not plan.steps:
        return
    gs = require("onnx_graphsurgeon")
    opset = model_opset(working.proto())
    ed = GraphEditor(gs, working.graph(), opset, {}, scope=PREFIX)
    merger = _Merger(ed, plan)
    feeder = KeyFeeder(ed, structure, plan.feed(structure), merger)
    for s, step in enumerate(plan.steps):
        merger.add(_matching(ed, step, plan.batch, plan.num_heads))
        feeder.feed_stage(s + 1)


def apply_tome(working: WorkingModel, structure: DecoderStructure, config: ToMeConfig) -> None:
    """Plan and rewrite in one call."""
    plan = plan_tome(working.proto(), structure, config)
    log.info("ToMe: merges after layers %s, keys per layer %s", [s.layer for s in plan.steps],
             list(plan.keys_per_layer))
    rewrite_tome(working, structure, plan)


# --------------------------------------------------------------------------- the pass
class TokenMergingPass(KeyReductionPass):
    """``--method tome --r R --n N``: ToMe merging of the keys with tgGBC's schedule (a baseline)."""

    name: ClassVar[str] = "tome"
    help: ClassVar[str] = ("ToMe baseline: merge the r most similar image tokens (bipartite soft matching of the "
                           "keys) over the first n decoder layers")
    min_opset: ClassVar[int] = MIN_OPSET

    def __init__(self, r: int, n: int = 1) -> None:
        check_key_counts(r, n)
        self.config = ToMeConfig(r=r, n=n)

    @classmethod
    def from_args(cls, args: Any) -> TokenMergingPass:
        r, n = key_counts_from_args(args, "tome", "keys merged in total", "--r 2000 --n 2")
        refuse_tggbc_options(args, "tome", "--r and --n")
        return cls(r=r, n=n)

    def apply(self, working: WorkingModel, structure: DecoderStructure) -> None:
        apply_tome(working, structure, self.config)

    def __repr__(self) -> str:
        return f"TokenMergingPass(r={self.config.r}, n={self.config.n})"
