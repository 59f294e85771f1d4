"""``rewrite``: load, discover, apply passes, clean up, check, verify, save atomically.

Pass order: each pass's ``prepare`` (graph normalizations, before discovery), then the method
passes in the order given, then the precision conversion (fp16 must see the final graph so
that it keeps the inserted scoring subgraphs in fp32). A pass that needs decoder parts after
an earlier pass changed the graph gets a fresh discovery.

Failure anywhere leaves no output file: the model is written to a temporary file beside the
target, checked (onnx.checker, ORT load, verification run) there, and renamed at the end.
The output keeps the ``edgeprune.decoder_map`` record (a pass that changes what it records,
such as GPQ's query count, updates it; discovery ignores a record naming tensors the graph no
longer has, or whose query count disagrees with the graph) and appends the passes applied to
``edgeprune.rewrite``.

Given inputs (``--inputs``) also fix the sizes of symbolic graph inputs before discovery: the
passes build static graphs (tgGBC's reshapes carry the batch), so the result is for those sizes.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from edgeprune import _lazy
from edgeprune.errors import InternalError
from edgeprune.graph.edit import WorkingModel
from edgeprune.graph.files import load_model, save_onnx
from edgeprune.graph.shapes import pin_input_shapes
from edgeprune.graph.values import initializer_nbytes
from edgeprune.io import atomic_path, check_writable, write_target
from edgeprune.passes.discovery.discover import discover
from edgeprune.passes.discovery.guidance import require_parts
from edgeprune.passes.discovery.overrides import Overrides, parse_overrides
from edgeprune.passes.registry import get_precision
from edgeprune.passes.discovery.structure import DecoderStructure
from edgeprune.passes.verify import VerifyReport, compare_models

log = logging.getLogger(__name__)

REWRITE_KEY = "edgeprune.rewrite"


@dataclass(frozen=True)
class RewriteReport:
    """What one rewrite did; ``verification`` is None with ``verify=False``."""

    input_path: str
    output_path: str
    passes: tuple[str, ...]
    precision: str
    structure: DecoderStructure          # discovered on the input model
    nodes_before: int
    nodes_after: int
    bytes_before: int
    bytes_after: int
    seconds: float
    verification: VerifyReport | None = None
    external_data: str | None = None  # name of the external data file, if one was written
    notes: tuple[str, ...] = field(default_factory=tuple)

    def lines(self) -> list[str]:
        s = self.structure
        out = [f"rewrote {self.input_path} -> {self.output_path} ({', '.join(self.passes) or 'no pass'}, "
               f"{self.precision}) in {self.seconds:.2f} s",
               f"decoder ({s.source}): {s.num_layers} layers, {s.num_queries} queries, {s.num_keys} keys, "
               f"{s.num_heads} heads, batch {s.batch}",
               f"nodes {self.nodes_before} -> {self.nodes_after}, weights {self.bytes_before / 1e6:.1f} MB -> "
               f"{self.bytes_after / 1e6:.1f} MB"]
        if self.verification is not None:
            out.append(f"drift against the input model, inputs {self.verification.inputs}:")
            out += self.verification.lines()
        return out + [f"note: {n}" for n in self.notes]


def _record_rewrite(model: Any, passes: Sequence[str], precision: str) -> None:
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != REWRITE_KEY]
    previous = next((p.value for p in model.metadata_props if p.key == REWRITE_KEY), None)
    history = json.loads(previous) if previous else []
    history.append({"passes": list(passes), "precision": precision})
    del model.metadata_props[:]
    for key, value in kept + [(REWRITE_KEY, json.dumps(history))]:
        model.metadata_props.add(key=key, value=value)


def check_model(path: Path) -> None:
    """onnx.checker and an ORT session on the saved file; failures are our bugs (InternalError)."""
    onnx = _lazy.require("onnx")
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise InternalError(f"the rewritten model fails onnx.checker: {str(exc).splitlines()[0]}") from exc
    from edgeprune.graph.run import ort_errors
    from edgeprune.passes.verify import session

    try:
        session(path)
    except ort_errors() as exc:
        raise InternalError(f"ONNX Runtime cannot load the rewritten model: {str(exc).splitlines()[0]}") from exc


def refuse_reducing_twice(model: Any, chain: Sequence[Any], in_path: str | os.PathLike) -> None:
    """Refuse key reduction on a model whose keys a key-reduction pass already reduced.

    Discovery would read the inserted scoring/TopK/Gather subgraph as part of the decoder and
    the second rewrite ends in "Cycle detected" or out-of-range Gathers (a 600-line traceback).
    Known from the ``edgeprune.rewrite`` record or, when a tool dropped it, the node prefixes
    (``tggbc/``, ``tome/``).
    """
    from edgeprune.errors import ParameterError
    from edgeprune.passes import registry
    from edgeprune.passes.keys.feed import KeyReductionPass

    if not any(isinstance(p, KeyReductionPass) and p.config.enabled for p in chain):
        return
    reducing = [m for m in registry.method_names() if issubclass(registry.get_method(m), KeyReductionPass)]
    record = next((p.value for p in model.metadata_props if p.key == REWRITE_KEY), None)
    try:
        done = {name for entry in json.loads(record) for name in entry.get("passes", [])} if record else set()
    except (ValueError, TypeError, AttributeError):
        done = set()
    done = {m for m in reducing if m in done or any(n.name.startswith(f"{m}/") for n in model.graph.node)}
    if done:
        raise ParameterError(f"{in_path} is already key-reduced ({', '.join(sorted(done))}); reducing it again is "
                             "not supported: rewrite the original model with the total --r/--n you want")


# ------------------------------------------------------------------ passes
def _precision_pass(precision: str | Any) -> tuple[str, Any | None]:
    if not isinstance(precision, str):
        return precision.name, precision
    cls = get_precision(precision)
    return precision, (cls() if cls is not None else None)


def apply_passes(model: Any, chain: Sequence[Any], structure: DecoderStructure, ov: Overrides) -> Any:
    """Apply each pass to one working model, clean up and export once (onnx-graphsurgeon's design).

    Later passes that need decoder parts see a fresh discovery of the model as it is then.
    """
    working = WorkingModel(model)
    current = structure
    for i, p in enumerate(chain):
        if i > 0 and p.requires:
            current = discover(working.proto(), ov)
            require_parts(current, p.requires, f"--method {p.name}")
        started = time.perf_counter()
        p.apply(working, current)
        log.debug("pass %s: %.2f s", p.name, time.perf_counter() - started)
    return working.finish()


def rewrite(in_path: str | os.PathLike, out_path: str | os.PathLike, passes: Sequence[Any], *,
            overrides: Overrides | Mapping[str, str] | Sequence[str] | None = None,
            precision: str | Any = "fp32", verify: bool = True, seed: int = 0,
            verify_inputs: Mapping[str, Any] | None = None) -> RewriteReport:
    """Rewrite ``in_path`` with ``passes`` (+ the ``precision`` conversion) into ``out_path``."""
    started = time.perf_counter()
    target = check_writable(out_path)
    ov = parse_overrides(overrides)
    precision_name, precision_pass = _precision_pass(precision)
    chain = list(passes) + ([precision_pass] if precision_pass is not None else [])
    model = load_model(in_path)
    refuse_reducing_twice(model, chain, in_path)
    nodes_before, bytes_before = len(model.graph.node), initializer_nbytes(model)
    pinned = pin_input_shapes(model, {k: np.shape(v) for k, v in verify_inputs.items()}) if verify_inputs else []
    if pinned:
        log.info("inputs %s fixed to the sizes of the given arrays", ", ".join(pinned))
    for p in chain:
        model = p.prepare(model) if hasattr(p, "prepare") else model
    structure = discover(model, ov)
    if chain:
        require_parts(structure, chain[0].requires, f"--method {chain[0].name}")
    out = apply_passes(model, chain, structure, ov)
    names = tuple(p.name for p in passes)
    _record_rewrite(out, names, precision_name)
    external, report = _save_checked(out, target, in_path, verify, seed, verify_inputs)
    return RewriteReport(str(in_path), str(target), names, precision_name, structure, nodes_before,
                         len(out.graph.node), bytes_before, initializer_nbytes(out),
                         time.perf_counter() - started, report, external)


def _save_checked(model: Any, target: Path, in_path: str | os.PathLike, verify: bool, seed: int,
                  inputs: Mapping[str, Any] | None) -> tuple[str | None, VerifyReport | None]:
    """Save to a temporary file, check and verify it there, then rename onto ``target``."""
    external = None
    try:
        with atomic_path(target, suffix=".onnx") as tmp:
            external = save_onnx(model, tmp, target.name)
            check_model(tmp)
            report = compare_models(in_path, tmp, seed=seed, inputs=inputs) if verify else None
    except BaseException:
        if external is not None:
            (write_target(target).parent / external).unlink(missing_ok=True)
        raise
    return external, report
