"""tgGBC key pruning as an ONNX graph pass (``edgeprune rewrite --method tggbc``).

Computes in the graph what :mod:`edgeprune.methods.tggbc` computes in PyTorch (the oracle;
``shared/docs/methods.md`` states the method). For each pruning layer ``l`` of the schedule
the pass inserts, all named ``tggbc/l{l}/...`` (the fp16 pass keeps that prefix in fp32)::

    logits_l [B, Nq, C] -> ReduceMax(C) -> Sigmoid                          c [B, Nq]
      (logits not in the graph: the graph's class head copied onto layer l's output,
       tggbc/l{l}/class_head/..., see structure.ClassHead)
      [-> TopK(k) -> GatherElements]                                    (0 < k < Nq: top queries, c [B, k])
    probs_l  [B, h, Nq, Nk_l] | [B*h, Nq, Nk_l] | [B, Nq, Nk_l] (head mean)
      (fused attention: softmax(Q K^T * scale + mask) recomputed from Q, K for the top-k Q rows: fused_probs)
    MatMul(c/h tiled per head [B, 1, h*q], rows [B, h*q, Nk_l])              S [B, Nk_l]
      (0 < k < Nq: the top-k queries' h*k rows, gathered and contracted in cache-sized chunks,
       tggbc/l{l}/rows/gather/, then summed)
    TopK(S, Nk_l - r_l, largest)                                             kept [B, Nk_{l+1}]
    kept indices chained across pruning layers (GatherElements)              into the original keys

and gathers, per batch element, every later layer's key-projection input, value-projection
input and per-key mask with the chained indices (``Gather`` for batch 1, ``GatherND``
with ``batch_dims=1`` otherwise; nodes ``tggbc/l{l}/gather/``), so later layers attend to the
kept keys only and their projections shrink. Where the gathered tensors go (rewiring,
retargeted static shapes ``tggbc/l{l}/shape/``, per-stage copies of shared key-path nodes
``tggbc/l{l}/copy/``) is :mod:`edgeprune.passes.keys.feed`, shared with the ToMe pass.

TensorRT's TopK takes K <= 3840: ``tensorrt=True`` selects more by peeling (TopK of 3840, mask them
out with ScatterElements -inf, repeat), which equals one big TopK exactly (same order and ties).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from edgeprune import _lazy
from edgeprune.errors import InvalidModelError, ParameterError, PatternNotFoundError
from edgeprune.methods.tggbc import CLASS_REDUCTIONS, TgGBCConfig, schedule     # torch-free: config and schedule
from edgeprune.graph.edit import GraphEditor, WorkingModel, model_opset
from edgeprune.graph.shapes import tensor_info
from edgeprune.passes.keys.feed import (KeyAxes, KeyFeeder, KeyFeedPlan, KeyReductionPass, check_key_counts,
                                      constant_value, key_counts_from_args)
from edgeprune.passes.discovery.structure import ClassHead, DecoderLayer, DecoderStructure
from edgeprune.passes.keys.fused_probs import fused_probs

log = logging.getLogger(__name__)

PREFIX = "tggbc/"
ROW_GATHER_SCOPE = "rows/gather/"   # under tggbc/l{l}/: scoring's gathers of the top-k queries' attention rows
TENSORRT_TOPK_LIMIT = 3840      # TensorRT's documented maximum K of ITopKLayer
MIN_OPSET = KeyReductionPass.min_opset   # older graphs are raised in prepare (edgeprune.graph.opset)
METADATA_KEY = "edgeprune.tggbc"

# --------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class PruningStep:
    """Layer ``layer`` scores its ``num_keys`` keys and keeps ``num_keep`` for the later layers."""

    layer: int
    num_keys: int
    num_drop: int
    topk_sizes: tuple[int, ...]      # K of each TopK selecting the kept keys (several: TensorRT peeling)

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
    steps: tuple[PruningStep, ...]
    keys_per_layer: tuple[int, ...]          # keys each layer attends to after pruning
    class_head: ClassHead | None = None      # recomputes the logits of layers whose logits are not in the graph

    @property
    def top_queries(self) -> int:
        """Queries scoring the keys, 0 for all: k >= Nq gives k = 0's sum, built without a query TopK."""
        return self.config.k if self.config.k < self.num_queries else 0

    def stage(self, layer: int) -> int:
        """How many pruning steps happen before ``layer`` (0: it sees all keys)."""
        return sum(1 for s in self.steps if s.layer < layer)

    def feed(self, structure: DecoderStructure) -> KeyFeedPlan:
        """Which keys each layer reads, for :class:`~edgeprune.passes.keys.feed.KeyFeeder`."""
        return KeyFeedPlan.after_layers("tgGBC", PREFIX, structure, [s.layer for s in self.steps],
                                        self.keys_per_layer)


