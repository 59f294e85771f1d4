"""Where GPQ's kept queries come from: keep-index files, calibration inputs, one-shot ranking.

The graph shrink (:mod:`edgeprune.passes.queries.gpq`) takes the ORIGINAL indices of the queries to
keep. They come either from the torch ``GPQPruner`` (``pruner.kept_indices``, written with
:func:`save_keep_indices`, read back by :func:`load_keep_indices`: ``--keep-indices FILE``),
or from a one-shot ranking of the graph's own class scores on calibration inputs, run in
ONNX Runtime (:func:`load_calibration` + :func:`rank_queries_one_shot`: ``--keep-queries K
--calib X.npz``). ``edgeprune.passes.queries.gpq`` re-exports these names.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from edgeprune import _lazy
from edgeprune.errors import InvalidModelError, ModelNotFoundError, ParameterError
from edgeprune.graph.files import needs_external_data
from edgeprune.graph.run import cpu_session
from edgeprune.passes.queries.space import OUTPUT_NAMES, QuerySpace, io_shape, resolve_query_space


log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- files
def save_keep_indices(path: str | os.PathLike, indices: Sequence[int]) -> Path:
    """Write kept ORIGINAL query indices as ``.npy`` (int64) or JSON (any other suffix), atomically."""
    from edgeprune.io import atomic_path
    values = sorted(int(i) for i in indices)
    target = Path(path)
    with atomic_path(target, suffix=target.suffix) as tmp:
        if target.suffix == ".npy":
            with open(tmp, "wb") as fh:
                np.save(fh, np.asarray(values, dtype=np.int64))
        else:
            tmp.write_text(json.dumps(values) + "\n")
    return target


def load_keep_indices(path: str | os.PathLike) -> list[int]:
    """Read a JSON list or a 1-D integer ``.npy`` of kept query indices (original numbering)."""
    source = Path(path)
    if not source.is_file():
        raise ModelNotFoundError(f"keep-indices file {source} does not exist; write it with "
                                 "edgeprune.passes.queries.gpq.save_keep_indices(path, pruner.kept_indices)")
    try:
        if source.suffix == ".npy":
            raw = np.load(source, allow_pickle=False)
        else:
            raw = np.asarray(json.loads(source.read_text()))
    except (ValueError, OSError) as exc:
        raise ParameterError(f"cannot read keep-indices file {source} ({exc}); expected a JSON list of "
                             "integers or a 1-D integer .npy") from exc
    if raw.ndim != 1 or raw.size == 0 or not np.issubdtype(raw.dtype, np.integer):
        raise ParameterError(f"keep-indices file {source} must hold a non-empty 1-D list of integers "
                             f"(got {raw.dtype} array of shape {list(raw.shape)})")
    return [int(i) for i in raw]


def load_calibration(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Arrays of an ``.npz`` by input name (finite; see :func:`edgeprune.io.read_npz`)."""
    from edgeprune.io import read_npz

    return read_npz(path, "calibration file", "give an .npz with one array per model input "
                    "([B, ...] or [S, B, ...])")


# ----------------------------------------------------------------------------- one-shot ranking in ORT
def _session(model: Any) -> Any:
    """An ORT CPU session on an in-memory model."""
    if needs_external_data(model):
        raise ParameterError("the model is too large (> 2 GB) to run in memory for GPQ calibration; "
                             "rank the queries with the torch GPQPruner and pass --keep-indices")
    return cpu_session(model)


def _graph_feeds(model: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Graph inputs that are not initializers: name -> (static shape, numpy dtype)."""
    onnx = _lazy.require("onnx")
    inits = {t.name for t in model.graph.initializer}
    return {vi.name: (io_shape(model, vi.name) or (),
                      onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
            for vi in model.graph.input if vi.name not in inits}


def calibration_samples(model: Any, calib: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Split calibration arrays into feeds: each array is one input ``[B, ...]`` or ``[S, B, ...]``."""
    declared = _graph_feeds(model)
    missing, extra = sorted(set(declared) - set(calib)), sorted(set(calib) - set(declared))
    if missing or extra:
        wanted = ", ".join(f"{n} {list(s)}" for n, (s, _) in declared.items())
        raise ParameterError(f"calibration inputs must name exactly the model inputs ({wanted}); "
                             f"missing {missing}, unknown {extra}")
    counts = {}
    for name, (shape, _) in declared.items():
        arr_shape = tuple(np.shape(calib[name]))
        if arr_shape == shape:
            counts[name] = 0
        elif arr_shape[1:] == shape and arr_shape[0] > 0:
            counts[name] = arr_shape[0]
        else:
            raise ParameterError(f"calibration array {name!r} has shape {list(arr_shape)}; the model takes "
                                 f"{list(shape)} (one sample) or [S, {', '.join(map(str, shape))}] (S samples)")
    num = set(counts.values()) - {0}
    if len(num) > 1:
        raise ParameterError(f"calibration arrays disagree on the number of samples: {counts}")
    total = num.pop() if num else 1
    return [{name: np.asarray(calib[name] if counts[name] == 0 else calib[name][i]).astype(dtype, copy=False)
             for name, (_, dtype) in declared.items()} for i in range(total)]


def query_scores_onnx(model: Any, calib: Mapping[str, np.ndarray]) -> np.ndarray:
    """GPQ's query score on calibration inputs, computed by running the graph in ONNX Runtime.

    Score = the last layer's class logits (``all_cls_scores[-1]``, [B, Nq, C]) max over classes,
    mean over the batch and over the calibration samples (``edgeprune.methods.gpq.query_scores``).
    Returns [Nq] float64.
    """
    if io_shape(model, OUTPUT_NAMES[0]) is None:
        raise InvalidModelError(f"one-shot ranking reads the output {OUTPUT_NAMES[0]!r} [L, B, Nq, C], which this "
                                "graph does not have; rank with the torch GPQPruner and pass --keep-indices")
    sess = _session(model)
    scores = []
    for feed in calibration_samples(model, calib):
        last = sess.run([OUTPUT_NAMES[0]], feed)[0][-1]                         # [B, Nq, C]
        scores.append(last.astype(np.float64).max(axis=-1).mean(axis=0))        # [Nq]
    return np.mean(scores, axis=0)


def rank_queries_one_shot(model: Any, calib: Mapping[str, np.ndarray], keep: int,
                          space: QuerySpace | None = None) -> list[int]:
    """Keep the ``keep`` queries with the highest calibration score; ORIGINAL indices, ascending.

    Logs ``edgeprune.methods.gpq.ONE_SHOT_WARNING``: fine-tuning with GPQPruner is better.
    """
    from edgeprune.methods.gpq import ONE_SHOT_WARNING

    space = space or resolve_query_space(model)
    if not 0 < keep <= space.num_queries:
        raise ParameterError(f"--keep-queries must be in [1, {space.num_queries}] for this graph "
                             f"({space.num_queries} queries); got {keep}")
    log.warning("%s", ONE_SHOT_WARNING)
    scores = query_scores_onnx(model, calib)
    order = np.argsort(-scores, kind="stable")[:keep]
    return sorted(int(i) for i in order)
