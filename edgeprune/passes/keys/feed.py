"""Feeding later decoder layers fewer keys: the rewiring shared by tgGBC and ToMe.

tgGBC (gather the kept keys) and ToMe (merge similar keys) differ only in *how* a per-key
tensor is reduced: the pass builds that subgraph and hands it in as a :class:`KeyTransform`.
*Where* the reduced tensors go is the same for both, and lives here::

    stage s (layers between reductions s-1 and s)       stage s + 1 (the layers after reduction s)
    memory + key_pos [B, Nk, E] --Wk-->                   transform(memory + key_pos) [B, Nk', E] --Wk-->
    memory           [B, Nk, E] --Wv-->                   transform(memory)           [B, Nk', E] --Wv-->
    mask             [B, Nk]    --Add(scores)             transform(mask)             [B, Nk']    --Add(scores)
    Reshape(k, [B, Nk, h, d])                             Reshape(k', [B, Nk', h, d])        (constant retargeted)

A *stage* counts the reductions before a layer (stage 0 reads all keys). For the layers of a
stage > 0, :class:`KeyFeeder` rewires the key/value projection inputs and per-key masks to
the transformed copies; clones key-path nodes that layers of different stages share (onnxsim
shares one flattening Reshape before the projection Gemms among all layers), so each stage
gets its own; and retargets the static shape constants that carry the key count (Reshape /
Expand / ConstantOfShape targets holding Nk or B*Nk) from the rewired nodes up to the
attention. Copies are named ``{scope}copy/``, retargeted shapes ``{scope}shape/`` with the
stage's scope (``tggbc/l0/``), so the fp16 pass finds them by prefix.

Both passes also share their command-line options ``--r``/``--n`` and their ``prepare`` (undo
onnxsim's merged key projections): :class:`KeyReductionPass`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Sequence

import numpy as np

from edgeprune.errors import ParameterError, PatternNotFoundError
from edgeprune.graph.edit import GraphEditor, model_opset
from edgeprune.passes.registry import BasePass
from edgeprune.passes.discovery.structure import DecoderLayer, DecoderStructure, MaskInput, ProjectionInput

log = logging.getLogger(__name__)

_SHAPE_INPUT = {"Reshape": 1, "Expand": 1, "ConstantOfShape": 0}   # op -> input holding a target shape
UPGRADE_OPSET = 17          # a graph older than the pass's min_opset is raised to this (what edgeprune exports)


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class KeyAxes:
    """Where keys and batch run in a per-key tensor, and whether its rows hold B*h entries."""

    key_axis: int
    batch_axis: int | None
    heads_in_batch: bool = False


class KeyTransform(Protocol):
    """The pass's reduction of one per-key tensor for the layers of one stage."""

    def scope(self, stage: int) -> str:
        """Name prefix of the nodes built for ``stage`` (the feeder puts mask expansions there)."""

    def __call__(self, data: Any, axes: KeyAxes, stage: int) -> Any:
        """``data`` (keys along ``axes.key_axis``) reduced to stage ``stage``'s keys, same layout."""


@dataclass(frozen=True)
class KeyFeedPlan:
    """Which keys each decoder layer reads; computed from a pass's plan (no graph edit)."""

    method: str                   # for messages: "tgGBC", "ToMe"
    prefix: str                   # the pass's node prefix: nodes it inserted are not key paths
    num_keys: int                 # keys of the input model (the count static shapes hold)
    batch: int
    stages: tuple[int, ...]       # per layer: reductions before it (0 = all keys)
    keys: tuple[int, ...]         # per layer: keys it reads
    scopes: tuple[str, ...]       # scopes[s - 1]: name prefix of the nodes feeding stage s ("tggbc/l0/")

    @classmethod
    def after_layers(cls, method: str, prefix: str, structure: DecoderStructure, reducing: Sequence[int],
                     keys: Sequence[int]) -> KeyFeedPlan:
        """Reductions after the (ascending) layers ``reducing``; ``keys`` per layer."""
        stages = tuple(sum(1 for r in reducing if r < layer.index) for layer in structure.layers)
        return cls(method, prefix, structure.num_keys, structure.batch, stages, tuple(keys),
                   tuple(f"{prefix}l{r}/" for r in reducing))


