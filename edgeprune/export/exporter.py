"""torch -> ONNX export that a user can trust: checked, simplified, structured, validated.

Steps of :func:`export_onnx`, all in a private staging directory next to the output so a
failure at any step leaves no output file (not even external data):

1. check options and the output path (before any long work);
2. export ``StructureCapture(model)`` with the TorchScript or dynamo exporter, static
   shapes, batch ``batch``: the model's outputs plus the decoder's internal tensors as extra
   outputs (see :mod:`edgeprune.export.capture`);
3. simplify with onnxsim while those extras are graph outputs, so their names survive;
4. demote the extras and record the decoder structure in ``metadata_props``
   (:mod:`edgeprune.export.decoder_map`);
5. save (external data beside the model when the weights exceed 2 GB), run
   ``onnx.checker``, load in ONNX Runtime, compare with PyTorch on seeded inputs;
6. move the files into place (:func:`edgeprune.io.atomic_path`).
"""
from __future__ import annotations

import collections
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeprune import _lazy
from edgeprune.errors import InternalError, ParameterError
from edgeprune.export import record
from edgeprune.export.decoder_map import DecoderMap, missing_tensors, read_decoder_map, write_decoder_map
from edgeprune.export.native_output import native_output_to_debug_log
from edgeprune.export.record import PlannedExtra
from edgeprune.export.simplify import simplify_model
from edgeprune.export.validate import (DEFAULT_TOLERANCE, ExportValidationError, ValidationReport,
                                       compare_outputs, ort_session)
from edgeprune.graph.files import needs_external_data, save_onnx
from edgeprune.graph.run import run_all
from edgeprune.graph.values import model_nbytes
from edgeprune.io import atomic_path, check_writable, write_target

log = logging.getLogger(__name__)

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}
# TorchScript stops at 20 in torch 2.13; dynamo's Split (num_outputs) needs 18.
OPSET_RANGE = {"torchscript": (7, 20), "dynamo": (18, 23)}


@dataclass(frozen=True)
class ExportOptions:
    """Checked export settings (see :func:`resolve_options`)."""

    exporter: str
    opset: int
    batch: int
    tolerance: float


