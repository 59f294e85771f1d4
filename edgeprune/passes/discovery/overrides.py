"""``--override`` values: name graph tensors the matcher cannot find, per layer or globally.

Syntax (one per ``--override``)::

    layer.N.probs=TENSOR        cross-attention probabilities of layer N (softmax output)
    layer.N.key=TENSOR[@NODE]   input of layer N's key projection (memory + key_pos)
    layer.N.value=TENSOR[@NODE] input of layer N's value projection (memory)
    layer.N.mask=TENSOR[@NODE]  additive mask / key padding mask of layer N's scores
    layer.N.logits=TENSOR       class logits of layer N ([B, Nq, C] values)
    cls_output=NAME             graph output stacking the per-layer class logits
    heads=H                     number of attention heads (for a [B*h, Nq, Nk] probs override)

``@NODE`` names the consuming node when the tensor feeds several (a shared projection input).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from edgeprune.errors import ParameterError, PatternNotFoundError
from edgeprune.graph.index import GraphIndex

LAYER_PARTS: dict[str, str] = {
    "probs": "cross-attention probabilities (softmax output, [B, h, Nq, Nk])",
    "key": "input of the key projection (memory + key_pos, [B, Nk, E])",
    "value": "input of the value projection (memory, [B, Nk, E])",
    "mask": "attention mask added to the scores",
    "logits": "class logits ([B, Nq, C])",
}
GLOBAL_PARTS: dict[str, str] = {
    "cls_output": "graph output stacking the per-layer class logits [L, B, Nq, C]",
    "heads": "number of attention heads",
}
_LAYER_KEY = re.compile(r"^layer\.(\d+)\.([a-z_]+)$")
SYNTAX = ("layer.N.PART=TENSOR with PART one of " + ", ".join(LAYER_PARTS)
          + ", or " + ", ".join(f"{k}=..." for k in GLOBAL_PARTS))


@dataclass(frozen=True)
class TensorSpec:
    """``TENSOR`` or ``TENSOR@NODE`` (the consumer to rewire)."""

    tensor: str
    node: str | None = None


@dataclass(frozen=True)
class Overrides:
    """Parsed ``--override`` values; empty when none were given."""

    layers: Mapping[int, Mapping[str, TensorSpec]] = field(default_factory=dict)
    cls_output: str | None = None
    heads: int | None = None

    def __bool__(self) -> bool:
        return bool(self.layers) or self.cls_output is not None or self.heads is not None

    def get(self, layer: int, part: str) -> TensorSpec | None:
        return self.layers.get(layer, {}).get(part)


def _split(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise ParameterError(f"bad --override {item!r}: expected {SYNTAX}")
    return key.strip(), value.strip()


def _spec(value: str) -> TensorSpec:
    tensor, _, node = value.rpartition("@") if "@" in value else (value, "", "")
    return TensorSpec(tensor, node or None)


def parse_overrides(items: Iterable[str] | Mapping[str, str] | Overrides | None) -> Overrides:
    """``["layer.0.probs=T", "heads=8"]`` or ``{"layer.0.probs": "T"}`` -> :class:`Overrides`."""
    if items is None:
        return Overrides()
    if isinstance(items, Overrides):
        return items
    pairs = list(items.items()) if isinstance(items, Mapping) else [_split(i) for i in items]
    layers: dict[int, dict[str, TensorSpec]] = {}
    cls_output, heads = None, None
    for key, value in pairs:
        match = _LAYER_KEY.match(key)
        if match and match.group(2) in LAYER_PARTS:
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = _spec(value)
        elif key == "cls_output":
            cls_output = value
        elif key == "heads":
            if not value.isdigit() or int(value) < 1:
                raise ParameterError(f"bad --override heads={value!r}: expected a positive integer")
            heads = int(value)
        else:
            raise ParameterError(f"unknown --override key {key!r}: expected {SYNTAX}")
    return Overrides(layers, cls_output, heads)


def require_names(index: GraphIndex, ov: Overrides) -> None:
    """Every override tensor or node that is not in the graph, named in one error (not the first only)."""
    node_names = {n.name for n in index.graph.node}
    wrong = [f"layer.{i}.{part}={spec.tensor}" + (f"@{spec.node}" if spec.node else "")
             for i, parts in sorted(ov.layers.items()) for part, spec in parts.items()
             if not index.has_tensor(spec.tensor) or (spec.node is not None and spec.node not in node_names)]
    if ov.cls_output is not None and not index.has_tensor(ov.cls_output):
        wrong.append(f"cls_output={ov.cls_output}")
    if wrong:
        raise PatternNotFoundError(f"--override names {len(wrong)} tensor(s) or node(s) not in the graph: "
                                   f"{', '.join(wrong)}; check the names (e.g. with a graph viewer such as Netron)")