def projection_inputs(layer: DecoderLayer) -> tuple[ProjectionInput, ...]:
    return layer.key_inputs + layer.value_inputs


def key_nodes(layer: DecoderLayer) -> list[str]:
    """Nodes that carry layer ``layer``'s keys before attention: projection inputs' consumers and paths."""
    return list(dict.fromkeys([p.consumer for p in projection_inputs(layer)] + list(layer.key_path_nodes)))


def shared_key_nodes(structure: DecoderStructure, stages: Sequence[int]) -> frozenset[str]:
    """Key-path nodes used by layers that see different key counts (they get one copy per count)."""
    seen: dict[str, set[int]] = {}
    for layer in structure.layers:
        for name in key_nodes(layer):
            seen.setdefault(name, set()).add(stages[layer.index])
    return frozenset(n for n, s in seen.items() if len(s) > 1)


# --------------------------------------------------------------------------- rewiring
@dataclass
class KeyFeeder:
    """Feeds the layers of each stage their transformed keys; one copy of shared key-path nodes per stage."""

    ed: GraphEditor
    structure: DecoderStructure
    plan: KeyFeedPlan
    transform: KeyTransform
    shared: frozenset[str] = frozenset()
    key_paths: frozenset[str] = frozenset()      # every layer's key-path nodes
    clones: dict[tuple[str, int], Any] = field(default_factory=dict)
    replaced: dict[tuple[str, int], Any] = field(default_factory=dict)   # (original tensor, stage) -> copy

    def __post_init__(self) -> None:
        self.shared = shared_key_nodes(self.structure, self.plan.stages)
        self.key_paths = frozenset(name for layer in self.structure.layers for name in key_nodes(layer))

    def feed_stage(self, stage: int) -> None:
        """Rewire every layer of ``stage`` (> 0) to transformed keys and retarget its static key counts."""
        layers = [layer for layer in self.structure.layers if self.plan.stages[layer.index] == stage]
        entries: list[Any] = []
        for layer in layers:
            entries += self._layer(layer, stage)
        stops = frozenset(layer.pv_node for layer in layers)
        keys = self.plan.keys[layers[0].index]
        cone = key_cone(entries, stops, self.plan.prefix)
        changed = retarget_shapes(self.ed, cone, self.plan.num_keys, keys, self.plan.batch,
                                  f"{self.plan.scopes[stage - 1]}shape/")
        log.debug("stage %d: layers %s read %d keys; %d shape constants retargeted",
                  stage, [layer.index for layer in layers], keys, changed)

    def _layer(self, layer: DecoderLayer, stage: int) -> list[Any]:
        """Rewire ``layer``; returns the nodes now reading transformed keys."""
        pins = {(p.consumer, p.input_index): p for p in projection_inputs(layer)}
        entries = []
        for name in sorted(key_nodes(layer), key=lambda n: self.ed.position.get(n, 0)):
            node = self._clone(self.ed.node(name), stage) if name in self.shared else self.ed.node(name)
            for i, tensor in enumerate(list(node.inputs)):
                pin = pins.get((name, i))
                if pin is not None:
                    axes = KeyAxes(pin.key_axis, pin.batch_axis)
                    node.inputs[i] = self.transform(self.ed.tensor(pin.tensor), axes, stage)
                elif (tensor.name, stage) in self.replaced:
                    node.inputs[i] = self.replaced[(tensor.name, stage)]
            entries.append(node)
        self._read_clones(layer, stage)
        for mask in layer.masks:
            entries += self._mask(layer, mask, stage)
        return entries

    def _read_clones(self, layer: DecoderLayer, stage: int) -> None:
        """Point ``layer``'s attention (Q K^T, P V) at this stage's copies of its key path's last tensors.

        Needed when the whole key path is shared: onnxsim merges identical computations, so layers
        with identical key/value weights (cloned, untrained) read one K and one V; the copies are
        then only read if the attention itself is rewired. The nodes are discovery's, not guessed.
        """
        if not self._read_outside_key_paths(stage):
            return                         # no copy of this stage ends a key path (onnxsim's shared flattening)
        readers = [name for name in (layer.qk_node, layer.pv_node) if name]
        if layer.probs.layout != "fused" and not layer.qk_node:
            raise PatternNotFoundError(f"layer {layer.index} shares key-path nodes with a layer that sees another "
                                       f"number of keys, and its Q K^T product is not known (a layer named by "
                                       f"--override); {self.plan.method} cannot give it its own keys")
        for node in (self.ed.node(name) for name in readers):
            for i, tensor in enumerate(list(node.inputs)):
                copy = self.replaced.get((tensor.name, stage))
                if copy is not None:
                    node.inputs[i] = copy

    def _read_outside_key_paths(self, stage: int) -> bool:
        """Whether an original tensor copied for ``stage`` is read by a node on no layer's key path
        (an attention MatMul), i.e. a whole key path is shared."""
        for tensor, s in self.replaced:
            if s == stage and any(c.name not in self.key_paths and not c.name.startswith(self.plan.prefix)
                                  for c in self.ed.tensor(tensor).outputs):
                return True
        return False

    def _clone(self, node: Any, stage: int) -> Any:
        """``node``'s copy for ``stage`` (made once; later copies read the earlier copies' outputs)."""
        key = (node.name, stage)
        if key not in self.clones:
            gs = self.ed.gs
            name = f"{self.plan.scopes[stage - 1]}copy/{node.name}"
            outs = [gs.Variable(f"{name}:{i}") for i in range(len(node.outputs))]
            copy = gs.Node(op=node.op, name=name, attrs=dict(node.attrs), inputs=list(node.inputs),
                           outputs=outs, domain=node.domain)
            self.ed.graph.nodes.append(copy)
            for old, new in zip(node.outputs, outs):
                self.replaced[(old.name, stage)] = new
            self.clones[key] = copy
            log.debug("cloned %s for the layers of stage %d", node.name, stage)
        return self.clones[key]

    def _mask(self, layer: DecoderLayer, mask: MaskInput, stage: int) -> list[Any]:
        """Transform a per-key mask at its consumer; masks broadcast over keys need nothing."""
        shape = self.ed.info.get(mask.tensor, (0, ()))[1]
        if shape and shape[mask.key_axis] == 1:
            return []
        if mask.consumer in self.shared:
            raise PatternNotFoundError(f"the mask consumer {mask.consumer} is shared by decoder layers that see "
                                       f"different numbers of keys; {self.plan.method} cannot reduce keys for only "
                                       "some of them")
        node = self.ed.node(mask.consumer)
        data, axes = self.ed.tensor(mask.tensor), KeyAxes(mask.key_axis, mask.batch_axis, mask.heads_in_batch)
        if self.plan.batch > 1 and mask.batch_axis is None:
            data, axes = self._batched_mask(layer, mask, node, stage)
        node.inputs[mask.input_index] = self.transform(data, axes, stage)
        return [node]

    def _batched_mask(self, layer: DecoderLayer, mask: MaskInput, consumer: Any, stage: int) -> tuple[Any, KeyAxes]:
        """A mask broadcast over the batch, expanded to one row per batch element (or per b, h):
        each element keeps its own keys. [.., Nk] -> [B (or B*h), .., Nk]."""
        ed, b = self.ed, self.plan.batch
        rank = ed.rank(mask.tensor)
        target = 4 if layer.probs.layout == "fused" else ed.rank(consumer.outputs[0].name)
        if rank == 0 or target < rank:
            raise PatternNotFoundError(f"cannot expand the mask {mask.tensor} of layer {layer.index} to batch {b}: "
                                       "its shape is unknown")
        heads = layer.probs.layout == "(BH)QK"
        rows = b * layer.probs.num_heads if heads else b
        with ed.scoped(self.transform.scope(stage)):
            data = ed.tensor(mask.tensor)
            if target > rank:
                data = ed.op("Unsqueeze", [data, ed.ints("axes", *range(target - rank))], "mask_rank")
            data = ed.op("Expand", [data, ed.ints("rows", rows, *([1] * (target - 1)))], "mask_rows")
        ed.info[data.name] = (ed.info[mask.tensor][0], (rows,) + (None,) * (target - 1))
        return data, KeyAxes(mask.key_axis + target - rank, 0, heads)


