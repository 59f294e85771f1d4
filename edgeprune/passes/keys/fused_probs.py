"""softmax(Q K^T * scale + mask) of a fused attention op, recomputed for tgGBC's scoring.

A fused op (ONNX ``Attention``, ORT's ``MultiHeadAttention``) does not expose its probabilities,
so the tgGBC pass recomputes them from the op's own Q and K inputs (with its bias, scale and
masks), in fp32. When every mask is the same for every query, only the scoring queries' Q rows
are taken before Q K^T, so the recomputation costs k rows instead of Nq.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from edgeprune.errors import PatternNotFoundError
from edgeprune.graph.edit import BOOL, FLOAT, GraphEditor
from edgeprune.passes.discovery.structure import DecoderLayer, MaskInput


def fused_probs(ed: GraphEditor, layer: DecoderLayer, batch: int, rows: Any | None) -> tuple[Any, bool]:
    """softmax(Q K^T * scale + mask) recomputed from a fused attention op's inputs, in fp32:
    ([B, h, k, Nk] for the queries ``rows`` [B, k] when their Q rows could be picked first, True)
    or ([B, h, Nq, Nk], False)."""
    p, b, h = layer.probs, batch, layer.probs.num_heads
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
    q_rows_first = rows is not None and all(per_key_mask(ed, fused, m) for m in layer.masks)
    if q_rows_first:                                                            # Q [B, Nq, ..] -> [B, k, ..]
        q = ed.gather_per_batch(q, rows, b, batch_axis=0, axis=1 if rank == 3 else 2, rank=rank, what="q_top")
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
    return ed.op("Softmax", [scores], "probs", axis=-1), q_rows_first


def per_key_mask(ed: GraphEditor, fused: Any, mask: MaskInput) -> bool:
    """Whether ``mask`` is the same for every query (so Q rows can be picked before Q K^T).

    A mask of unknown shape may vary per query: then all rows are recomputed and picked after.
    """
    if fused.op == "MultiHeadAttention" and mask.input_index == 4:             # key_padding_mask [B, Nk]
        return True
    if mask.tensor not in ed.info:
        return False
    shape = ed.info[mask.tensor][1]
    return len(shape) < 2 or shape[-2] == 1


def _fused_mask_bias(ed: GraphEditor, fused: Any, mask: MaskInput, batch: int) -> Any:
    """An additive bias from a fused op's mask input (as currently wired): broadcastable to scores."""
    tensor = fused.inputs[mask.input_index]
    elem = ed.info.get(mask.tensor, (FLOAT, ()))[0]
    if fused.op == "MultiHeadAttention" and mask.input_index == 4:             # key_padding_mask [B, Nk], 1 = keep
        if ed.rank(mask.tensor) != 2:
            raise PatternNotFoundError(f"{fused.name}: key_padding_mask {mask.tensor} is not [B, Nk]; tgGBC reads "
                                       "only that form of MultiHeadAttention's mask")
        fill = float(fused.attrs.get("mask_filter_value", -10000.0))
        blocked = ed.op("Equal", [tensor, ed.const("zero", np.zeros((), dtype=np.int32))], "blocked")
        bias = ed.op("Where", [blocked, ed.const("fill", np.float32(fill)), ed.const("zero", np.float32(0))], "bias")
        return ed.reshape(bias, "bias4", batch, 1, 1, -1)
    if elem == BOOL:                                                           # ONNX Attention: True = attend
        return ed.op("Where", [tensor, ed.const("zero", np.float32(0)), ed.const("ninf", np.float32(-np.inf))],
                     "bias")
    return ed.as_float(tensor, mask.tensor)
