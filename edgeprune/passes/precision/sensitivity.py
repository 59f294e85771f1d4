"""Which weight GEMMs int8 should leave float: each quantized alone, judged by the model's outputs.

Why: quantization error does not hurt every projection alike, and where it hurts depends on
what lies downstream, which no local error measure sees. On the trained demo detector,
int8-dynamic of all 96 weight GEMMs costs 5.4 mAP points (0.508 -> 0.454). Quantized alone,
layer 0's cross-attention key projection moves the class logits by 32 % of their range (its
input, memory + key position, spans +-170, and layer 0's attention is the sharp one that
finds objects); the next worst moves them by 3 %, the median by 0.25 %. Keeping that one node
float gives mAP 0.510. ``--int8-sensitivity TOL`` finds such nodes on the calibration inputs.

How: for every candidate GEMM (a weight GEMM not already kept float), quantize it alone and
everything else not at all, run the probe inputs, and take the largest
``max |out - ref| / (max - min of ref)`` over the float outputs. Nodes above the tolerance stay
float. Probes are always dynamic int8, whatever the final mode: one calibration per probe would
cost as much as the whole static run, so for static int8 (calibrated ranges, QOperator's
requantized outputs) the probe is an approximation. Cost: one quantization and up to
``MAX_PROBE_FEEDS`` runs per candidate (45 s for the demo's 96 on 2 cores).
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from edgeprune.graph.values import constant_names

log = logging.getLogger(__name__)

MAX_PROBE_FEEDS = 4            # probe inputs per candidate: the first few calibration feeds


@dataclass(frozen=True)
class Sensitivity:
    """How far quantizing ``name`` alone moved the model's outputs (fraction of their range)."""

    name: str
    op_type: str
    deviation: float


def candidates(graph: Any, op_types: Sequence[str], kept: set[str]) -> list[Any]:
    """The weight GEMMs: ``op_types`` nodes whose B input (the weight) is a constant."""
    constants = constant_names(graph)
    return [n for n in graph.node
            if n.op_type in op_types and n.name not in kept and len(n.input) > 1 and n.input[1] in constants]


def relative_deviation(got: Sequence[Mapping[str, np.ndarray]], ref: Sequence[Mapping[str, np.ndarray]]) -> float:
    """Largest ``max |got - ref| / (max - min of ref)`` over feeds and float outputs (finite values)."""
    worst = 0.0
    for g, r in zip(got, ref):
        for name, want in r.items():
            finite = np.isfinite(want) if np.issubdtype(want.dtype, np.floating) else None
            if finite is None or not finite.any():
                continue
            span = float(want[finite].max() - want[finite].min()) or 1.0
            diff = np.abs(g[name].astype(np.float64) - want)[finite]
            worst = max(worst, float(np.nan_to_num(diff, nan=np.inf).max()) / span)
    return worst


def probe(pre: Path, config: Any, kept: Sequence[str], feeds: Sequence[Mapping[str, Any]],
          quantize: Callable[[Path, Path, Any, list[str], Any], None]) -> list[Sensitivity]:
    """Quantize every candidate of the pre-processed model ``pre`` alone; how far each moved the outputs.

    ``config`` is the run's ``Int8Config``; ``quantize`` the int8 module's quantizer call (src,
    dst, config, exclude, feeds). Both come from the caller: this module does not import the
    int8 module, which imports it. Every other ``op_types`` node is excluded from a probe (with
    ``--int8-attention`` the attention products too), so a probe measures its node alone.
    """
    from edgeprune.graph.files import load_model
    from edgeprune.graph.run import cpu_session

    model = load_model(pre)
    todo = candidates(model.graph, config.op_types, set(kept))
    inputs = list(feeds)[:MAX_PROBE_FEEDS]
    reference = _run(cpu_session(model, optimize=True), inputs)
    probe_config = replace(config, dynamic=True, sensitivity=None)
    names = [n.name for n in model.graph.node if n.op_type in config.op_types]
    out: list[Sensitivity] = []
    log.info("int8 sensitivity: quantizing %d weight GEMMs one at a time on %d input(s)", len(todo), len(inputs))
    with tempfile.TemporaryDirectory(prefix="edgeprune-int8-probe-") as tmp:
        dst = Path(tmp) / "one.onnx"
        for i, node in enumerate(todo, 1):
            others = [n for n in names if n != node.name]
            quantize(pre, dst, probe_config, list(kept) + others, None)
            got = _run(cpu_session(load_model(dst), optimize=True), inputs)
            out.append(Sensitivity(node.name, node.op_type, relative_deviation(got, reference)))
            if i % max(1, len(todo) // 10) == 0 or i == len(todo):
                log.info("int8 sensitivity: %d/%d probed", i, len(todo))
    return out


def _run(sess: Any, feeds: Sequence[Mapping[str, Any]]) -> list[dict[str, np.ndarray]]:
    names = [o.name for o in sess.get_outputs()]
    return [dict(zip(names, sess.run(names, dict(f)))) for f in feeds]