# --------------------------------------------------------------------------- static shapes
def constant_value(tensor: Any) -> np.ndarray | None:
    """Value of a gs.Constant or of a Constant node's output, else None."""
    if hasattr(tensor, "values"):
        return np.asarray(tensor.values)
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is not None and producer.op == "Constant" and "value" in producer.attrs:
        value = producer.attrs["value"]
        return np.asarray(value.values if hasattr(value, "values") else value)
    return None


def key_cone(entries: Sequence[Any], stops: frozenset[str], prefix: str) -> list[Any]:
    """Nodes downstream of ``entries`` up to (including) the attention nodes ``stops``,
    skipping the nodes the pass inserted (named ``prefix...``) other than ``entries``."""
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
            todo.extend(c for c in out.outputs if not c.name.startswith(prefix) or id(c) in starts)
    return cone


def retarget_shapes(ed: GraphEditor, nodes: Sequence[Any], old: int, new: int, batch: int, scope: str) -> int:
    """Static shape constants with ``old`` keys (or ``batch * old``) -> ``new``; returns how many changed."""
    changed = 0
    for node in nodes:
        idx = _SHAPE_INPUT.get(node.op)
        if idx is None or idx >= len(node.inputs):
            continue
        value = constant_value(node.inputs[idx])
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


# --------------------------------------------------------------------------- the passes' shared surface
def key_counts_from_args(args: Any, method: str, what: str, example: str) -> tuple[int, int]:
    """(r, n) from parsed arguments: ``--r`` required (the error says it is ``what`` and gives
    ``example``), ``--n`` 1 by default. Range: :func:`check_key_counts`."""
    r = getattr(args, "r", None)
    if r is None:
        raise ParameterError(f"--method {method} needs --r R ({what}), e.g. {example}")
    n = getattr(args, "n", None)
    return r, 1 if n is None else n


