"""int8 quantization of a (possibly rewritten) model with ONNX Runtime's quantization tool.

``edgeprune rewrite --precision int8 (--calib X.npz | --data DIR)`` (static: activation
scales from calibration runs) and ``--precision int8-dynamic`` (activation scales computed
at run time, no calibration) both call :func:`quantize_int8`. The work is
``onnxruntime.quantization``'s: ``quant_pre_process`` (ONNX shape inference and ORT's basic
graph optimizations, so the quantizer sees fused, typed nodes), then ``quantize_static``
(QDQ by default, or QOperator with ``--quant-format qoperator``) or ``quantize_dynamic``.
What this module adds:

1. What stays float (``nodes_to_exclude``, :func:`float_nodes`), each with its reason:
   every node named ``tggbc/...`` (the importance scores, TopK selection and the Gathers of
   kept keys: an int8 score would tie keys whose fp32 scores differ and flip the selection)
   and ``tome/...`` (ToMe's bipartite matching: the same reason), every Softmax (it decides
   what the attention reads; ORT has no int8 Softmax on the input side of an int8 MatMul),
   and the data-dependent index ops TopK / Gather / GatherElements / ScatterElements /
   ArgMax (integer indices, nothing to quantize, and a quantized data input only adds a
   Q/DQ pair). With ``--int8-sensitivity TOL`` also every weight GEMM that, quantized alone,
   moves an output by more than TOL of its range on the calibration inputs
   (:mod:`edgeprune.passes.precision.sensitivity`; on the trained demo one key projection
   alone costs 5 mAP points). ``-v`` lists them; the summary line counts them by reason.
2. The signedness and range that fit the target's kernels (:data:`DEFAULT_CONFIG`):
   activations uint8, weights int8 (U8S8), per-channel weights, symmetric int8 weights
   with ``reduce_range`` (7-bit weights). ONNX Runtime's quantization guide
   (performance/model-optimizations/quantization) says: S8S8 with QDQ is its general
   default; on x86-64 with AVX2 / AVX-512 but no VNNI the U8S8 kernels use VPMADDUBSW,
   whose 16-bit intermediate sums saturate, and "per-channel ... on AVX2 and AVX512
   machines, you will generally need to enable reduce-range as well"; on x86 with VNNI and
   on ARM with the dot-product instructions (the OrangePi 5's Cortex-A76, ``asimddp``)
   there is no saturation. Measured on an AMD EPYC without VNNI (ORT 1.32): without
   reduce_range, quantizing ONE projection of the StreamPETR-R50 decoder (the self-attention
   value projection, whose input holds 900 zero rows next to the temporal memory) moved
   the class logits by 22 % of their range; with reduce_range the whole decoder stays
   within 2.3 %. On an EPYC with AVX-512 VNNI the whole tgGBC decoder with full-range
   weights stays within 2.3 % (2.7 % with reduce_range): no saturation there, as the guide
   says. The default stays reduce_range, the choice that is safe on every x86. U8
   activations: ``quantize_dynamic`` only has U8, and QOperator S8S8 is slow on x86 (the
   guide). reduce_range costs one bit of weight precision on ARM / VNNI; ``--full-range``
   turns it off for models that only run there.
3. Calibration (static only) on the model's own inputs: ``--calib X.npz`` (one array per
   model input, ``[B, ...]`` or ``[S, B, ...]``: what a decoder export takes) or
   ``--data DIR`` (a synthetic dataset: the scenes' normalised images, zeros for the
   temporal inputs, as ``edgeprune eval`` feeds a whole-model export). Methods: ``minmax``
   (default: the decoder's activations have no long tails on the data we have),
   ``entropy`` and ``percentile`` (99.999) for models whose calibration shows outliers.

Which ops are quantized: MatMul and Gemm with a constant weight (:data:`INT8_OPS`), i.e. the
projections, FFNs and heads; their outputs stay float (:data:`FLOAT_OUTPUT_OPS`), and so do the
attention products (:data:`ATTENTION_REASON`; ``--int8-attention`` quantizes them). Quantizing
the element-wise ops too (ORT's default list: Add, Mul, Concat, Sigmoid, Softmax ...) put a
Q/DQ pair around nearly every node and ran slower than fp32 on ORT CPU. Where the time goes
and what int8 can gain there: ``benchmarks/results/int8_decoder-*.md``.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from edgeprune._lazy import require
from edgeprune.errors import InvalidModelError, ParameterError
from edgeprune.graph.files import load_model, save_onnx
from edgeprune.graph.index import name_nodes
from edgeprune.graph.ops import QUANTIZED_OPS
from edgeprune.graph.values import constant_names
from edgeprune.passes.registry import BasePass

log = logging.getLogger(__name__)

QUANT_FORMATS = ("qdq", "qoperator")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
INT8_OPS: tuple[str, ...] = ("MatMul", "Gemm")
# name prefix -> why the nodes of that subgraph stay float
FLOAT_PREFIXES: dict[str, str] = {
    "tggbc/": "tgGBC key scoring/selection: an int8 score would flip which keys are kept",
    "tome/": "ToMe matching/merging: an int8 similarity would flip which keys merge",
}
# op type -> why it stays float
FLOAT_OPS: dict[str, str] = {
    "Softmax": "attention probabilities: kept float as in the fp16 pass",
    "TopK": "selection by value: ties under int8 reorder it",
    "Gather": "index op: moves data, nothing to compute in int8",
    "GatherElements": "index op: moves data, nothing to compute in int8",
    "ScatterElements": "index op: moves data, nothing to compute in int8",
    "ArgMax": "selection by value: ties under int8 reorder it",
}
# QDQ: no QuantizeLinear on these ops' outputs. With one, ORT's QDQ fusion turns the float
# Softmax after an attention MatMul into QLinearSoftmax (DQ -> Softmax -> Q), 3.2x slower than
# the float Softmax on ORT 1.32 CPU (46 % of the int8 decoder's time): the naive 0.57x. Without
# it ORT runs DQ -> MatMul as MatMulIntegerToFloat / QGemm with a float output, and Softmax,
# LayerNorm and the residual Adds read float (fewer requantizations, also more accurate).
FLOAT_OUTPUT_OPS: tuple[str, ...] = ("MatMul", "Gemm")
# Why the attention products stay float by default (``--int8-attention`` quantizes them):
# measured per op on the StreamPETR-R50 tgGBC decoder, 1 thread, ORT 1.32, AVX2 without VNNI
# (with VNNI too: quantized attention ran slower, benchmarks/README.md),
# the q k^T (inner dim = head dim 32) and p v MatMuls took 1339 ms in fp32 and 1182 ms as
# MatMulIntegerToFloat/QLinearMatMul plus 337 ms to quantize their inputs (the 8 x 900 x Nk
# attention probabilities): slower, and they moved the outputs 3x more than the projections.
ATTENTION_REASON = "attention product (activation x activation): int8 was slower on ORT CPU and less exact"
SENSITIVE_REASON = "sensitive"          # --int8-sensitivity (edgeprune.passes.precision.sensitivity)
SENSITIVITY_NEEDS_INPUTS = ("--int8-sensitivity measures on real inputs: give exactly one of --calib X.npz "
                            "(decoder inputs) or --data DIR (a dataset, whole-model exports)")
# Stated max deviation from the fp32 model, relative to each output's range (max - min), of
# int8 PETR-family decoders on ORT CPU (x86-64, aarch64): see the tests and benchmarks.
INT8_REL_TOLERANCE = 0.10


@dataclass(frozen=True)
class Int8Config:
    """How to quantize; the defaults are :data:`DEFAULT_CONFIG` (see the module docstring)."""

    dynamic: bool = False
    quant_format: str = "qdq"             # static only
    calibration: str = "minmax"           # static only
    per_channel: bool = True
    reduce_range: bool = True             # 7-bit weights: no U8S8 saturation on AVX2 without VNNI
    activation_signed: bool = False       # False: uint8 activations (U8S8)
    op_types: tuple[str, ...] = INT8_OPS
    attention: bool = False               # also quantize activation x activation MatMuls
    sensitivity: float | None = None      # keep float GEMMs that alone move an output more (share of its range)

    def __post_init__(self) -> None:
        if self.sensitivity is not None and not 0.0 < self.sensitivity < 1.0:
            raise ParameterError(f"--int8-sensitivity {self.sensitivity:g} is not in (0, 1); give a fraction of "
                                 "the output range, e.g. 0.05")

    def describe(self) -> str:
        kind = "dynamic" if self.dynamic else f"static {self.quant_format.upper()}, {self.calibration} calibration"
        sign = "S8S8" if self.activation_signed and not self.dynamic else "U8S8"
        return (f"{kind}, {sign}, {'per-channel' if self.per_channel else 'per-tensor'} weights"
                f"{', reduce-range' if self.reduce_range else ''}, ops {'/'.join(self.op_types)}"
                f"{' incl. attention' if self.attention else ''}"
                f"{self._sensitivity_note()}")

    def _sensitivity_note(self) -> str:
        if self.sensitivity is None:
            return ""
        return f", GEMMs moving an output > {self.sensitivity:g} of its range kept float"


DEFAULT_CONFIG = Int8Config()


@dataclass(frozen=True)
class FloatNode:
    """A node kept in float, and why."""

    name: str
    op_type: str
    reason: str


def float_nodes(graph: Any, attention: bool = False) -> tuple[FloatNode, ...]:
    """The nodes of ``graph`` (an onnx GraphProto) that stay float, with their reasons.

    Without ``attention`` the activation x activation MatMuls (attention scores ``q k^T`` and
    the weighted values ``p v``) stay float too (:data:`ATTENTION_REASON`).
    """
    constants = constant_names(graph)
    out = []
    for node in graph.node:
        prefix = next((p for p in FLOAT_PREFIXES if node.name.startswith(p)), None)
        if prefix is not None:
            out.append(FloatNode(node.name, node.op_type, FLOAT_PREFIXES[prefix]))
        elif node.op_type in FLOAT_OPS:
            out.append(FloatNode(node.name, node.op_type, FLOAT_OPS[node.op_type]))
        elif not attention and node.op_type == "MatMul" and not constants.intersection(node.input):
            out.append(FloatNode(node.name, node.op_type, ATTENTION_REASON))
    return tuple(out)


def _sensitive_nodes(pre: Path, config: Int8Config, kept: Sequence[FloatNode],
                     feeds: Sequence[Mapping[str, Any]] | None) -> tuple[FloatNode, ...]:
    """The GEMMs that, quantized alone, move an output by more than ``config.sensitivity`` of its range."""
    from edgeprune.passes.precision.sensitivity import probe

    if not feeds:
        raise ParameterError(SENSITIVITY_NEEDS_INPUTS)
    tol = float(config.sensitivity)
    found = [s for s in probe(pre, config, [k.name for k in kept], feeds, _quiet_quantize) if s.deviation > tol]
    return tuple(FloatNode(s.name, s.op_type, f"{SENSITIVE_REASON}: quantized alone it moved an output by "
                                              f"{s.deviation:.1%} of its range (> {tol:g})") for s in found)


def is_quantized(model: Any) -> bool:
    """True when the model already holds quantization ops (quantizing again is refused)."""
    return any(n.op_type in QUANTIZED_OPS for n in model.graph.node)


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over a list of feeds (duck-typed)."""

    def __init__(self, feeds: Sequence[Mapping[str, Any]]) -> None:
        self._feeds: Iterator[Mapping[str, Any]] = iter(feeds)

    def get_next(self) -> Mapping[str, Any] | None:
        return next(self._feeds, None)


