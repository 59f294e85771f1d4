"""Running a model on ONNX Runtime's CPU provider, for the checks export and rewrite make.

One place that opens sessions, so every check agrees on how: CPU provider, quiet logging,
and (``optimize=False``) no graph optimizations, which compares two graphs as written rather
than as ORT's fusions rewrite them. Benchmarks do not come here: they run through
``edgeprune.runners`` with the options a board uses.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from edgeprune import _lazy

PROVIDER = "CPUExecutionProvider"


def cpu_session(model: str | os.PathLike | Any, *, optimize: bool = True) -> Any:
    """A CPU session for a file path (external data found beside it) or an in-memory ModelProto."""
    ort = _lazy.require("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=[PROVIDER])


def run_all(session: Any, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run every output of ``session`` on ``feeds`` -> ``{output name: array}``."""
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds))))


def ort_errors() -> tuple[type, ...]:
    """ONNX Runtime's exception types (they derive from Exception directly)."""
    state = _lazy.require("onnxruntime.capi.onnxruntime_pybind11_state")
    names = ("Fail", "InvalidGraph", "InvalidArgument", "NoSuchFile", "NoModel", "RuntimeException",
             "NotImplemented", "InvalidProtobuf", "EPFail")
    return tuple(getattr(state, n) for n in names if hasattr(state, n))
