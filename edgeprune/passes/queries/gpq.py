"""GPQ as a graph pass: shrink a static decoder graph to a subset of its queries.

Given the ORIGINAL indices of the queries to keep (``GPQPruner.kept_indices``, or a one-shot
ranking on calibration inputs), the pass

1. labels every axis that runs over queries (:mod:`edgeprune.passes.queries.axes`);
2. slices every per-query constant along that axis (reference points ``[Nl, 3]``, folded
   query embeddings ``[B, Nq, E]``, zero targets, ...);
3. rewrites the literal query counts of shape operands in place: Reshape targets
   (``[B, Nq, h, d]``, ``[Nq*B, E]``, StreamPETR's ``[B, Nq + M, h, d]``), Expand/Tile
   shapes, ConstantOfShape shapes, Slice bounds and Split sizes;
4. shrinks graph inputs/outputs that carry queries (StreamPETR's ``prev_query [B, P, E]`` and
   ``prev_ref [B, P, 3]`` now hold the kept propagated queries, ascending), drops stale
   ``value_info``, re-infers shapes and checks that every tensor got exactly its predicted
   shape and that no unexplained axis of the old query count remains.

The op list is unchanged: only constants and shapes change, so the result computes exactly
``head(..., query_indices=kept)`` (= ``head.select_queries(kept)``) with a smaller static graph.
Modules: ``space`` (query numbering and analysis seeds), ``axes`` (the query-axis analysis),
``edits`` (planning and applying constant edits), ``shrink`` (the checked shrink), ``inputs``
(keep-index files, calibration inputs, the one-shot ranking) and this file, the registered
pass, which re-exports the public names.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np

from edgeprune.errors import ParameterError
# The pass's public API: where the kept indices come from, and the shrink itself.
from edgeprune.passes.queries.inputs import (OUTPUT_NAMES, calibration_samples, io_shape, load_calibration,  # noqa: F401
                                             load_keep_indices, query_scores_onnx, rank_queries_one_shot,
                                             save_keep_indices)
from edgeprune.passes.queries.shrink import ShrinkReport, shrink_queries  # noqa: F401
from edgeprune.passes.queries.space import PROPAGATED_INPUTS, QuerySpace, resolve_query_space  # noqa: F401
from edgeprune.passes.registry import BasePass

__all__ = ["OUTPUT_NAMES", "PROPAGATED_INPUTS", "QueryPruningPass", "QuerySpace", "ShrinkReport", "calibration_samples",
           "io_shape", "load_calibration", "load_keep_indices", "query_scores_onnx", "rank_queries_one_shot",
           "resolve_query_space", "save_keep_indices", "shrink_queries"]

log = logging.getLogger(__name__)


class QueryPruningPass(BasePass):
    """``--method gpq``: shrink the graph to the kept queries (see the module docstring)."""

    name = "gpq"
    help = ("GPQ: keep only some queries (--keep-indices FILE from GPQPruner, or one-shot --keep-queries K "
            "--calib X.npz); the result is a smaller static graph")
    requires: frozenset = frozenset()

    def __init__(self, keep_indices: Sequence[int] | None = None, keep_queries: int | None = None,
                 calib: Mapping[str, np.ndarray] | None = None) -> None:
        if (keep_indices is None) == (keep_queries is None):
            raise ParameterError("--method gpq needs either --keep-indices FILE or --keep-queries K --calib X.npz")
        if keep_queries is not None and calib is None:
            raise ParameterError("--keep-queries K needs --calib X.npz (inputs to rank the queries on, "
                                 "[B, ...] or [S, B, ...] per model input)")
        if keep_queries is not None and keep_queries < 1:
            raise ParameterError(f"--keep-queries must be >= 1 (got {keep_queries})")
        self.keep_indices = None if keep_indices is None else tuple(int(i) for i in keep_indices)
        self.keep_queries, self.calib = keep_queries, calib

    @classmethod
    def add_arguments(cls, group: Any) -> None:
        group.add_argument("--keep-indices", dest="keep_indices", default=None, metavar="FILE",
                           help="GPQ: ORIGINAL indices of the queries to keep (JSON list or .npy), "
                                "e.g. GPQPruner.kept_indices saved with edgeprune.passes.queries.gpq.save_keep_indices")
        group.add_argument("--keep-queries", dest="keep_queries", type=int, default=None, metavar="K",
                           help="GPQ one-shot: keep the K queries scoring highest on --calib (fine-tuning with "
                                "GPQPruner recovers accuracy clearly better)")

    @classmethod
    def from_args(cls, args: Any) -> QueryPruningPass:
        path, k, calib = getattr(args, "keep_indices", None), getattr(args, "keep_queries", None), \
            getattr(args, "calib", None)
        if path is not None and k is not None:
            raise ParameterError("give either --keep-indices FILE or --keep-queries K --calib X.npz, not both")
        # --calib (defined by the CLI) also calibrates --precision int8; GPQ reads it only with --keep-queries
        return cls(keep_indices=load_keep_indices(path) if path is not None else None, keep_queries=k,
                   calib=load_calibration(calib) if calib is not None and k is not None else None)

    def prepare(self, model: Any) -> Any:
        """Fold target shapes computed from ``Shape`` ops into constants (TorchScript's
        ``nn.MultiheadAttention`` with ``batch_first``, exports with symbolic sizes once the inputs
        are fixed): the query-axis analysis slices literal shapes only."""
        from edgeprune.graph.edit import fold_computed_sizes

        fold_computed_sizes(model)
        return model

    def apply(self, working: Any, structure: Any) -> None:
        from edgeprune.passes.queries.folded import check_first_self_attention

        model = working.proto()
        if structure is not None:
            check_first_self_attention(model, structure)
        space = resolve_query_space(model, structure)
        kept = self.keep_indices
        if kept is None:
            assert self.keep_queries is not None and self.calib is not None
            kept = tuple(rank_queries_one_shot(model, self.calib, self.keep_queries, space))
        small, _ = shrink_queries(model, kept, space)
        working.replace(small)

    def __repr__(self) -> str:
        how = f"{len(self.keep_indices)} indices" if self.keep_indices is not None else f"top {self.keep_queries}"
        return f"QueryPruningPass({how})"