def quantize_int8(model: Any, config: Int8Config = DEFAULT_CONFIG,
                  feeds: Sequence[Mapping[str, Any]] | None = None) -> tuple[Any, tuple[FloatNode, ...]]:
    """Return (int8 copy of ``model``, the nodes kept float); ``model`` is not modified.

    ``feeds`` (calibration inputs, one dict per run) are required for static quantization.
    """
    onnx = require("onnx")
    if is_quantized(model):
        raise InvalidModelError("the model is already quantized (it has QuantizeLinear/MatMulInteger/... nodes); "
                                "quantize the float model instead, or drop --precision int8")
    if not config.dynamic and not feeds:
        raise ParameterError("static int8 needs calibration inputs: give --calib X.npz (decoder inputs) or "
                             "--data DIR (a dataset, whole-model exports), or use --precision int8-dynamic")
    work = onnx.ModelProto()
    work.CopyFrom(model)
    with tempfile.TemporaryDirectory(prefix="edgeprune-int8-") as tmp:
        src, pre, out = (Path(tmp) / n for n in ("float.onnx", "pre.onnx", "int8.onnx"))
        save_onnx(work, src)
        _pre_process(src, pre)
        prepared = load_model(pre)
        name_nodes(prepared, prefix="int8/unnamed")        # the quantizer excludes nodes by name
        kept = float_nodes(prepared.graph, attention=config.attention)
        save_onnx(prepared, pre)
        if config.sensitivity is not None:
            kept += _sensitive_nodes(pre, config, kept, feeds)
        _quiet_quantize(pre, out, config, [k.name for k in kept], feeds)
        quantized = load_model(out)
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(model.metadata_props)
    return quantized, kept


