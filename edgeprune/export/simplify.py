"""Graph simplification with onnxsim (constant folding, shape folding, dead-node removal).

onnxsim is an optional, host-only extra (no aarch64 wheels). When it is missing, or the
model is too large for it (it serialises the model into one protobuf, limited to 2 GB),
the export continues unsimplified with a logged warning and the report says why.
onnxsim's own random-input check is turned off: the exporter validates the final graph
against PyTorch, which is the stronger check.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from edgeprune import _lazy
from edgeprune.errors import InternalError
from edgeprune.export.native_output import native_output_to_debug_log
from edgeprune.graph.files import PROTOBUF_LIMIT

log = logging.getLogger(__name__)

# onnxsim hands the model to C++ as one serialised protobuf.
ONNXSIM_SIZE_LIMIT = PROTOBUF_LIMIT          # onnxsim serialises the whole model into one message


@dataclass(frozen=True)
class SimplifyResult:
    """The (possibly unchanged) model and what happened to it."""

    model: Any                 # onnx.ModelProto
    applied: bool
    note: str                  # "onnxsim: 412 -> 298 nodes" or why it was skipped
    nodes_before: int
    nodes_after: int


def _skip(model: Any, why: str, warn: bool) -> SimplifyResult:
    if warn:
        log.warning("not simplifying: %s", why)
    else:
        log.info("not simplifying: %s", why)
    n = len(model.graph.node)
    return SimplifyResult(model, False, f"skipped: {why}", n, n)


def simplify_model(model: Any, *, enabled: bool = True, size_bytes: int | None = None) -> SimplifyResult:
    """Run onnxsim on ``model`` (an ``onnx.ModelProto``) when enabled, installed and small enough.

    ``size_bytes`` is the model's weight size if the caller knows it (avoids re-measuring).
    Graph input and output names are preserved by onnxsim; intermediate names may change.
    """
    if not enabled:
        return _skip(model, "--no-simplify given", warn=False)
    if not _lazy.available("onnxsim"):
        return _skip(model, "onnxsim is not installed (pip install 'edgeprune[simplify]')", warn=True)
    size = size_bytes if size_bytes is not None else model.ByteSize()
    if size >= ONNXSIM_SIZE_LIMIT:
        return _skip(model, f"model is {size / 2**30:.2f} GiB; onnxsim cannot handle models over 2 GB", warn=True)
    onnxsim = _lazy.require("onnxsim")
    before = len(model.graph.node)
    try:
        with native_output_to_debug_log("onnxsim"):
            simplified, _ = onnxsim.simplify(model, check_n=0)
    except Exception as exc:  # onnxsim raises bare RuntimeErrors from C++; name the way out
        raise InternalError(f"onnxsim failed on the exported graph ({type(exc).__name__}: {exc}); "
                            "export again with --no-simplify and report this model") from exc
    after = len(simplified.graph.node)
    log.info("simplified with onnxsim: %d -> %d nodes", before, after)
    return SimplifyResult(simplified, True, f"onnxsim: {before} -> {after} nodes", before, after)