def resolve_options(exporter: str = "torchscript", opset: int | None = None, batch: int = 1,
                    tolerance: float = DEFAULT_TOLERANCE) -> ExportOptions:
    """Validate settings before any work; every refusal says what to use instead."""
    if exporter not in EXPORTERS:
        raise ParameterError(f"unknown exporter {exporter!r}; choose one of: {', '.join(EXPORTERS)}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ParameterError(f"batch must be an integer >= 1 (got {batch!r}); use e.g. --batch 1")
    low, high = OPSET_RANGE[exporter]
    opset = DEFAULT_OPSET[exporter] if opset is None else opset
    if exporter == "dynamo" and opset < low:
        raise ParameterError(f"the dynamo exporter needs opset >= {low} (got {opset}): below 18 it writes "
                             f"Split with the opset-18 attribute num_outputs, an invalid model; "
                             f"use --opset {low} or --exporter torchscript")
    if not low <= opset <= high:
        raise ParameterError(f"opset {opset} is not supported by the {exporter} exporter; use {low}..{high}")
    if not tolerance > 0:
        raise ParameterError(f"tolerance must be > 0 (got {tolerance}); the default is {DEFAULT_TOLERANCE:g}")
    return ExportOptions(exporter, opset, batch, float(tolerance))


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and how it checked it."""

    path: Path
    exporter: str
    opset: int
    batch: int
    size_bytes: int                      # model file + external data
    external_data: Path | None           # the ``<name>.data`` file, if weights were stored outside
    num_nodes: int
    op_counts: tuple[tuple[str, int], ...]
    simplify_note: str
    decoder_map: DecoderMap | None
    validation: ValidationReport | None
    seconds: float
    phase_seconds: tuple[tuple[str, float], ...] = field(default=())

    def summary(self) -> str:
        """One line: path, size, op count, time."""
        ext = f" + external data {self.external_data.name}" if self.external_data else ""
        return (f"wrote {self.path} ({self.size_bytes / 1e6:.1f} MB{ext}, {self.num_nodes} ops, "
                f"{self.exporter} opset {self.opset}, batch {self.batch}) in {self.seconds:.1f} s")


def export_onnx(model: Any, path: str | os.PathLike, *, exporter: str = "torchscript", opset: int | None = None,
                batch: int = 1, seed: int = 0, simplify: bool = True, record_structure: bool = True,
                validate: bool = True, tolerance: float = DEFAULT_TOLERANCE,
                external_data: bool | None = None) -> ExportReport:
    """Export ``model`` to ``path`` and check it; see the module docstring for the steps.

    ``model`` follows :class:`edgeprune.models.exportable.ExportableModel`: ``forward(*inputs)``
    returns its outputs, ``example_inputs(batch, seed)`` gives named inputs, and
    ``output_names()`` names the outputs; ``.head`` (a PETRHead) enables the decoder map.
    The graph is traced on inputs of ``seed`` and validated on inputs of ``seed + 1``.
    ``external_data=None`` stores weights outside only above 2 GB. ``validate=False`` skips
    the comparison with torch (onnx.checker and the ONNX Runtime load still run).
    Raises ParameterError / OutputPathError before work, ExportValidationError on mismatch.
    """
    opts = resolve_options(exporter, opset, batch, tolerance)
    target = check_writable(path)
    started = time.perf_counter()
    phases: list[tuple[str, float]] = []
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=write_target(target).parent))
    try:
        staged, dmap, note, reference = _build_staged(model, target.name, staging, opts, seed, simplify,
                                                      record_structure, validate, external_data, phases)
        report = _check_staged(staged, reference, opts, phases)
        final_data = _commit(staged, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for module, training in modes:          # torch.onnx.export and eval() change modes
            module.training = training
    return _report(target, final_data, opts, note, dmap, report, time.perf_counter() - started, phases)


def _timed(phases: list[tuple[str, float]], name: str, started: float) -> None:
    phases.append((name, time.perf_counter() - started))


@dataclass(frozen=True)
class _Reference:
    """Validation inputs and the torch outputs on them (numpy)."""

    feeds: dict[str, Any]
    outputs: dict[str, Any]


def _trace(model: Any, staging: Path, opts: ExportOptions, seed: int, record_structure: bool,
           validate: bool, phases: list[tuple[str, float]]) -> tuple[Any, tuple[PlannedExtra, ...], _Reference | None]:
    """Plan the extras (one eager run, on the validation inputs so it doubles as the
    reference), then export. Returns (loaded ONNX model, plan, reference or None)."""
    torch = _lazy.require("torch")
    from edgeprune.export.capture import StructureCapture
    inputs = model.example_inputs(batch=opts.batch, seed=seed)
    check_inputs = model.example_inputs(batch=opts.batch, seed=seed + 1) if validate else inputs
    output_names = list(model.output_names())
    t0 = time.perf_counter()
    with StructureCapture(model) as wrapper:
        plan, outputs = wrapper.plan(check_inputs, output_names) if record_structure else ((), None)
        if validate and outputs is None:
            with torch.no_grad():
                outputs = model(*check_inputs.values())
        proto = _torch_export(torch, wrapper if plan else model, inputs, output_names, plan, staging, opts)
    _timed(phases, "torch reference + export", t0)
    reference = None
    if validate:
        reference = _Reference({n: t.detach().cpu().numpy() for n, t in check_inputs.items()},
                               {n: t.detach().cpu().numpy() for n, t in zip(output_names, outputs)})
    return proto, plan, reference


def _build_staged(model: Any, name: str, staging: Path, opts: ExportOptions, seed: int, simplify: bool,
                  record_structure: bool, validate: bool, external_data: bool | None,
                  phases: list[tuple[str, float]]) -> tuple[Path, DecoderMap | None, str, _Reference | None]:
    """Steps 2-4 and the save: returns (staged model path, decoder map, simplify note, reference)."""
    proto, plan, reference = _trace(model, staging, opts, seed, record_structure, validate, phases)
    t0 = time.perf_counter()
    size = model_nbytes(proto)
    result = simplify_model(proto, enabled=simplify, size_bytes=size)
    proto = result.model
    _timed(phases, "simplify", t0)
    dmap = None
    if plan:
        dmap = _record_structure(proto, plan, model, [i.name for i in proto.graph.input],
                                 list(model.output_names()), opts)
    staged = staging / name
    external = needs_external_data(proto) if external_data is None else external_data
    if external:
        log.info("saving the weights as external data in %s.data (protobuf files stop at 2 GB)", staged.name)
    save_onnx(proto, staged, external=external)
    return staged, dmap, result.note, reference


def _torch_export(torch: Any, module: Any, inputs: dict[str, Any], output_names: list[str],
                  plan: tuple[PlannedExtra, ...], staging: Path, opts: ExportOptions) -> Any:
    """Run torch.onnx.export into ``staging`` and load the result (with any external data)."""
    onnx = _lazy.require("onnx")
    if opts.exporter == "dynamo":
        _lazy.require("onnxscript")
    names = output_names + [p.name for p in plan if p.kind == "output"]
    raw = staging / "exported.onnx"
    log.info("exporting with the %s exporter (opset %d, batch %d, %d outputs)", opts.exporter, opts.opset,
             opts.batch, len(names))
    kwargs: dict[str, Any] = dict(input_names=list(inputs), output_names=names, opset_version=opts.opset)
    if opts.exporter == "dynamo":
        kwargs.update(dynamo=True, optimize=True, report=False, verify=False, artifacts_dir=str(staging))
    else:
        kwargs.update(dynamo=False, do_constant_folding=True)
    try:
        with native_output_to_debug_log(f"torch.onnx.export ({opts.exporter})"), torch.no_grad(), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.onnx.export(module, tuple(inputs.values()), str(raw), **kwargs)
    except Exception as exc:  # the exporters raise many unrelated types; keep the cause
        raise InternalError(f"torch.onnx.export with the {opts.exporter} exporter failed: "
                            f"{type(exc).__name__}: {exc}") from exc
    for warning in caught:   # TracerWarnings, deprecation notices: for -v, not for the user's screen
        log.debug("torch.onnx.export: %s: %s", warning.category.__name__, warning.message)
    return onnx.load(str(raw), load_external_data=True)


def _record_structure(proto: Any, plan: tuple[PlannedExtra, ...], model: Any, input_names: list[str],
                      output_names: list[str], opts: ExportOptions) -> DecoderMap | None:
    """Demote the extra outputs and write the decoder map into ``proto``."""
    from edgeprune.export.capture import describe_head
    exported = [p.name for p in plan if p.kind == "output"]
    resolved = record.demote_outputs(proto, exported)
    dmap = record.build_decoder_map(proto, plan, resolved, describe_head(model), input_names, output_names,
                                    opts.exporter, opts.batch)
    if dmap is None:
        return None
    missing = missing_tensors(proto, dmap)
    if missing:
        raise InternalError(f"decoder map names tensors the graph lacks: {missing}")
    write_decoder_map(proto, dmap)
    log.info("recorded decoder structure: %d layers, %d queries, %d keys%s", dmap.num_layers,
             dmap.num_queries, dmap.num_keys, "" if dmap.probs_present else " (attention probabilities absent)")
    return dmap


def _check_staged(staged: Path, reference: _Reference | None, opts: ExportOptions,
                  phases: list[tuple[str, float]]) -> ValidationReport | None:
    """onnx.checker, ONNX Runtime load, and (with a reference) the comparison with torch."""
    onnx = _lazy.require("onnx")
    t0 = time.perf_counter()
    try:
        onnx.checker.check_model(str(staged), full_check=True)
        session = ort_session(staged)
    except Exception as exc:  # checker and ORT raise their own exception types
        raise InternalError(f"the exported model is invalid ({type(exc).__name__}: {exc})") from exc
    log.info("onnx.checker passed; ONNX Runtime loaded the model")
    if reference is None:
        log.warning("not validating against torch (--no-validate)")
        return None
    report = compare_outputs(reference.outputs, run_all(session, reference.feeds), opts.tolerance)
    _timed(phases, "validate", t0)
    if not report.passed:
        raise ExportValidationError(report, "the exported model")
    return report


def _commit(staged: Path, target: Path) -> Path | None:
    """Move the staged model (and external data) onto ``target``; returns the data path."""
    data = staged.with_name(staged.name + ".data")
    final_data = None
    if data.exists():
        final_data = write_target(target).parent / data.name     # beside the file a symlink points to
        with atomic_path(final_data) as tmp:
            os.replace(data, tmp)
    with atomic_path(target) as tmp:
        os.replace(staged, tmp)
    return final_data


def _report(target: Path, data: Path | None, opts: ExportOptions, note: str, dmap: DecoderMap | None,
            validation: ValidationReport | None, seconds: float, phases: list[tuple[str, float]]) -> ExportReport:
    onnx = _lazy.require("onnx")
    saved = onnx.load(str(target), load_external_data=False)
    ops = collections.Counter(node.op_type for node in saved.graph.node)
    size = target.stat().st_size + (data.stat().st_size if data else 0)
    if dmap is not None and read_decoder_map(saved) != dmap:
        raise InternalError("the decoder map read back from the saved model differs from the one written")
    return ExportReport(target, opts.exporter, opts.opset, opts.batch, size, data, len(saved.graph.node),
                        tuple(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))), note, dmap, validation,
                        seconds, tuple(phases))