class _ToDebug(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        log.debug("onnxruntime.quantization: %s", record.getMessage())


@contextlib.contextmanager
def _quantizer_logs_to_debug() -> Iterator[None]:
    """The quantizer logs through the root logger (``logging.warning``), which would install a
    stderr handler on first use and print every later edgeprune message twice: route them to
    our debug log while it runs and leave the root logger as it was."""
    root = logging.getLogger()
    handler = _ToDebug()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)


def _pre_process(src: Path, dst: Path) -> None:
    """ORT's recommended pre-processing; symbolic shape inference is skipped (static shapes)."""
    shape_inference = require("onnxruntime.quantization.shape_inference")
    shape_inference.quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)


def _quantize(src: Path, dst: Path, config: Int8Config, exclude: list[str],
              feeds: Sequence[Mapping[str, Any]] | None) -> None:
    quantization = require("onnxruntime.quantization")
    common = dict(op_types_to_quantize=list(config.op_types), per_channel=config.per_channel,
                  reduce_range=config.reduce_range, weight_type=quantization.QuantType.QInt8)
    if config.dynamic:
        # quantize_dynamic rewrites Gemm as MatMul + Add first, naming the MatMul NAME_MatMul.
        quantization.quantize_dynamic(str(src), str(dst), nodes_to_exclude=exclude + [f"{n}_MatMul" for n in exclude],
                                      extra_options={"MatMulConstBOnly": not config.attention}, **common)
        return
    method = {"minmax": quantization.CalibrationMethod.MinMax, "entropy": quantization.CalibrationMethod.Entropy,
              "percentile": quantization.CalibrationMethod.Percentile}[config.calibration]
    formats = {"qdq": quantization.QuantFormat.QDQ, "qoperator": quantization.QuantFormat.QOperator}
    activation = quantization.QuantType.QInt8 if config.activation_signed else quantization.QuantType.QUInt8
    quantization.quantize_static(str(src), str(dst), _Reader(list(feeds or ())),
                                 quant_format=formats[config.quant_format], activation_type=activation,
                                 calibrate_method=method, nodes_to_exclude=exclude,
                                 extra_options=_static_options(config), **common)


