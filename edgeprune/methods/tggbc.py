"""tgGBC: trim keys gradually, guided by classification scores (zero-shot, at runtime).

Pure functions, following ``shared/docs/methods.md``. Between decoder layers ``l`` and
``l+1`` the head asks :func:`keep_indices` which image tokens (keys) survive, then gathers
memory, key position and key padding mask with :func:`gather_keys`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgeprune.errors import ParameterError

if TYPE_CHECKING:                      # torch is imported where tensors are used, so the
    from torch import Tensor           # config and schedule serve torch-free rewrite installs

    from edgeprune.models.decoder import LayerKeys

CLASS_REDUCTIONS = ("max", "mean", "min")


@dataclass(frozen=True)
class TgGBCConfig:
    """Parameters with the paper's names.

    r: keys pruned in total; n: number of pruning layers; k: top queries by class score
    used for importance (0 = all). ``use_class_score=False`` and ``class_reduce`` are the
    paper's ablations (importance from attention alone; mean/min over classes).
    """

    r: int
    n: int = 1
    k: int = 0
    use_class_score: bool = True
    class_reduce: str = "max"

    def validate(self, num_keys: int, num_layers: int, num_queries: int) -> None:
        """Raise ParameterError for values the method cannot run with."""
        if self.r < 0 or self.n < 0 or self.k < 0:
            raise ParameterError(f"r, n and k must be >= 0 (got r={self.r}, n={self.n}, k={self.k})")
        if self.enabled and self.r >= num_keys:
            raise ParameterError(f"r={self.r} must be smaller than the number of keys ({num_keys})")
        check_pruning_layers(self.r, self.n, num_layers)
        if self.k > num_queries:
            raise ParameterError(f"k={self.k} exceeds the number of queries ({num_queries}); use k=0 for all")
        if self.class_reduce not in CLASS_REDUCTIONS:
            raise ParameterError(f"class_reduce={self.class_reduce!r}; choose one of {CLASS_REDUCTIONS}")

    @property
    def enabled(self) -> bool:
        return self.r > 0 and self.n > 0

    # -- the head's KeyReduction protocol (edgeprune.models.decoder) --
    def layer_schedule(self, num_keys: int, num_layers: int, num_queries: int) -> list[int]:
        self.validate(num_keys, num_layers, num_queries)
        return schedule(self.r, self.n, num_layers)

    def reduce(self, keys: "LayerKeys", amount: int, layer: object, logits: "Tensor",
               probs: "Tensor") -> "LayerKeys":
        """Keep the ``Nk - amount`` most important keys; gather memory, key_pos and mask."""
        keep = keep_indices(logits, probs, amount, self.k, use_class_score=self.use_class_score,
                            class_reduce=self.class_reduce)                   # [B, Nk - amount]
        return kept_keys(keys, keep)


def check_pruning_layers(r: int, n: int, num_layers: int) -> None:
    """Refuse a schedule that would silently prune less than asked.

    Keys pruned after layer ``l`` feed layers ``l+1 ...``: the last layer has no later layer,
    so ``n`` must stay below the number of layers (a 1-layer decoder cannot prune at all).
    Pruning after the last layer used to be dropped without a word, and FLOPs went up.
    """
    if n > num_layers:
        raise ParameterError(f"n={n} exceeds the number of decoder layers ({num_layers}); "
                             f"{_valid_n(num_layers)}")
    if r > 0 and n > 0 and n == num_layers:
        raise ParameterError(f"n={n} equals the number of decoder layers: the last layer has no later layer to "
                             f"feed fewer keys; {_valid_n(num_layers)}")


def _valid_n(num_layers: int) -> str:
    if num_layers < 2:
        return f"this model has {num_layers} decoder layer: nothing can be pruned (use r=0)"
    return f"n must be in [1, {num_layers - 1}] for this model ({num_layers} layers)"


def schedule(r: int, n: int, num_layers: int) -> list[int]:
    """Keys pruned after each layer: ``r // n`` (made even), the remainder on layer n-1.

    >>> schedule(9002, 2, 6)
    [4500, 4502, 0, 0, 0, 0]
    """
    if r <= 0 or n <= 0:
        return [0] * num_layers
    if n > num_layers:
        raise ParameterError(f"n={n} exceeds the number of decoder layers ({num_layers})")
    per_layer = r // n
    if per_layer % 2 == 1:
        per_layer -= 1
    return [per_layer] * (n - 1) + [r - (n - 1) * per_layer] + [0] * (num_layers - n)


def query_confidence(logits: Tensor, class_reduce: str = "max") -> Tensor:
    """Class logits [B, Nq, C] -> sigmoid of the max (or mean/min) over C: [B, Nq]."""
    if class_reduce == "max":
        reduced = logits.max(dim=-1).values
    elif class_reduce == "mean":
        reduced = logits.mean(dim=-1)
    elif class_reduce == "min":
        reduced = logits.min(dim=-1).values
    else:
        raise ParameterError(f"class_reduce={class_reduce!r}; choose one of {CLASS_REDUCTIONS}")
    return reduced.sigmoid()


def key_importance(logits: Tensor, attn: Tensor, k: int = 0, *, use_class_score: bool = True,
                   class_reduce: str = "max") -> Tensor:
    """Importance of every key: ``S_j = sum_i A[i, j] * c_i`` over the top-k queries.

    logits [B, Nq, C]; attn [B, Nq, Nk] (head-averaged softmax probs) -> S [B, Nk].
    Queries are chosen by ``c`` even when ``use_class_score`` is off (then c_i = 1 in the sum).
    """
    import torch

    conf = query_confidence(logits, class_reduce)                        # [B, Nq]
    weight = conf if use_class_score else torch.ones_like(conf)
    if k > 0:
        top = conf.topk(k, dim=1).indices                                 # [B, k]
        weight = weight.gather(1, top)                                    # [B, k]
        attn = attn.gather(1, top[:, :, None].expand(-1, -1, attn.shape[2]))  # [B, k, Nk]
    return torch.einsum("bq,bqk->bk", weight, attn)                       # [B, Nk]


def keep_indices(logits: Tensor, attn: Tensor, num_drop: int, k: int = 0, *,
                 use_class_score: bool = True, class_reduce: str = "max") -> Tensor:
    """Indices of the ``Nk - num_drop`` most important keys, ascending importance: [B, Nk - r].

    attn may be per-head [B, h, Nq, Nk] (averaged here) or already averaged [B, Nq, Nk].
    """
    if attn.dim() == 4:
        attn = attn.mean(dim=1)                                           # [B, Nq, Nk]
    score = key_importance(logits, attn, k, use_class_score=use_class_score, class_reduce=class_reduce)
    return score.argsort(dim=1)[:, num_drop:]                             # [B, Nk - r]


def kept_keys(keys: "LayerKeys", keep: Tensor) -> "LayerKeys":
    """The keys at ``keep`` [B, K]: memory, key position, mask and merge sizes gathered alike, so
    any key reduction that picks indices (tgGBC, a random or a fixed subset) hands on the same."""
    return type(keys)(gather_keys(keys.memory, keep), gather_keys(keys.key_pos, keep),
                      gather_keys(keys.mask, keep), gather_keys(keys.size, keep), keep=keep)


def gather_keys(tensor: Tensor | None, indices: Tensor) -> Tensor | None:
    """Gather along the key axis (1) per batch element: [B, Nk, ...] x [B, K] -> [B, K, ...]."""
    if tensor is None:
        return None
    index = indices.reshape(indices.shape + (1,) * (tensor.dim() - 2))
    return tensor.gather(1, index.expand(indices.shape + tensor.shape[2:]))
