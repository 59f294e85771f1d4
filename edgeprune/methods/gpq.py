"""GPQ: gradually pruning queries during fine-tuning, and a one-shot calibration ranking.

Score of a query = the last decoder layer's class logits, max over classes, mean over the
batch (no sigmoid). The pruner keeps a record of scores per iteration; every ``interval``
iterations it averages the record, removes the single query with the lowest average and
resets the record (``shared/docs/methods.md``). Indices are always in the ORIGINAL query
numbering, so they can be handed to ``PETRHead.select_queries`` or to the ONNX GPQ pass.

Usage in any training loop::

    pruner = GPQPruner(num_queries=900, num_to_prune=600, interval=iters_per_epoch * 6 // 600)
    for batch in loader:
        out = model.head(..., query_indices=pruner.kept_indices)   # pruned queries vanish
        loss(out).backward(); optimizer.step()
        pruner.record(out.layer_logits[-1].detach())               # [B, Nq_kept, C]
        pruner.step()                                              # drops one every interval
    small_head = pruner.prune_model(model.head)
    # for an exported graph: edgeprune.passes.queries.gpq.save_keep_indices("kept.json", pruner.kept_indices)
    # then: edgeprune rewrite d.onnx -o small.onnx --method gpq --keep-indices kept.json
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterable

from edgeprune.errors import ParameterError

if TYPE_CHECKING:                      # torch is imported where tensors are used, so one-shot
    import torch                       # ranking of ONNX graphs works on torch-free installs
    from torch import Tensor

log = logging.getLogger(__name__)

ONE_SHOT_WARNING = ("one-shot query ranking from calibration data: the GPQ paper shows gradual "
                    "pruning with fine-tuning recovers accuracy clearly better than pruning at once")


def query_scores(last_logits: Tensor) -> Tensor:
    """Last layer's class logits [B, Nq, C] -> one score per query [Nq] (max over C, mean over B)."""
    return last_logits.max(dim=-1).values.mean(dim=0)


def reference_interval(iters_per_epoch: int, num_to_prune: int, prune_epochs: int = 6) -> int:
    """The reference schedule: prune over the first ``prune_epochs`` epochs."""
    if num_to_prune <= 0:
        raise ParameterError(f"num_to_prune must be > 0 (got {num_to_prune})")
    return max(1, iters_per_epoch * prune_epochs // num_to_prune)


class GPQPruner:
    """Tracks query scores and removes the lowest-scoring query every ``interval`` steps."""

    def __init__(self, num_queries: int, num_to_prune: int, interval: int) -> None:
        if not 0 < num_to_prune < num_queries:
            raise ParameterError(f"num_to_prune must be in (0, {num_queries}) (got {num_to_prune})")
        if interval < 1:
            raise ParameterError(f"interval must be >= 1 (got {interval})")
        self.num_queries, self.num_to_prune, self.interval = num_queries, num_to_prune, interval
        self._kept: list[int] = list(range(num_queries))
        self._record: list[Tensor] = []
        self.removed: list[int] = []          # original indices, in the order they were removed

    @property
    def kept_indices(self) -> list[int]:
        """Original indices of the queries still alive, ascending."""
        return list(self._kept)

    @property
    def finished(self) -> bool:
        return len(self.removed) >= self.num_to_prune

    def restore(self, kept: Iterable[int], removed: Iterable[int]) -> None:
        """Continue a saved run: its kept and removed queries (the score record starts afresh)."""
        self._kept, self.removed = [int(i) for i in kept], [int(i) for i in removed]
        self._record = []

    def record(self, last_logits: Tensor) -> None:
        """Append this iteration's scores; ``last_logits`` covers the kept queries only."""
        if last_logits.shape[-2] != len(self._kept):
            raise ParameterError(f"logits carry {last_logits.shape[-2]} queries but {len(self._kept)} are kept; "
                                 "run the model with query_indices=pruner.kept_indices")
        self._record.append(query_scores(last_logits.detach().float()))

    def step(self) -> int | None:
        """Call once per iteration after ``record``; returns the original index removed, if any."""
        if self.finished or len(self._record) < self.interval:
            return None
        import torch

        mean = torch.stack(self._record).mean(dim=0)                             # [Nq_kept]
        victim = self._kept.pop(int(mean.argmin()))
        self.removed.append(victim)
        self._record.clear()
        log.debug("GPQ removed query %d (%d left)", victim, len(self._kept))
        return victim

    def prune_model(self, head: "torch.nn.Module") -> "torch.nn.Module":
        """A smaller head with only the kept queries (``PETRHead.select_queries``)."""
        return head.select_queries(self._kept)  # type: ignore[operator]


def rank_queries_one_shot(batches: Iterable[Tensor], keep: int) -> list[int]:
    """Keep the ``keep`` queries with the highest mean score over calibration batches.

    ``batches`` yields last-layer logits [B, Nq, C]. Quick experiments only (see warning).
    """
    import torch

    log.warning(ONE_SHOT_WARNING)
    scores = [query_scores(b.detach().float()) for b in batches]
    if not scores:
        raise ParameterError("no calibration batches given")
    mean = torch.stack(scores).mean(dim=0)
    if not 0 < keep <= mean.numel():
        raise ParameterError(f"keep must be in [1, {mean.numel()}] (got {keep})")
    return sorted(int(i) for i in mean.topk(keep).indices)
