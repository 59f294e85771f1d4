"""Running a model on ONNX Runtime's CPU provider, for the checks export and rewrite make.

One place that opens sessions, so every check agrees on how: CPU provider, quiet logging,
and (``optimize=False``) no graph optimizations, which compares two graphs as written rather
than as ORT's fusions rewrite them. Benchmarks do not come here: they run through
``edgeprune.runners`` with the options a board uses.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from edgeprune import _lazy
from edgeprune.errors import InvalidModelError

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


NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(bool)": np.bool_, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
               "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}


def _concrete(shape: Any) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else 1 for d in shape)   # a static 0 stays 0


def fits_declared(shape: tuple[int, ...], declared: Any) -> bool:
    """An array of ``shape`` may feed an input declared ``declared`` (symbolic dims take any size)."""
    return len(shape) == len(declared) and all(not isinstance(d, int) or d == s for s, d in zip(shape, declared))


def random_inputs(sess: Any, seed: int = 0, given: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Feeds for ``sess``: ``given`` arrays where their shape fits, seeded values otherwise.

    Float inputs ~ N(0, 1); bool inputs all False (a random padding mask could hide every key);
    integer inputs 0; symbolic dimensions 1.
    """
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for meta in sess.get_inputs():
        dtype = NUMPY_TYPES.get(meta.type)
        if dtype is None:
            raise InvalidModelError(f"input {meta.name!r} has type {meta.type}, which verification cannot "
                                    "generate; pass inputs with --inputs X.npz or use --no-verify")
        shape = _concrete(meta.shape)
        if given is not None and meta.name in given and fits_declared(given[meta.name].shape, meta.shape):
            feeds[meta.name] = np.asarray(given[meta.name]).astype(dtype, copy=False)
        elif np.issubdtype(dtype, np.floating):
            feeds[meta.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[meta.name] = np.zeros(shape, dtype=dtype)
    return feeds


def run_tensors(model: Any, names: Sequence[str], seed: int = 0) -> dict[str, np.ndarray]:
    """Values of the intermediate tensors ``names`` from one run on seeded inputs (``random_inputs``).

    The tensors become extra outputs of a copy; ``model`` is not changed.
    """
    onnx = _lazy.require("onnx")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    declared = {o.name for o in probe.graph.output}
    wanted = list(dict.fromkeys(names))
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in wanted if n not in declared)
    sess = cpu_session(probe, optimize=False)
    return dict(zip(wanted, sess.run(wanted, random_inputs(sess, seed))))


def run_shapes(model: Any, names: Sequence[str], seed: int = 0) -> dict[str, tuple[int, ...]]:
    """Shapes of the intermediate tensors ``names`` from one run on seeded inputs.

    For tensors static shape inference leaves symbolic although the graph's inputs are fixed
    (a size computed from data, an op inference does not know): the run gives their true sizes.
    """
    return {n: tuple(int(d) for d in a.shape) for n, a in run_tensors(model, names, seed).items()}