def _quiet_quantize(src: Path, dst: Path, config: Int8Config, exclude: list[str],
                    feeds: Sequence[Mapping[str, Any]] | None) -> None:
    with _quantizer_logs_to_debug():
        _quantize(src, dst, config, exclude, feeds)


def _static_options(config: Int8Config) -> dict[str, Any]:
    """QDQ: MatMul/Gemm outputs stay float (see :data:`FLOAT_OUTPUT_OPS`)."""
    if config.quant_format != "qdq":
        return {}
    return {"OpTypesToExcludeOutputQuantization": [op for op in config.op_types if op in FLOAT_OUTPUT_OPS]}


def summary(kept: Iterable[FloatNode], config: Int8Config, model: Any, samples: int) -> str:
    """One line: how the model was quantized and how many nodes stayed float, by reason."""
    kept = list(kept)
    counts = _op_counts(model)
    quantized = sum(counts.get(op, 0) for op in ("QuantizeLinear", "DynamicQuantizeLinear"))
    parts: dict[str, int] = {}
    for k in kept:
        label = next((p.rstrip("/") for p in FLOAT_PREFIXES if k.name.startswith(p)),
                     "attention MatMul" if k.reason == ATTENTION_REASON else
                     "sensitive GEMM" if k.reason.startswith(SENSITIVE_REASON) else k.op_type)
        parts[label] = parts.get(label, 0) + 1
    calib = "" if config.dynamic else f" on {samples} calibration run(s)"
    return (f"int8 ({config.describe()}){calib}: {quantized} activation quantizers; {len(kept)} nodes kept float "
            f"({', '.join(f'{n} {label}' for label, n in sorted(parts.items())) or 'none'}; -v lists them)")