def refuse_tggbc_options(args: Any, method: str, takes: str) -> None:
    """The tgGBC-only options (``--k``, ablations, ``--tensorrt``) are errors for the other key
    methods, not silently ignored; ``takes`` says what ``method`` reads instead."""
    for option in ("k", "class_reduce", "no_class_score", "tensorrt"):
        if getattr(args, option, None):
            flag = f"--{option.replace('_', '-')}"
            raise ParameterError(f"{flag} is a tgGBC option; --method {method} takes {takes}")


def check_key_counts(r: int, n: int) -> None:
    """Negative counts are refused before any graph is read (the schedule checks the upper bounds)."""
    if r < 0 or n < 0:
        raise ParameterError(f"--r and --n must be >= 0 (got --r {r} --n {n})")


class KeyReductionPass(BasePass):
    """Base of the passes that feed later decoder layers fewer keys (``config.enabled``: they do)."""

    requires: ClassVar[frozenset[str]] = frozenset({"probs", "key", "value"})
    min_opset: ClassVar[int] = 13               # the inserted ops' forms (axes as inputs, GatherND batch_dims)
    config: Any

    def prepare(self, model: Any) -> Any:
        """Raise a graph older than ``min_opset`` to 17 (the inserted ops' forms; :mod:`edgeprune.graph.opset`),
        undo onnxsim's merged key projections (one MatMul + Split for all layers) and fold target
        shapes computed from ``Shape`` ops into constants: later layers must be able to read fewer
        keys than earlier ones, and only constant targets can be retargeted. Nothing changes when
        nothing is reduced."""
        if self.config.enabled:
            from edgeprune.graph.edit import fold_computed_sizes
            from edgeprune.graph.opset import upgrade_opset
            from edgeprune.passes.discovery.normalize import split_shared_projections

            model = upgrade_opset(model, UPGRADE_OPSET) if model_opset(model) < self.min_opset else model
            folded = fold_computed_sizes(model)
            if folded:
                log.debug("folded %d computed target shapes into constants", len(folded))
            split_shared_projections(model)
        return model