def topk_sizes(keep: int, tensorrt: bool) -> tuple[int, ...]:
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
    drops = schedule(config.r, config.n, structure.num_layers) if config.enabled else [0] * structure.num_layers
    keys, steps, widths = structure.num_keys, [], []
    for layer, drop in zip(structure.layers, drops):
        widths.append(keys)
        if drop > 0 and layer.index < structure.num_layers - 1:
            steps.append(PruningStep(layer.index, keys, drop, topk_sizes(keys - drop, tensorrt)))
            keys -= drop
    plan = KeyPruningPlan(config, tensorrt, structure.batch, structure.num_queries, tuple(steps), tuple(widths),
                          structure.class_head)
    if tensorrt and plan.top_queries > TENSORRT_TOPK_LIMIT:                 # only a query TopK that is built
        raise ParameterError(f"--tensorrt: k={config.k} top queries exceeds TensorRT's TopK limit of "
                             f"{TENSORRT_TOPK_LIMIT}; use k <= {TENSORRT_TOPK_LIMIT} or k=0 (all queries)")
    return plan


# --------------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class ScoringRows:
    """The attention the scoring queries read: ``probs`` viewed as [B, h, Nq', Nk_l] and, when
    only some rows count, ``rows`` [B, k] (indices into Nq') still to be picked from it."""

    probs: Any
    heads: int
    num_rows: int                 # Nq' : rows per head in ``probs``
    source: str                   # the tensor whose float type ``probs`` has (for the fp32 cast)
    rows: Any | None = None


def _per_head_probs(ed: GraphEditor, layer: DecoderLayer, plan: KeyPruningPlan, rows: Any | None) -> ScoringRows:
    """Layer ``layer``'s cross-attention probabilities for the scoring queries ``rows`` [B, k]
    (top-k) or all of them (None).

    A fused op's probabilities are recomputed, from the chosen Q rows alone when its mask is the
    same for every query; a graph tensor is left whole with ``rows`` pending, for
    :func:`_importance` to pick them chunk by chunk.
    """
    p, nq = layer.probs, plan.num_queries
    if p.layout == "fused":
        probs, done = fused_probs(ed, layer, plan.batch, rows)
        return ScoringRows(probs, p.num_heads, plan.top_queries if done else nq, probs.name, None if done else rows)
    layouts = {"BQK_mean": 1, "(BH)QK": p.num_heads, "BHQK": p.num_heads}
    if p.layout not in layouts:
        raise PatternNotFoundError(f"layer {layer.index}: unknown probabilities layout {p.layout!r}")
    return ScoringRows(ed.tensor(p.tensor), layouts[p.layout], nq, p.tensor, rows)    # b-major, as torch's MHA


