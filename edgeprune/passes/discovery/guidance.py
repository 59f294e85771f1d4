"""What to tell a user whose graph discovery could not complete: one error, every missing part.

A pass needs some parts of every decoder layer (tgGBC: probabilities, key and value
projection inputs, class logits; a per-key mask when there is one). When some are missing
the error lists all of them, all layers at once, as ``--override`` flags ready to paste,
with the tensor discovery would guess where it has one (a per-key mask it saw; for a layer
named by ``layer.N.probs`` the inputs of the projections feeding its keys and values, found by
walking from the Softmax through ops the matcher does not know) and ``TENSOR`` where it has
none::

    --method tggbc needs 3 parts discovery did not find; add: --override layer.0.logits=TENSOR
      --override layer.1.logits=TENSOR --override layer.1.mask=/attn1/Add_output_0

The "fix the input sizes" hint appears only when a graph input really has a symbolic
dimension; with fixed inputs an unknown intermediate shape is ours to infer (static
inference, else one ONNX Runtime run). ``rewrite --inputs X.npz`` fixes symbolic inputs to the
arrays' sizes.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

from edgeprune.errors import PatternNotFoundError
from edgeprune.graph.index import GraphIndex
from edgeprune.graph.shapes import is_static
from edgeprune.passes.discovery.attention import find_projections
from edgeprune.passes.discovery.overrides import LAYER_PARTS
from edgeprune.passes.discovery.structure import DecoderLayer, DecoderStructure

PLACEHOLDER = "TENSOR"
_MASK_OPS = frozenset({"Add", "Where"})
_SCORE_WALK = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Cast", "Identity", "Reshape", "Expand"})


def dynamic_inputs(index: GraphIndex) -> list[str]:
    """Graph inputs with a symbolic or unknown dimension."""
    return [name for name in sorted(index.inputs) if not is_static(index.shape(name))]


FIX_INPUTS = ("give rewrite --inputs X.npz (one array per input; its sizes fix the graph's) or export with fixed "
              "input sizes")


def symbolic_override_message(index: GraphIndex, tensors: Sequence[str], dynamic: Sequence[str]) -> str:
    """Override tensors whose sizes depend on symbolic graph inputs: no single size to rewrite for."""
    shapes = "; ".join(f"{t} {list(index.shape(t) or ())}" for t in tensors)
    return (f"--override names tensors without static shapes ({shapes}) because inputs {', '.join(dynamic)} have "
            f"symbolic sizes: {FIX_INPUTS}")


def no_decoder_message(index: GraphIndex, attentions: Sequence[Any]) -> str:
    """Why no decoder was found, and the override that names one."""
    softmax = [n for n in index.graph.node if n.op_type == "Softmax"]
    unknown = [n for n in softmax if not is_static(index.shape(n.output[0]))]
    hint = ""
    dynamic = dynamic_inputs(index)
    if unknown and dynamic:
        hint = (f"; {len(unknown)} Softmax outputs have no static shape because inputs {', '.join(dynamic)} have "
                f"symbolic sizes: {FIX_INPUTS}")
    elif unknown:
        hint = f"; {len(unknown)} Softmax outputs have shapes shape inference could not resolve"
    return (f"no decoder cross-attention found: the graph has {len(softmax)} Softmax nodes, {len(attentions)} "
            f"matched as attention, none with keys independent of its queries{hint}. edgeprune needs a DETR-style "
            "decoder (queries attending to image tokens); if the graph has one, name each layer with "
            "--override layer.N.probs=TENSOR (and layer.N.key/value/logits)")


def mask_candidates(index: GraphIndex, probs: str | None, num_keys: int) -> list[str]:
    """Tensors added to (or selected into) a Softmax's scores with ``num_keys`` entries on their last
    axis: a padding or attention mask that key pruning must gather too."""
    node = index.producer.get(probs) if probs else None
    if node is None or node.op_type != "Softmax":
        return []
    found, todo, seen = [], [node.input[0]], set()
    while todo and len(seen) < 32:
        tensor = todo.pop()
        producer = index.producer.get(tensor)
        if tensor in seen or producer is None or producer.op_type not in _SCORE_WALK:
            continue
        seen.add(tensor)
        for name in (i for i in producer.input if i):
            shape = index.shape(name)
            if _from_scores(index, name):
                todo.append(name)
            elif producer.op_type in _MASK_OPS and shape and len(shape) >= 2 and shape[-1] == num_keys:
                found.append(name)
    return list(dict.fromkeys(found))


def projection_guesses(index: GraphIndex, probs: str, num_keys: int) -> tuple[tuple[str, str], ...]:
    """``--override`` values for the key and value projection inputs of the attention reading ``probs``.

    For a layer the matcher could not follow (an op it does not know between the pieces): the
    key side from the QK MatMul above the Softmax, the value side from the first MatMul below
    it that reads the probabilities through any ops; each walked up to its projections.
    """
    node = index.producer.get(probs)
    qk = _scores_matmul(index, node.input[0]) if node is not None and node.input else None
    pv = _probs_matmul(index, probs)
    found = []
    for part, side in (("key", qk.input[1] if qk is not None else None), ("value", pv.input[1] if pv else None)):
        pins = find_projections(index, side, num_keys) if side else None
        if pins:
            found.append((part, f"{pins[0].input.tensor}@{pins[0].input.consumer}"))
    return tuple(found)


def _scores_matmul(index: GraphIndex, tensor: str, depth: int = 12) -> Any | None:
    """The first MatMul with computed keys (input 1) above ``tensor``, through ops on one computed
    input (the queries may be constant: a first layer on learned queries)."""
    for _ in range(depth):
        node = index.producer.get(tensor)
        if node is None:
            return None
        computed = [i for i in node.input if i and not index.is_constant(i)]
        if node.op_type == "MatMul" and not index.is_constant(node.input[1]):
            return node
        if len(computed) != 1:
            return None
        tensor = computed[0]
    return None


def _probs_matmul(index: GraphIndex, probs: str, depth: int = 12) -> Any | None:
    """The first MatMul reading ``probs`` as its left input (through one-output ops below it)."""
    tensor = probs
    for _ in range(depth):
        users = index.users(tensor)
        pv = [u for u in users if u.op_type == "MatMul" and u.input[0] == tensor and not index.is_constant(u.input[1])]
        if pv:
            return pv[0]
        if len(users) != 1 or len(users[0].output) != 1:
            return None
        tensor = users[0].output[0]
    return None


def _from_scores(index: GraphIndex, tensor: str, depth: int = 8) -> bool:
    """``tensor`` is computed from a MatMul of two non-constants (the scores Q K^T) by score ops."""
    node = index.producer.get(tensor)
    if node is None or depth == 0 or index.is_constant(tensor):
        return False
    if node.op_type == "MatMul":
        return not index.is_constant(node.input[1])
    return node.op_type in _SCORE_WALK and any(_from_scores(index, i, depth - 1) for i in node.input if i)


def _have(structure: DecoderStructure, layer: DecoderLayer) -> dict[str, bool]:
    return {"probs": layer.probs.tensor is not None or layer.probs.fused_qk is not None,
            "key": bool(layer.key_inputs), "value": bool(layer.value_inputs),
            "mask": bool(layer.masks),
            "logits": layer.logits is not None or (layer.head_input is not None and structure.class_head is not None)}


def missing_parts(structure: DecoderStructure, parts: Iterable[str]) -> list[tuple[int, str, str]]:
    """(layer, part, guessed tensor or TENSOR) a pass needs but discovery did not find.

    A pass that reads keys also needs the mask of a layer whose scores have one discovery saw
    but could not record (a layer named by overrides): ungathered, it would fail in ONNX Runtime.
    """
    wanted = list(parts)
    unknown = [p for p in wanted if p not in LAYER_PARTS]
    if unknown:
        raise ValueError(f"unknown decoder parts {unknown}; known: {list(LAYER_PARTS)}")
    missing = []
    for layer in structure.layers:
        have = _have(structure, layer)
        guesses = dict(layer.guesses)
        missing += [(layer.index, p, guesses.get(p, PLACEHOLDER)) for p in wanted if not have[p]]
        if "key" in wanted and "mask" not in wanted and not layer.masks and layer.unmatched_masks:
            missing.append((layer.index, "mask", layer.unmatched_masks[0]))
    return missing


def require_parts(structure: DecoderStructure, parts: Iterable[str], needed_by: str = "this pass") -> None:
    """Raise one PatternNotFoundError listing every missing part as ready-to-paste ``--override`` flags."""
    missing = missing_parts(structure, parts)
    if not missing:
        return
    what = sorted({LAYER_PARTS[p].split(" (")[0] for _, p, _ in missing})
    flags = " ".join(f"--override layer.{i}.{p}={t}" for i, p, t in missing)
    raise PatternNotFoundError(
        f"{needed_by} needs {len(missing)} decoder part{'s' if len(missing) > 1 else ''} discovery did not find "
        f"({'; '.join(what)}); name {'them' if len(missing) > 1 else 'it'} with: {flags}")
