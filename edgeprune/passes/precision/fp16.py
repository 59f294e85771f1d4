"""fp16 conversion of a (possibly rewritten) model, keeping the sensitive parts in fp32.

``edgeprune rewrite --precision fp16`` and ``edgeprune bench --precision fp16`` both call
:func:`convert_fp16`. It wraps the maintained converter
(``onnxconverter_common.float16.convert_float_to_float16``) and adds what that converter
leaves to its user:

1. Kept in fp32 (node block list): every node whose name starts with one of
   ``keep_fp32_prefixes`` (the tgGBC importance/TopK subgraph ``tggbc/``, ToMe's matching
   and merging ``tome/``: a key's rank must not flip because of fp16 rounding) unless its
   name contains one of ``convert_parts`` (:data:`DATA_MOVE_PARTS`: the gathers of kept keys
   ``tggbc/l*/gather/``, the scoring's gathers of the top-k queries' attention rows
   ``tggbc/l*/rows/gather/`` (cast to fp32 after the gather, chunk by chunk) and the
   per-stage copies of shared key-path nodes ``*/copy/`` only move data or repeat what the
   original node computes in fp16), every op in
   ``keep_fp32_ops`` (:data:`FP32_OPS`) and the converter's own list (TopK, Range, CumSum,
   Min, Max, Resize, ...).
2. Graph repairs the converter needs: an initializer read by both an fp32 and an fp16 node
   is duplicated (the converter would keep one fp32 copy for both); ``Cast(to=float)``
   inside the fp16 part is retargeted to float16; ``ConstantOfShape`` without a value (an
   fp32 zero by default; the dynamo exporter writes it) gets an explicit one.
3. Redundant Casts are removed with onnx-graphsurgeon (:func:`remove_cast_round_trips`):
   ``Cast(fp32->fp16) -> Cast(fp16->fp32)`` between two fp32 nodes (it only added an fp16
   rounding), ``Cast(fp16->fp32) -> Cast(fp32->fp16)`` (an identity), longer chains, and
   duplicate Casts of one tensor (the converter casts a graph input once per consumer).
4. Strict type inference checks that every edge has one dtype before the model is returned.

Measured on ONNX Runtime 1.31 CPU (x86-64) against the fp32 model, seeded N(0, 1) inputs,
random weights (``build_model``); max abs deviation of logits / boxes:

=======================================================  ===============  ================
decoder                                                   all_cls_scores   all_bbox_preds
=======================================================  ===============  ================
tiny StreamPETR-like, 80 keys, 2 layers                   5.0e-3           2.2e-3
StreamPETR R50 704x256 (4224 keys), 3 layers              4.0e-3           2.2e-3
  + tgGBC r=3000 n=2, batch 2 (8 input seeds)             5.8e-3 - 8.9e-3  3.8e-3 - 7.4e-3
StreamPETR VoV 1600x640 (24000 keys), 6 layers            5.0e-3           3.2e-3
  + tgGBC r=21000 n=2 k=175                               6.8e-3 - 7.4e-3  4.0e-3 - 4.2e-3
=======================================================  ===============  ================

Stated tolerances: :data:`FP16_ABS_TOLERANCE` = 1e-2 for a converted decoder, and
:data:`FP16_PRUNED_ABS_TOLERANCE` = 2e-2 for a tgGBC/ToMe-rewritten one: there fp16
rounding can also move a key across the selection boundary, and the layers after it then
see a slightly different key set (the largest deviations above are in the last layer).
Keys tgGBC keeps in fp16 vs fp32 at 24000 keys: 99.96 % (layer 0) and 99.97 % (layer 1)
identical; with the ``tggbc/`` subgraph converted too, 99.93 % and a 35 % larger box error.
Converting the gathers (:data:`DATA_MOVE_PARTS`) instead of keeping them fp32 changes no
output bit and no kept index (StreamPETR 4224 keys tgGBC r=3000 n=2 batch 2, 8 seeds; 24000
keys r=21000 n=2 k=175, 4 seeds): gathering commutes with the fp16 rounding. It removes the
fp16 -> fp32 Cast of the full ``memory + key_pos`` the fp32 gathers read (27 -> 22 Casts at
4224 keys, 39 -> 34 at 24000) and was 1 % faster on ORT CPU, 1 thread (median 560.5 ->
556.2 ms at 24000 keys, 401.1 -> 397.0 ms at 4224; speedup 95 % CI [1.00, 1.02] both).
Where onnxsim left a flattening Reshape shared by the layers (its ``copy/`` per stage is
converted now) outputs are not bit-identical: an fp32 copy fed its fp16 Gemm through a
Cast round trip that ORT removes, skipping one fp16 rounding. On the handwritten test
decoders (50 keys) the deviation from fp32 moved either way: 1.2e-3 -> 1.4e-3, 1.6e-3 -> 1.5e-3.
Softmax in fp32 (:data:`FP32_OPS`): on ORT CPU (x86-64, and the aarch64 1.22 wheel under
qemu) Softmax, MatMul and Add have no fp16 kernel and run in fp32 between inserted Casts
anyway, so it costs nothing there and changed the deviation by < 15 %; it is kept because a
native fp16 softmax over 24000 keys would sum 24000 terms in fp16 (spacing 16 above 16384).
LayerNormalization in fp32 lowered the deviation by ~10-25 % but adds two Casts per norm
(25 -> 183 Casts at 6 layers) and ORT has a native fp16 kernel for it, so it stays fp16.
Opset < 17 exports decompose LayerNorm into ReduceMean/Pow/Sqrt: those pieces run in fp16.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from edgeprune._lazy import require
from edgeprune.errors import InternalError, InvalidModelError
from edgeprune.graph.edit import export_graph
from edgeprune.graph.files import needs_external_data
from edgeprune.graph.run import cpu_session, run_all
from edgeprune.passes.registry import BasePass

log = logging.getLogger(__name__)

FLOAT, FLOAT16 = 1, 10           # onnx.TensorProto data types
DEFAULT_KEEP_PREFIXES = ("tggbc/", "tome/")
# Parts of those subgraphs converted anyway: they only move data (see the module docstring).
DATA_MOVE_PARTS: tuple[str, ...] = ("/gather/", "/copy/")
# Ops kept in fp32 beyond the converter's own block list (see the module docstring for why).
FP32_OPS: tuple[str, ...] = ("Softmax",)
# Stated max abs deviation from fp32 of logits and boxes of PETR-family decoders on ORT CPU,
# plain and after key pruning / merging (see the module docstring for the measurements).
FP16_ABS_TOLERANCE = 1e-2
FP16_PRUNED_ABS_TOLERANCE = 2e-2


@dataclass(frozen=True)
class OutputDeviation:
    """How far one output of a converted model is from the fp32 model on the same inputs."""

    name: str
    max_abs: float
    max_rel: float      # max |a - b| / max |a|: relative to the output's scale (as verify reports)
    ref_max_abs: float  # largest |value| of the fp32 output, for scale

    def summary(self) -> str:
        return (f"{self.name}: max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g} "
                f"(fp32 values up to {self.ref_max_abs:.3g})")


def convert_fp16(model: Any, *, keep_fp32_prefixes: Sequence[str] = DEFAULT_KEEP_PREFIXES,
                 keep_io_types: bool = True, keep_fp32_ops: Sequence[str] = FP32_OPS,
                 convert_parts: Sequence[str] = DATA_MOVE_PARTS) -> Any:
    """Return an fp16 copy of ``model`` (an onnx.ModelProto); ``model`` is not modified.

    ``keep_io_types`` keeps fp32 graph inputs/outputs (a Cast at each), so callers feed the
    same arrays as to the fp32 model. Raises InvalidModelError if the model is already fp16.
    """
    onnx = require("onnx")
    float16 = require("onnxconverter_common.float16")
    if is_fp16(model):
        raise InvalidModelError("the model is already fp16 (float16 weights or inputs); convert the fp32 model "
                                "instead, or drop --precision fp16")
    work = onnx.ModelProto()
    work.CopyFrom(model)
    blocked = fp32_node_names(work.graph, keep_fp32_prefixes, convert_parts)
    op_block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(keep_fp32_ops))
    blocked |= {n.name for n in work.graph.node if n.op_type in op_block}
    _untie_shared_initializers(work.graph, blocked)
    _explicit_float_producers(work.graph, blocked)
    with warnings.catch_warnings(record=True) as caught:     # constants clipped to fp16's range
        warnings.simplefilter("always")
        # is_fp16 above is the readiness check; the converter's own would see the retargeted Casts
        converted = float16.convert_float_to_float16(work, keep_io_types=keep_io_types, op_block_list=op_block,
                                                     node_block_list=sorted(blocked), check_fp16_ready=False)
    for message in sorted({str(w.message) for w in caught}):
        log.debug("fp16 converter: %s", message)
    converted, removed = remove_cast_round_trips(converted)
    del converted.metadata_props[:]
    converted.metadata_props.extend(model.metadata_props)
    _check_types(converted)
    log.info("fp16: %d nodes kept in fp32, %d redundant Casts removed", len(blocked), removed)
    return converted


def is_fp16(model: Any) -> bool:
    """True when any initializer, graph input or output is float16 (the converter's own test)."""
    graph = model.graph
    if any(init.data_type == FLOAT16 for init in graph.initializer):
        return True
    return any(v.type.tensor_type.elem_type == FLOAT16 for v in list(graph.input) + list(graph.output))


def fp32_node_names(graph: Any, prefixes: Iterable[str], convert_parts: Iterable[str] = ()) -> set[str]:
    """Names of the nodes (unnamed nodes get a unique name here) that match a keep prefix and
    contain none of ``convert_parts``."""
    prefixes, parts = tuple(prefixes), tuple(convert_parts)
    used = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:                       # the converter's block list is by name
            name = f"fp16/unnamed_{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)
    return {n.name for n in graph.node
            if prefixes and n.name.startswith(prefixes) and not any(part in n.name for part in parts)}


def _untie_shared_initializers(graph: Any, blocked: set[str]) -> None:
    """Give fp32 nodes their own copy of an initializer that fp16 nodes also read."""
    inits = {i.name: i for i in graph.initializer if i.data_type == FLOAT}
    readers: dict[str, set[bool]] = {}
    for node in graph.node:
        for name in node.input:
            if name in inits:
                readers.setdefault(name, set()).add(node.name in blocked)
    shared = {name for name, kinds in readers.items() if len(kinds) == 2}
    for name in sorted(shared):
        copy = graph.initializer.add()
        copy.CopyFrom(inits[name])
        copy.name = f"{name}/fp32"
        for node in graph.node:
            if node.name in blocked:
                node.input[:] = [copy.name if i == name else i for i in node.input]


def _explicit_float_producers(graph: Any, blocked: set[str]) -> None:
    """Make nodes that create fp32 from non-float inputs follow the conversion."""
    helper = require("onnx.helper")
    for node in graph.node:
        if node.name in blocked:
            continue
        if node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to" and attr.i == FLOAT:
                    attr.i = FLOAT16
        elif node.op_type == "ConstantOfShape" and not any(a.name == "value" for a in node.attribute):
            node.attribute.append(helper.make_attribute("value", helper.make_tensor("value", FLOAT, [1], [0.0])))


def _cast_to(node: Any) -> int:
    return int(node.attrs["to"])


def remove_cast_round_trips(model: Any) -> tuple[Any, int]:
    """Collapse chains of float Casts and merge duplicate Casts; return (model, Casts removed).

    ``x -> Cast(a) -> Cast(b)`` becomes ``x -> Cast(b)``, or just ``x`` when ``x`` already has
    type ``b``. Dropping ``fp32 -> fp16 -> fp32`` removes one fp16 rounding between two fp32
    nodes, which is what keeping them in fp32 asked for. The converter also casts a graph
    input once per consumer; Casts of one tensor to one type are merged.
    """
    gs = require("onnx_graphsurgeon")
    graph = gs.import_onnx(model)
    before = sum(1 for n in graph.nodes if n.op == "Cast")
    for node in graph.nodes:
        if node.op == "Cast" and _cast_to(node) in (FLOAT, FLOAT16):
            _collapse_chain(graph, node)
    _merge_duplicate_casts(graph)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    after = sum(1 for n in graph.nodes if n.op == "Cast")
    return export_graph(gs, graph, model, keep_shapes=True), before - after


def _is_float_cast(node: Any) -> bool:
    return node.op == "Cast" and _cast_to(node) in (FLOAT, FLOAT16)


def _collapse_chain(graph: Any, node: Any) -> None:
    """Read the first non-Cast source of a chain of float Casts ending at ``node``."""
    source = node.inputs[0]
    while source.inputs and _is_float_cast(source.inputs[0]):
        source = source.inputs[0].inputs[0]
    if source is node.inputs[0]:
        return
    if _dtype_code(source) == _cast_to(node) and node.outputs[0] not in graph.outputs:
        _bypass(node, source)
    else:
        node.inputs[0] = source


def _merge_duplicate_casts(graph: Any) -> None:
    """One Cast per (input tensor, target type): later duplicates hand their consumers over."""
    first: dict[tuple[str, int], Any] = {}
    for node in graph.nodes:
        if node.op != "Cast" or not node.outputs or node.outputs[0] in graph.outputs:
            continue
        key = (node.inputs[0].name, _cast_to(node))
        if key in first:
            _bypass(node, first[key].outputs[0])
        else:
            first[key] = node


def _dtype_code(tensor: Any) -> int | None:
    """ONNX dtype code of a graph-surgeon tensor, or None when unknown."""
    onnx = require("onnx")
    if tensor.dtype is None:
        return None
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(tensor.dtype)
    except (KeyError, TypeError, ValueError):
        return None


def _bypass(node: Any, source: Any) -> None:
    """Point every consumer of ``node``'s output at ``source`` (the Cast is an identity)."""
    out = node.outputs[0]
    for consumer in list(out.outputs):
        for i, tensor in enumerate(consumer.inputs):
            if tensor is out:
                consumer.inputs[i] = source
    node.outputs.clear()


def count_cast_round_trips(model: Any) -> int:
    """Casts between float types whose input comes straight from another such Cast."""
    casts = {n.output[0]: n for n in model.graph.node if n.op_type == "Cast" and _proto_to(n) in (FLOAT, FLOAT16)}
    return sum(1 for n in casts.values() if n.input[0] in casts)


def _proto_to(node: Any) -> int:
    return next(a.i for a in node.attribute if a.name == "to")


def _check_types(model: Any) -> None:
    """Strict type inference: every edge must have exactly one dtype after conversion."""
    onnx = require("onnx")
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except onnx.shape_inference.InferenceError as exc:
        errors = [line.strip() for line in str(exc).splitlines() if "op_type" in line] or [" ".join(str(exc).split())]
        more = f" and {len(errors) - 1} more" if len(errors) > 1 else ""
        raise InternalError(f"fp16 conversion produced an inconsistent graph ({errors[0]}{more}); "
                            "please report it (run with -v); meanwhile use --precision fp32") from exc


def output_deviation(reference: Mapping[str, Any], candidate: Mapping[str, Any]) -> tuple[OutputDeviation, ...]:
    """Per-output deviation of ``candidate`` from ``reference`` (name -> numpy array)."""
    np = require("numpy")
    out = []
    for name, ref in reference.items():
        ref64 = np.asarray(ref, dtype=np.float64)
        diff = float(np.abs(np.asarray(candidate[name], dtype=np.float64) - ref64).max(initial=0.0))
        scale = float(np.abs(ref64).max(initial=0.0))
        out.append(OutputDeviation(name, diff, diff / scale if scale > 0 else diff, scale))
    return tuple(out)


def measure_deviation(reference: Any, converted: Any, seed: int = 0) -> tuple[OutputDeviation, ...]:
    """Run both models (ModelProtos, same inputs) on ORT CPU; deviation of each output.

    Inputs are the driver's verification inputs (``verify.random_inputs``: floats ~ N(0, 1)).
    """
    from edgeprune.passes.verify import random_inputs

    sessions = [cpu_session(m, optimize=False) for m in (reference, converted)]
    feeds = random_inputs(sessions[0], seed)
    return output_deviation(run_all(sessions[0], feeds), run_all(sessions[1], feeds))


class Fp16Pass(BasePass):
    """``--precision fp16``: :func:`convert_fp16` after every method pass (or alone with ``--method none``).

    With ``measure`` (the CLI's default, off with ``--no-verify``) it logs the deviation of the
    fp16 graph from the fp32 graph it converted: after a method pass that is the fp16 error
    alone, whereas the driver's verification compares against the unpruned input model.
    """

    name = "fp16"
    help = ("float16 weights and activations; tgGBC/ToMe scoring, Softmax and the converter's "
            "sensitive ops stay fp32; inputs and outputs stay fp32")

    def __init__(self, measure: bool = True) -> None:
        self.measure = measure

    @classmethod
    def from_args(cls, args: Any) -> Fp16Pass:
        return cls(measure=not getattr(args, "no_verify", False))

    def apply(self, working: Any, structure: Any) -> None:
        model = working.proto()
        converted = convert_fp16(model)
        working.replace(converted)
        if not self.measure:
            return
        if needs_external_data(model):
            log.info("fp16: model too large to compare in memory; see the verification below")
            return
        for deviation in measure_deviation(model, converted):
            log.info("fp16 vs fp32 graph (random inputs): %s", deviation.summary())

    def __repr__(self) -> str:
        return f"Fp16Pass(measure={self.measure})"