def _query_selection(ed: GraphEditor, layer: DecoderLayer, plan: KeyPruningPlan) -> tuple[Any, Any | None]:
    """The queries that score the keys: (weights [B, q], their rows into Nq [B, q] or None for all).

    Weights are the class confidence ``c`` (ones for the no-class-score ablation); with ``k > 0`` only
    the top-k queries by ``c`` take part, their rows returned so the caller reads only those rows of the
    attention. ``k >= Nq`` is scored as k = 0 (``plan.top_queries``), without copying all h*Nq rows.
    """
    cfg, b, nq, k = plan.config, plan.batch, plan.num_queries, plan.top_queries
    if not cfg.use_class_score and k <= 0:
        return ed.const("ones", np.ones((b, nq), dtype=np.float32)), None
    logits = ed.reshape(_layer_logits(ed, layer, plan.class_head, len(plan.keys_per_layer)), "logits", b, nq, -1)
    reduce_op = {"max": "ReduceMax", "mean": "ReduceMean", "min": "ReduceMin"}[cfg.class_reduce]
    conf = ed.op("Sigmoid", [ed.reduce(reduce_op, logits, -1, "class_reduce")], "confidence")   # [B, Nq]
    if k <= 0:
        return conf, None
    _, top = ed.op("TopK", [conf, ed.ints("k", k)], "top_queries", outputs=2, axis=-1, largest=1, sorted=1)
    if not cfg.use_class_score:
        return ed.const("ones", np.ones((b, k), dtype=np.float32)), top
    return ed.op("GatherElements", [conf, top], "top_confidence", axis=1), top   # [B, k], [B, k]


def _layer_logits(ed: GraphEditor, layer: DecoderLayer, head: ClassHead | None, num_layers: int) -> Any:
    """Layer ``layer``'s class logits in fp32: the graph's, or its class head copied onto the layer's output.

    The copy reads the layer's output at the position the head reads the last layer's, so it
    computes exactly what the (removed) head of this layer computed: the branch is shared.
    """
    if layer.logits is not None:
        return ed.as_float(ed.tensor(layer.logits), layer.logits)
    if layer.head_input is None or head is None:
        raise PatternNotFoundError(f"tgGBC needs layer {layer.index}'s class logits, which discovery did not find; "
                                   f"supply them with --override layer.{layer.index}.logits=TENSOR")
    copies = ed.clone(head.nodes, {head.entry: ed.tensor(layer.head_input)}, "class_head")
    if head.stacked:
        _unstack_targets(ed, [copies[n.name] for n in _outputs(ed, head.nodes)], num_layers)
    return ed.as_float(copies[head.exit], head.exit)


def _outputs(ed: GraphEditor, names: Any) -> list[Any]:
    return [t for name in names for t in ed.node(name).outputs]


