"""The decoder structure the exporter records in an ONNX model's ``metadata_props``.

Rewrite passes need, per decoder layer, the cross-attention probabilities, the inputs of
the key and value projections, and the class logits; plus the global sizes and the
tensors carrying the query axis. Guessing these from a graph is what discovery does for
foreign models; for models edgeprune exported they are written down here, as one JSON
string under :data:`DECODER_MAP_KEY`, so passes can find them without guessing.

Every name recorded is a real tensor of the saved graph (a graph input, a node output or
an initializer); the exporter checks this before writing. Names are chosen to survive
onnxsim: the exporter simplifies while they are graph outputs, then demotes them.

This module needs only ``onnx`` (no torch), so passes on a rewrite-only install can read it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from edgeprune.errors import InvalidModelError

DECODER_MAP_KEY = "edgeprune.decoder_map"
DECODER_MAP_VERSION = 1


@dataclass(frozen=True)
class TensorRef:
    """A tensor of the graph by name, with its static shape (batch included)."""

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class LayerMap:
    """One decoder layer. ``None`` means the tensor does not exist as a separate tensor.

    A recorded tensor may fold leading axes of its canonical shape (e.g. logits
    ``[B*Nq, C]`` when onnxsim merged the Reshape back to 3-D into the stacking); its
    elements are in the canonical row-major order, so reshaping to the canonical shape
    is always valid. ``TensorRef.shape`` is the tensor's real shape.

    ``probs_layout`` follows :class:`edgeprune.passes.discovery.structure.AttentionProbs`:
    ``"BHQK"`` for ``[B, h, Nq, Nk]`` and ``"(BH)QK"`` for ``[B*h, Nq, Nk]``.
    """

    index: int
    cross_attn_probs: TensorRef | None   # softmax output [B, h, Nq, Nk]
    probs_layout: str | None
    key_input: TensorRef | None          # memory + key_pos, input of the key projection [B, Nk, E]
    value_input: TensorRef | None        # memory, input of the value projection [B, Nk, E]
    logits: TensorRef | None             # class logits of this layer [B, Nq, C]


@dataclass(frozen=True)
class QueryTensor:
    """A constant whose axis ``axis`` runs over queries (GPQ slices it).

    ``count`` is the size of that axis: the learned queries (reference points) or all
    queries (learned + StreamPETR's propagated ones, after they are concatenated).
    """

    name: str
    shape: tuple[int, ...]
    axis: int
    count: int
    kind: str                            # "initializer" | "constant" (a Constant node's output)


@dataclass(frozen=True)
class DecoderMap:
    """Decoder structure of one exported model; see the module docstring."""

    num_layers: int                      # L
    num_queries: int                     # Nq (learned + propagated)
    num_learned_queries: int             # reference points only
    num_keys: int                        # Nk
    num_heads: int                       # h
    embed_dims: int                      # E
    num_classes: int                     # C
    batch: int
    scope: str                           # "decoder" | "full"
    exporter: str                        # "torchscript" | "dynamo"
    attention: str                       # "manual" | "torch" | "unknown"
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    memory: TensorRef | None             # image tokens [B, Nk, E] (a graph input for scope=decoder)
    key_pos: TensorRef | None            # 3D position embedding of the keys [B, Nk, E]
    key_padding_mask: TensorRef | None   # [B, Nk] bool, if the model takes one
    layers: tuple[LayerMap, ...]
    query_tensors: tuple[QueryTensor, ...] = ()
    query_shape_constants: tuple[str, ...] = ()   # int64 shape constants containing Nq
    preset: str | None = None
    version: int = DECODER_MAP_VERSION
    notes: tuple[str, ...] = field(default=())

    @property
    def probs_present(self) -> bool:
        """True when every layer's cross-attention probabilities were recorded."""
        return bool(self.layers) and all(layer.cross_attn_probs is not None for layer in self.layers)

    def tensor_refs(self) -> Iterator[TensorRef]:
        """Every recorded tensor (for existence and shape checks)."""
        for ref in (self.memory, self.key_pos, self.key_padding_mask):
            if ref is not None:
                yield ref
        for layer in self.layers:
            for ref in (layer.cross_attn_probs, layer.key_input, layer.value_input, layer.logits):
                if ref is not None:
                    yield ref
        for qt in self.query_tensors:
            yield TensorRef(qt.name, qt.shape)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DecoderMap":
        """Parse :meth:`to_json` output; a newer or malformed map is an InvalidModelError."""
        try:
            raw = json.loads(text)
            version = int(raw.get("version", 0))
        except (ValueError, TypeError, AttributeError) as exc:
            raise InvalidModelError(f"metadata {DECODER_MAP_KEY!r} is not valid JSON ({exc}); "
                                    "re-export the model with edgeprune export") from exc
        if version != DECODER_MAP_VERSION:
            raise InvalidModelError(f"metadata {DECODER_MAP_KEY!r} has version {version}, this edgeprune "
                                    f"reads version {DECODER_MAP_VERSION}; re-export the model or upgrade edgeprune")
        try:
            return _decode(raw)
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidModelError(f"metadata {DECODER_MAP_KEY!r} is malformed ({exc!r}); "
                                    "re-export the model with edgeprune export") from exc


def _ref(raw: dict[str, Any] | None) -> TensorRef | None:
    return None if raw is None else TensorRef(str(raw["name"]), tuple(int(d) for d in raw["shape"]))


def _decode(raw: dict[str, Any]) -> DecoderMap:
    layers = tuple(LayerMap(index=int(lay["index"]), cross_attn_probs=_ref(lay["cross_attn_probs"]),
                            probs_layout=lay["probs_layout"], key_input=_ref(lay["key_input"]),
                            value_input=_ref(lay["value_input"]), logits=_ref(lay["logits"]))
                   for lay in raw["layers"])
    queries = tuple(QueryTensor(q["name"], tuple(q["shape"]), int(q["axis"]), int(q["count"]), q["kind"])
                    for q in raw.get("query_tensors", ()))
    scalars = {k: raw[k] for k in ("num_layers", "num_queries", "num_learned_queries", "num_keys", "num_heads",
                                   "embed_dims", "num_classes", "batch", "scope", "exporter", "attention",
                                   "preset", "version")}
    return DecoderMap(**scalars, inputs=tuple(raw["inputs"]), outputs=tuple(raw["outputs"]),
                      memory=_ref(raw["memory"]), key_pos=_ref(raw["key_pos"]),
                      key_padding_mask=_ref(raw["key_padding_mask"]), layers=layers, query_tensors=queries,
                      query_shape_constants=tuple(raw.get("query_shape_constants", ())),
                      notes=tuple(raw.get("notes", ())))


def read_decoder_map(model: Any) -> DecoderMap | None:
    """The map stored in ``model.metadata_props`` (an ``onnx.ModelProto``), or None if absent."""
    for prop in model.metadata_props:
        if prop.key == DECODER_MAP_KEY:
            return DecoderMap.from_json(prop.value)
    return None


def write_decoder_map(model: Any, dmap: DecoderMap) -> None:
    """Store ``dmap`` in ``model.metadata_props``, replacing an earlier map."""
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != DECODER_MAP_KEY]
    del model.metadata_props[:]
    for key, value in kept + [(DECODER_MAP_KEY, dmap.to_json())]:
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value


def graph_tensor_names(model: Any) -> set[str]:
    """Names of every tensor a graph defines: inputs, initializers and node outputs."""
    graph = model.graph
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    names.update(out for node in graph.node for out in node.output if out)
    return names


def missing_tensors(model: Any, dmap: DecoderMap) -> list[str]:
    """Recorded names the graph does not define (empty when the map is consistent)."""
    defined = graph_tensor_names(model)
    names = [ref.name for ref in dmap.tensor_refs()] + list(dmap.inputs) + list(dmap.query_shape_constants)
    return sorted({n for n in names if n not in defined})