def _op_counts(model: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# ----------------------------------------------------------------------------- calibration inputs
def calibration_feeds(model: Any, calib: str | None, data: str | None) -> list[dict[str, Any]]:
    """Feeds for static calibration from ``--calib X.npz`` or ``--data DIR`` (exactly one)."""
    if (calib is None) == (data is None):
        raise ParameterError("--precision int8 calibrates on --calib X.npz (decoder inputs) or --data DIR "
                             "(a dataset, whole-model exports): give exactly one, or use --precision int8-dynamic")
    if calib is not None:
        from edgeprune.passes.queries.inputs import calibration_samples, load_calibration

        return calibration_samples(model, load_calibration(calib))
    return dataset_feeds(model, data)


def dataset_feeds(model: Any, data: str | None) -> list[dict[str, Any]]:
    """One feed per full batch of scenes: the normalised images, zeros for the other inputs."""
    from edgeprune.data.format import batches, load_dataset, model_images
    from edgeprune.evaluation.inference import check_image_size, feeds_for, image_input
    from edgeprune.graph.run import cpu_session

    dataset = load_dataset(data)
    sess = cpu_session(model, optimize=False)
    batch, shape = image_input(sess, "the model")
    check_image_size(shape, dataset, "the model")
    feeds = [feeds_for(sess, model_images(images)) for _, images in batches(dataset, batch) if len(images) == batch]
    if not feeds:
        raise ParameterError(f"--data {data} has {len(dataset)} scene(s), fewer than the model's batch {batch}; "
                             "generate more scenes with edgeprune dataset synth --scenes N")
    return feeds


# ----------------------------------------------------------------------------- passes
class Int8Pass(BasePass):
    """``--precision int8``: static quantization (calibrated) after every method pass."""

    name = "int8"
    needs_calibration = True
    help = ("int8 MatMul/Gemm (static, calibrated on --calib X.npz or --data DIR); tgGBC/ToMe scoring and "
            "selection, Softmax, TopK and Gather stay float; inputs and outputs stay float")

    def __init__(self, config: Int8Config = DEFAULT_CONFIG, calib: str | None = None, data: str | None = None,
                 feeds: Sequence[Mapping[str, Any]] | None = None) -> None:
        self.config, self.calib, self.data, self.feeds = config, calib, data, feeds

    @classmethod
    def add_arguments(cls, group: Any) -> None:
        group.add_argument("--quant-format", choices=QUANT_FORMATS, default="qdq",
                           help="static int8: QDQ (QuantizeLinear/DequantizeLinear pairs ORT fuses; default) or "
                                "QOperator (QLinearMatMul/QGemm nodes)")
        group.add_argument("--calibration", choices=CALIBRATION_METHODS, default="minmax",
                           help="static int8: how activation ranges are taken from the calibration runs (default minmax)")
        group.add_argument("--per-tensor", action="store_true",
                           help="int8: one weight scale per tensor instead of per output channel")
        group.add_argument("--full-range", action="store_true",
                           help="int8: 8-bit weights (default 7-bit 'reduce range', needed on x86 without VNNI; "
                                "safe to drop for ARM dot-product / VNNI boards)")
        group.add_argument("--signed-activations", action="store_true",
                           help="static int8: int8 activations (S8S8) instead of uint8 (U8S8)")
        group.add_argument("--int8-sensitivity", type=float, default=None, metavar="TOL",
                           help="int8: first quantize each weight GEMM alone on the --calib/--data inputs and keep "
                                "float those that move an output by more than TOL of its range (e.g. 0.05; costs "
                                "one quantization and a few runs per GEMM; also for int8-dynamic)")
        group.add_argument("--int8-attention", action="store_true",
                           help="int8: also quantize the attention products q k^T and p v (default float: on ORT "
                                "CPU x86 they were slower in int8)")

    @classmethod
    def config_from_args(cls, args: Any, dynamic: bool) -> Int8Config:
        return Int8Config(dynamic=dynamic, quant_format=getattr(args, "quant_format", "qdq"),
                          calibration=getattr(args, "calibration", "minmax"),
                          per_channel=not getattr(args, "per_tensor", False),
                          reduce_range=not getattr(args, "full_range", False),
                          activation_signed=getattr(args, "signed_activations", False),
                          attention=getattr(args, "int8_attention", False),
                          sensitivity=getattr(args, "int8_sensitivity", None))

    @classmethod
    def from_args(cls, args: Any) -> Int8Pass:
        calib, data = getattr(args, "calib", None), getattr(args, "data", None)
        if calib is None and data is None:
            raise ParameterError("--precision int8 needs calibration inputs: --calib X.npz (decoder inputs) or "
                                 "--data DIR (a dataset, whole-model exports); or use --precision int8-dynamic")
        if calib is not None and data is not None:
            raise ParameterError("give either --calib X.npz or --data DIR for int8 calibration, not both")
        return cls(cls.config_from_args(args, dynamic=False), calib=calib, data=data)

    def apply(self, working: Any, structure: Any) -> None:
        model = working.proto()
        given = self.calib is not None or self.data is not None
        measured = not self.config.dynamic or (self.config.sensitivity is not None and given)
        feeds = self.feeds if self.feeds is not None else (
            calibration_feeds(model, self.calib, self.data) if measured else None)
        quantized, kept = quantize_int8(model, self.config, feeds)
        working.replace(quantized)
        log.info("%s", summary(kept, self.config, quantized, len(feeds or ())))
        for k in kept:
            log.debug("  float: %s (%s): %s", k.name, k.op_type, k.reason)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config.describe()})"


class Int8DynamicPass(Int8Pass):
    """``--precision int8-dynamic``: int8 weights, activation scales computed per run; no calibration."""

    name = "int8-dynamic"
    needs_calibration = False
    help = "int8 MatMul/Gemm weights, activations quantized at run time (no calibration); same float nodes as int8"

    def __init__(self, config: Int8Config = replace(DEFAULT_CONFIG, dynamic=True), calib: str | None = None,
                 data: str | None = None) -> None:
        super().__init__(config, calib=calib, data=data)

    @classmethod
    def add_arguments(cls, group: Any) -> None:
        """Shares --per-tensor / --full-range with int8 (defined there)."""

    @classmethod
    def from_args(cls, args: Any) -> Int8DynamicPass:
        """--calib/--data only feed --int8-sensitivity's probes here (the rewrite refuses them otherwise)."""
        config = cls.config_from_args(args, dynamic=True)
        calib, data = getattr(args, "calib", None), getattr(args, "data", None)
        if config.sensitivity is not None and (calib is None) == (data is None):
            raise ParameterError(SENSITIVITY_NEEDS_INPUTS)
        return cls(config, calib=calib, data=data)