def _unstack_targets(ed: GraphEditor, copies: list[Any], num_layers: int) -> None:
    """A stacked head's static Reshape targets count L layers (onnxsim folds them: [L, B, Nq, C],
    or [L*B*Nq, E] flat); the copy reads one layer, so its targets count one."""
    for tensor in copies:
        node = tensor.inputs[0] if tensor.inputs else None
        target = constant_value(node.inputs[1]) if node is not None and node.op == "Reshape" else None
        if target is None or target.ndim != 1 or len(target) < 2:
            continue
        lead = int(target[0])
        if lead > 0 and lead % num_layers == 0:            # [L, ..] or [L*B*Nq, ..], with or without a -1
            node.inputs[1] = ed.ints("unstacked_shape", lead // num_layers, *map(int, target[1:]))


def _select_keys(ed: GraphEditor, scores: Any, step: PruningStep, batch: int) -> Any:
    """Indices of the ``num_keep`` largest scores [B, Nk_l] -> [B, num_keep].

    Unsorted (``sorted=0``): which keys are kept is all that matters, later layers attend to
    them in any order, and not sorting 13500 of 24000 scores saves 1 of 1.4 ms in ORT. Several
    TopK sizes (TensorRT): take the largest chunk, overwrite it with -inf, repeat (sorted, so
    the concatenation is exactly one big TopK).
    """
    remaining, chunks = scores, []
    in_order = int(len(step.topk_sizes) > 1)      # peeling relies on each chunk being the largest, in order
    for i, size in enumerate(step.topk_sizes):
        _, idx = ed.op("TopK", [remaining, ed.ints("k", size)], "keep", outputs=2, axis=-1, largest=1,
                       sorted=in_order)
        chunks.append(idx)
        if i + 1 < len(step.topk_sizes):
            fill = ed.const("taken", np.full((batch, size), -np.inf, dtype=np.float32))
            remaining = ed.op("ScatterElements", [remaining, idx, fill], "remaining", axis=1)
    return chunks[0] if len(chunks) == 1 else ed.op("Concat", chunks, "kept", axis=1)


def _keep_indices(ed: GraphEditor, layer: DecoderLayer, step: PruningStep, plan: KeyPruningPlan) -> Any:
    """Layer ``layer``'s kept key indices [B, Nk_l - r_l] (into its own keys)."""
    scores = _importance(ed, layer, plan, step.num_keys)                        # [B, Nk_l]
    return _select_keys(ed, scores, step, plan.batch)


SCORE_CHUNK_BYTES = 8 << 20      # attention rows gathered and contracted at a time (fp32 bytes)


def _importance(ed: GraphEditor, layer: DecoderLayer, plan: KeyPruningPlan, keys: int) -> Any:
    """``S_j = sum_i w_i * mean_h A[h, i, j]``: [B, Nk_l].

    The head mean is folded into the weights (``w_i / h``, repeated per head), so every
    attention row is read once by one vector-matrix product, [B, 1, R] x [B, R, Nk_l]:
    all h*Nq rows with k = 0 (a free reshape), or only the top-k queries' h*k rows.
    """
    weights, rows = _query_selection(ed, layer, plan)                           # [B, q], [B, q] | None
    src = _per_head_probs(ed, layer, plan, rows)
    b, h = plan.batch, src.heads
    q = src.num_rows if src.rows is None else plan.top_queries
    per_head = ed.op("Mul", [weights, ed.const("inv_heads", np.float32(1.0 / h))], "head_weights")
    tiled = ed.op("Tile", [ed.op("Unsqueeze", [per_head, ed.ints("axes", 1)], "weights_3d"),
                           ed.ints("repeats", 1, h, 1)], "weights_per_head")    # [B, h, q]
    weights_row = ed.reshape(tiled, "weights_row", b, 1, h * q)                  # row order: b, head, query
    if src.rows is None:
        flat = ed.reshape(ed.as_float(src.probs, src.source), "head_rows", b, h * q, keys)
        scores = ed.op("MatMul", [weights_row, flat], "importance")
    else:
        scores = _contract_rows(ed, src, weights_row, plan, keys)
    return ed.reshape(scores, "scores", b, keys)                                 # [B, Nk_l]


def _contract_rows(ed: GraphEditor, src: ScoringRows, weights_row: Any, plan: KeyPruningPlan, keys: int) -> Any:
    """``weights_row`` [B, 1, h*k] x the picked rows of ``src`` -> [B, 1, Nk_l], a chunk at a time.

    Row ``(b*h + head)*Nq' + rows[b, i]`` of the flattened attention is gathered, at most
    ``SCORE_CHUNK_BYTES`` per Gather, and each chunk is contracted right away, so the rows are
    read from memory once and the gathered copy is read back from cache. Why chunks, from ORT's
    per-node profile of the 24000-key decoder (one pruning layer, 1400 rows of 96 KB): one
    Gather of all rows then one product, 10.9 ms; 8 MB chunks, 6.9 ms (4 / 16 MB: 7.5 / 7.7);
    the earlier product over all Nq rows, 13.9 ms.
    The gathers are named ``.../rows/gather/``, so the fp16 pass moves these rows in fp16.
    """
    b, h, nq, k = plan.batch, src.heads, src.num_rows, plan.top_queries
    total = h * k
    per_chunk = max(1, min(total, SCORE_CHUNK_BYTES // (4 * max(keys, 1))))
    scope = f"{ed.scope}{ROW_GATHER_SCOPE}"
    with ed.scoped(scope):
        flat = ed.reshape(src.probs, "flat_rows", b * h * nq, -1)               # [B*h*Nq', Nk]
        base = ed.const("row_base", (np.arange(b * h, dtype=np.int64) * nq).reshape(b, h, 1))
        index = ed.reshape(ed.op("Add", [base, ed.op("Unsqueeze", [src.rows, ed.ints("axes", 1)], "rows_3d")],
                                 "row_index"), "row_index_flat", b, total)        # [B, h*k]
    parts = []
    for start in range(0, total, per_chunk):
        end = min(start + per_chunk, total)
        with ed.scoped(scope):
            idx = ed.op("Slice", [index, ed.ints("s", start), ed.ints("e", end), ed.ints("ax", 1)], "chunk_index")
            picked = ed.op("Gather", [flat, idx], "top_rows", axis=0)            # [B, R, Nk]
        w = ed.op("Slice", [weights_row, ed.ints("s", start), ed.ints("e", end), ed.ints("ax", 2)], "chunk_weights")
        parts.append(ed.op("MatMul", [w, ed.as_float(picked, src.source)], "importance"))   # [B, 1, Nk]
    return parts[0] if len(parts) == 1 else ed.op("Sum", parts, "importance_sum")


# --------------------------------------------------------------------------- gathering
def is_kept_key_gather(node: str) -> bool:
    """Whether node ``node`` gathers kept keys for later layers (the pruning itself), as opposed
    to the scoring's gathers of attention rows; for reading profiles of rewritten models."""
    return node.startswith(PREFIX) and "/gather/" in node and f"/{ROW_GATHER_SCOPE}" not in node


def gather_scope(plan: KeyPruningPlan, stage: int) -> str:
    """Name prefix of the gathers feeding ``stage``: those of the pruning layer that chose the keys."""
    return f"{PREFIX}l{plan.steps[stage - 1].layer}/gather/"


@dataclass
class _Gatherer:
    """The key transform of tgGBC: gathers per-key tensors with one stage's chained indices;
    one copy per (tensor, stage, axes)."""

    ed: GraphEditor
    plan: KeyPruningPlan
    num_heads: int
    cache: dict[tuple[str, int, KeyAxes], Any] = field(default_factory=dict)
    indices: dict[int, Any] = field(default_factory=dict)     # stage -> chained indices [B, K]

    def scope(self, stage: int) -> str:
        return gather_scope(self.plan, stage)

    def __call__(self, data: Any, axes: KeyAxes, stage: int) -> Any:
        key = (data.name, stage, axes)
        if key not in self.cache:
            with self.ed.scoped(gather_scope(self.plan, stage)):
                self.cache[key] = self._gather(data, axes, self.indices[stage])
        return self.cache[key]

    def _gather(self, data: Any, axes: KeyAxes, comp: Any) -> Any:
        """data [.., Nk, ..] -> [.., K, ..] with comp [B, K] (per batch element)."""
        ed, b = self.ed, self.plan.batch
        if b > 1 and axes.batch_axis is None:
            raise PatternNotFoundError(f"cannot gather {data.name} per batch element: no batch axis (batch {b}); "
                                       "export with batch 1 or name the tensor with --override")
        rows = comp
        if b > 1 and axes.heads_in_batch:                                       # [B, K] -> [B*h, K], b-major
            rows = ed.reshape(ed.op("Expand", [ed.reshape(comp, "idx_b1k", b, 1, -1),
                                               ed.ints("heads", 1, self.num_heads, 1)], "idx_bhk"),
                              "idx_rows", b * self.num_heads, -1)
        rank = ed.rank(data.name)
        if b > 1 and rank < 2:
            raise PatternNotFoundError(f"cannot gather {data.name}: its rank is unknown")
        return ed.gather_per_batch(data, rows, b, axes.batch_axis, axes.key_axis, rank, what="keys")


# --------------------------------------------------------------------------- the rewrite
def _check_model(model: Any, structure: DecoderStructure) -> int:
    opset = model_opset(model)
    if opset < MIN_OPSET:
        raise InvalidModelError(f"tgGBC needs opset >= {MIN_OPSET} but the model is opset {opset}; "
                                "re-export it with --opset 17")
    if structure.batch < 1:
        raise InvalidModelError(f"tgGBC needs a static batch size, but discovery found batch {structure.batch}; "
                                "give rewrite --inputs X.npz (its sizes fix the graph's inputs) or export with a fixed batch")
    return opset


def rewrite_key_pruning(working: WorkingModel, structure: DecoderStructure, plan: KeyPruningPlan) -> None:
    """Insert the scoring/selection nodes of ``plan`` and gather the later layers' keys, in place.

    Leaves ``working`` untouched when the plan prunes nothing, so ``r=0`` reproduces the input
    exactly.
    """
    if not plan.steps:
        return
    gs = _lazy.require("onnx_graphsurgeon")
    model = working.proto()
    opset, info = _check_model(model, structure), tensor_info(model)
    ed = GraphEditor(gs, working.graph(), opset, info, scope=PREFIX)
    gatherer = _Gatherer(ed, plan, structure.num_heads)
    feeder = KeyFeeder(ed, structure, plan.feed(structure), gatherer)
    chained = None
    for s, step in enumerate(plan.steps):
        with ed.scoped(f"{PREFIX}l{step.layer}/"):
            kept = _keep_indices(ed, structure.layers[step.layer], step, plan)        # [B, Nk_{l+1}]
            chained = kept if chained is None else ed.op("GatherElements", [chained, kept], "chained", axis=1)
        gatherer.indices[s + 1] = chained                                          # into the original keys
        feeder.feed_stage(s + 1)
    working.set_metadata(METADATA_KEY, describe_plan(plan))


def describe_plan(plan: KeyPruningPlan) -> dict[str, Any]:
    """The plan as plain data (recorded in the rewritten model's metadata)."""
    c = plan.config
    return {"r": c.r, "n": c.n, "k": c.k, "top_queries": plan.top_queries, "use_class_score": c.use_class_score,
            "class_reduce": c.class_reduce, "tensorrt": plan.tensorrt, "pruning_layers": [s.layer for s in plan.steps],
            "keys_pruned": [s.num_drop for s in plan.steps], "keys_per_layer": list(plan.keys_per_layer)}


# --------------------------------------------------------------------------- the pass
class KeyPruningPass(KeyReductionPass):
    """``--method tggbc``: prune image tokens between decoder layers, guided by class scores."""

    name: ClassVar[str] = "tggbc"
    help: ClassVar[str] = ("tgGBC: drop the r least important image tokens (keys) over the first n decoder "
                           "layers, importance = class-score-weighted attention (zero-shot, no retraining)")
    requires: ClassVar[frozenset[str]] = frozenset({"probs", "key", "value", "logits"})

    def __init__(self, config: TgGBCConfig, tensorrt: bool = False) -> None:
        self.config, self.tensorrt = config, tensorrt

    @classmethod
    def add_arguments(cls, group: Any) -> None:
        """tgGBC's own options (--r/--n/--k are the CLI's shared key-count options)."""
        group.add_argument("--no-class-score", dest="no_class_score", action="store_true",
                           help="tgGBC ablation: importance from attention alone (queries still chosen by score)")
        group.add_argument("--class-reduce", dest="class_reduce", choices=CLASS_REDUCTIONS, default=None,
                           help="tgGBC ablation: reduce class logits by max (default), mean or min")
        group.add_argument("--tensorrt", dest="tensorrt", action="store_true",
                           help="target TensorRT: keep every TopK within its K <= 3840 limit")

    @classmethod
    def from_args(cls, args: Any) -> KeyPruningPass:
        r, n = key_counts_from_args(args, "tggbc", "keys pruned in total", "--r 21000 --n 2 --k 175")
        k = getattr(args, "k", None)
        config = TgGBCConfig(r=r, n=n, k=0 if k is None else k,
                             use_class_score=not getattr(args, "no_class_score", False),
                             class_reduce=getattr(args, "class_reduce", None) or "max")
        check_key_counts(config.r, config.n)
        if config.k < 0:
            raise ParameterError(f"--k must be >= 0 (got --k {config.k})")
        return cls(config, tensorrt=bool(getattr(args, "tensorrt", False)))

    def apply(self, working: WorkingModel, structure: DecoderStructure) -> None:
        plan = plan_key_pruning(structure, self.config, self.tensorrt)
        log.info("tgGBC r=%d n=%d k=%d (%s): pruning after layers %s, keys per layer %s", self.config.r,
                 self.config.n, self.config.k, f"top {plan.top_queries} queries" if plan.top_queries else "every query",
                 [s.layer for s in plan.steps], list(plan.keys_per_layer))
        rewrite_key_pruning(working, structure, plan)

    def __repr__(self) -> str:
        return f"KeyPruningPass({self.config!r}, tensorrt={self.tensorrt})"
