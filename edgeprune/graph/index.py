"""Graph lookups for matchers: producers, consumers, constants and shapes by dict, not by scan.

``GraphIndex`` is built once per model (O(nodes)); every question a matcher asks afterwards
is a dict lookup or a walk bounded by the pattern, which keeps discovery at seconds on a
24000-key full model. The index is read-only: it never edits the graph it describes.

``match_parent_path`` follows the onnxruntime-transformers convention: the node path from a
node up through given input indices with given op types, or ``None``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from edgeprune import _lazy
from edgeprune.graph.ops import AFFINE_OPS, PASS_THROUGH_OPS, RANDOM_OPS
from edgeprune.graph.shapes import Shape, Shapes, infer_shapes, is_static
from edgeprune.graph.values import constant_node_value


_SHAPE_OF = frozenset({"Shape", "Size"})     # outputs that read only the input's shape, not its values


@dataclass
class GraphIndex:
    """Dict views of one ``onnx.GraphProto``; build with :meth:`build`."""

    graph: Any
    nodes: dict[str, Any]                 # node name -> NodeProto (names must be unique: see name_nodes)
    producer: dict[str, Any]              # tensor -> producing NodeProto
    consumers: dict[str, list[Any]]       # tensor -> consuming NodeProtos (graph order)
    position: dict[str, int]              # node name -> index in graph.node
    initializers: dict[str, Any]          # name -> TensorProto
    inputs: set[str]                      # graph inputs that are not initializers
    outputs: list[str]
    shapes: Shapes
    _constant: dict[str, bool] = field(default_factory=dict)

    @classmethod
    def build(cls, model: Any, shapes: Shapes | None = None) -> GraphIndex:
        graph = model.graph
        producer: dict[str, Any] = {}
        consumers: dict[str, list[Any]] = {}
        for node in graph.node:
            for out in node.output:
                if out:
                    producer[out] = node
            for inp in node.input:
                if inp:
                    consumers.setdefault(inp, []).append(node)
        inits = {t.name: t for t in graph.initializer}
        return cls(graph=graph, nodes={n.name: n for n in graph.node}, producer=producer,
                   consumers=consumers, position={n.name: i for i, n in enumerate(graph.node)},
                   initializers=inits, inputs={i.name for i in graph.input if i.name not in inits},
                   outputs=[o.name for o in graph.output],
                   shapes=infer_shapes(model) if shapes is None else shapes)

    # ------------------------------------------------------------------ tensors
    def has_tensor(self, name: str) -> bool:
        return name in self.producer or name in self.initializers or name in self.inputs

    def shape(self, name: str) -> Shape | None:
        return self.shapes.get(name)

    def is_constant(self, name: str) -> bool:
        """True for initializers, Constant outputs, the ``Shape``/``Size`` of a statically shaped tensor,
        and anything computed only from those (TorchScript computes SDPA's scale from ``Shape(q)``)."""
        memo = self._constant
        stack = [(name, False)]
        while stack:                       # iterative post-order: decoder graphs are deep
            cur, expanded = stack.pop()
            if cur in memo:
                continue
            node = self.producer.get(cur)
            if node is None:
                memo[cur] = cur in self.initializers
            elif node.op_type in _SHAPE_OF:
                memo[cur] = is_static(self.shapes.get(node.input[0]))
            elif expanded:
                memo[cur] = node.op_type not in RANDOM_OPS and all(memo.get(i, False) for i in node.input if i)
            else:
                stack.append((cur, True))
                stack.extend((i, False) for i in node.input if i and i not in memo)
        return memo[name]

    def value(self, name: str) -> np.ndarray | None:
        """numpy value of an initializer or ``Constant`` output, else None (nothing is computed)."""
        if name in self.initializers:
            return _lazy.require("onnx").numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return constant_node_value(node)
        return None

    def scalar(self, name: str) -> float | None:
        """The value of a constant with exactly one element, else None."""
        value = self.value(name)
        if value is None:
            return None
        arr = np.asarray(value)
        return float(arr.reshape(-1)[0]) if arr.size == 1 else None

    # -------------------------------------------------------------------- nodes
    def parent(self, node: Any, index: int) -> Any | None:
        """Producer of ``node``'s input ``index`` (None for inputs, initializers, missing)."""
        if index >= len(node.input) or not node.input[index]:
            return None
        return self.producer.get(node.input[index])

    def users(self, tensor: str) -> list[Any]:
        return self.consumers.get(tensor, [])

    def uses(self, tensor: str) -> list[tuple[Any, int]]:
        """(consumer, input index) for every input slot that reads ``tensor``, in graph order."""
        unique = {id(node): node for node in self.consumers.get(tensor, [])}      # a node may read it twice
        return [(node, i) for node in unique.values() for i, name in enumerate(node.input) if name == tensor]

    def depends_on(self, tensor: str, targets: Iterable[str], *, skip_constants: bool = True) -> bool:
        """True when ``tensor`` is computed (transitively) from any of ``targets``."""
        wanted = set(targets)
        seen: set[str] = set()
        stack = [tensor]
        while stack:
            cur = stack.pop()
            if cur in wanted:
                return True
            if cur in seen or (skip_constants and self.is_constant(cur)):
                continue
            seen.add(cur)
            node = self.producer.get(cur)
            if node is not None:
                stack.extend(i for i in node.input if i)
        return False


def name_nodes(model: Any, prefix: str = "node") -> int:
    """Give every unnamed or duplicate-named node a unique name (in place); returns how many.

    Match records refer to nodes by name, so names must be unique before discovery.
    """
    seen: set[str] = set()
    renamed = 0
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            base = f"{prefix}_{node.op_type}_{i}"
            name, k = base, 0
            while name in seen:
                k += 1
                name = f"{base}_{k}"
            node.name = name
            renamed += 1
        seen.add(node.name)
    return renamed


def match_parent_path(index: GraphIndex, node: Any, op_types: Sequence[str],
                      input_indices: Sequence[int | None]) -> list[Any] | None:
    """Nodes ``[p1, p2, ...]`` with ``p1 = producer(node.input[i0])`` of type ``op_types[0]``, etc.

    An index of ``None`` accepts the first input whose producer has the wanted type.
    Returns None when the path does not exist.
    """
    if len(op_types) != len(input_indices):
        raise ValueError("op_types and input_indices must have the same length")
    path: list[Any] = []
    current = node
    for op_type, idx in zip(op_types, input_indices):
        candidates = range(len(current.input)) if idx is None else [idx]
        parent = None
        for i in candidates:
            p = index.parent(current, i)
            if p is not None and p.op_type == op_type:
                parent = p
                break
        if parent is None:
            return None
        path.append(parent)
        current = parent
    return path


@dataclass(frozen=True)
class Walk:
    """Result of walking up from a tensor: where the walk stopped and what it passed."""

    tensor: str                  # the tensor the walk stopped at (output of ``node``)
    node: Any | None          # its producer (None: graph input or initializer)
    path: tuple                  # NodeProtos walked through, nearest first
    factor: float                # product of the constant scalar Mul/Div factors passed


def data_input(index: GraphIndex, node: Any) -> int | None:
    """Which input of a view/affine node carries the data, or None when it is not a pass-through."""
    if node.op_type in PASS_THROUGH_OPS:
        return 0
    if node.op_type == "Gather" and index.is_constant(node.input[1]) and index.scalar(node.input[1]) is not None:
        return 0                     # one part of a packed projection (nn.MultiheadAttention's key = value)
    if node.op_type in AFFINE_OPS and len(node.input) == 2:
        const = [index.is_constant(i) for i in node.input]
        if const[0] != const[1]:
            data = 1 if const[0] else 0
            # x / c and x - c pass through; c / x and c - x do not (they are not a scale or a bias)
            return None if data == 1 and node.op_type in ("Div", "Sub") else data
    return None


def walk_up(index: GraphIndex, tensor: str, through: Callable[[GraphIndex, Any], int | None] = data_input,
            max_steps: int = 32) -> Walk:
    """Follow producers while ``through(index, node)`` names a data input; stop at the first other node."""
    path: list[Any] = []
    factor = 1.0
    for _ in range(max_steps):
        node = index.producer.get(tensor)
        if node is None:
            break
        nxt = through(index, node)
        if nxt is None:
            break
        if node.op_type in ("Mul", "Div"):
            scalar = index.scalar(node.input[1 - nxt])
            if scalar is not None and scalar != 0:
                factor *= scalar if node.op_type == "Mul" else 1.0 / scalar
        path.append(node)
        tensor = node.input[nxt]
    return Walk(tensor, index.producer.get(tensor), tuple(path), factor)
