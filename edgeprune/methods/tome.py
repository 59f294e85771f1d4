"""ToMe (token merging, Bolya et al. 2023) applied to the image tokens (keys) of a decoder.

The baseline the tgGBC paper compares against: instead of dropping unimportant keys, merge
similar ones. ToMe's bipartite soft matching, adapted from the tokens of a ViT block to the
keys of a DETR decoder's cross-attention:

1. Metric: layer ``l``'s key-projection output ``K = (memory + key_pos) W_k^T + b_k``
   ``[B, Nk, h*d]``, averaged over the ``h`` heads -> ``[B, Nk, d]``, L2-normalised (ToMe
   uses the keys of the attention it just ran, averaged over heads, for the same reason:
   keys already summarise what attention matches on, and cost nothing extra). The ONNX pass
   reads the same tensor from the graph, so no projection is recomputed.
2. Split the keys alternately into set A (even positions) and set B (odd positions).
3. For every A key its most similar B key (cosine); the ``r`` A keys with the highest
   similarity are merged into their B match, the others stay.
4. Merge by size-weighted averaging (ToMe's ``merge_wavg``) of the memory AND the key
   position embedding, tracking how many original keys each merged key stands for.
   Output order: the kept A keys in their original order, then all B keys. (ToMe's code
   keeps A keys by decreasing similarity; that order decides the next layer's alternate
   split, so a 1e-7 rounding difference between two runtimes would change which keys are
   matched next. Position order depends only on WHICH keys merged.)

It runs between decoder layers with the tgGBC ``r`` schedule
(:func:`edgeprune.methods.tggbc.schedule`): after layer ``l`` the keys of layers
``l+1 ...`` shrink by ``r_l``. One matching can merge at most the ``ceil(Nk_l / 2)`` keys of
set A, so a schedule asking more of a layer is refused rather than silently clamped.

ToMe's proportional attention (adding ``log(size)`` to the attention scores of later layers)
is NOT applied: it needs a float bias inside every later cross-attention, which neither the
head's boolean key padding mask nor fused attention ops (``Attention``,
``com.microsoft.MultiHeadAttention``) can take without rewriting the op; sizes are returned
so a caller can add it. Masks are not supported (merging a padded key into a valid one would
leak the padding into the average): :func:`forward_with_tome` refuses a key padding mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeprune._lazy import require
from edgeprune.errors import ParameterError

if TYPE_CHECKING:                     # torch is imported lazily: the ONNX pass uses ToMeConfig without it
    from torch import Tensor

    from edgeprune.models.decoder import HeadOutput, LayerKeys, PETRHead


@dataclass(frozen=True)
class ToMeConfig:
    """``r`` keys merged away in total over ``n`` merging layers (tgGBC's schedule)."""

    r: int
    n: int = 1

    @property
    def enabled(self) -> bool:
        return self.r > 0 and self.n > 0

    # -- the head's KeyReduction protocol (edgeprune.models.decoder) --
    def layer_schedule(self, num_keys: int, num_layers: int, num_queries: int) -> list[int]:
        return self.validate(num_keys, num_layers)

    def reduce(self, keys: "LayerKeys", amount: int, layer: Any, logits: Tensor, probs: Tensor) -> "LayerKeys":
        """Merge ``amount`` keys by bipartite soft matching on this layer's key projection."""
        if keys.mask is not None:
            raise ParameterError("ToMe cannot merge keys under a key padding mask; drop the mask or use tgGBC")
        attn = layer.cross_attn
        e = attn.in_proj_weight.shape[1]
        metric = key_metric(keys.memory + keys.key_pos, attn.in_proj_weight[e:2 * e],
                            attn.in_proj_bias[e:2 * e], attn.num_heads)        # [B, Nk, d]
        size = keys.size if keys.size is not None else keys.memory.new_ones(*keys.memory.shape[:2], 1)
        memory, key_pos, size = merge_keys(keys.memory, keys.key_pos, size, metric, amount)
        return type(keys)(memory, key_pos, None, size, metric=metric)

    def validate(self, num_keys: int, num_layers: int) -> list[int]:
        """Return the per-layer merge counts, or raise ParameterError naming the bad layer."""
        if self.r < 0 or self.n < 0:
            raise ParameterError(f"r and n must be >= 0 (got r={self.r}, n={self.n})")
        if self.enabled and self.r >= num_keys:
            raise ParameterError(f"r={self.r} must be smaller than the number of keys ({num_keys})")
        from edgeprune.methods import tggbc

        tggbc.check_pruning_layers(self.r, self.n, num_layers)
        per_layer = tggbc.schedule(self.r, self.n, num_layers)
        keys = num_keys
        for layer, r_l in enumerate(per_layer):
            if r_l > max_merges(keys):
                raise ParameterError(
                    f"ToMe merges at most half of the keys per layer: layer {layer} would merge {r_l} "
                    f"of {keys} keys (at most {max_merges(keys)}) with r={self.r} n={self.n}; "
                    "lower r or raise n")
            keys -= r_l
        return per_layer


def max_merges(num_keys: int) -> int:
    """Keys one bipartite matching can remove: the size of set A, ceil(Nk / 2)."""
    return (num_keys + 1) // 2


def key_metric(key_input: Tensor, weight: Tensor, bias: Tensor | None, num_heads: int) -> Tensor:
    """ToMe's metric: key projection averaged over heads, L2-normalised.

    key_input [B, Nk, E] (memory + key_pos); weight [h*d, E]; bias [h*d] -> [B, Nk, d].
    """
    keys = require("torch").nn.functional.linear(key_input, weight, bias)     # [B, Nk, h*d]
    bsz, nk, width = keys.shape
    metric = keys.reshape(bsz, nk, num_heads, width // num_heads).mean(dim=2)  # [B, Nk, d]
    return metric / metric.norm(dim=-1, keepdim=True)


@dataclass(frozen=True)
class Matching:
    """Result of one bipartite matching over ``Nk`` keys (A = even positions, B = odd)."""

    unmerged: Tensor     # [B, Na - r] positions in A of the kept A keys (ascending)
    merged: Tensor       # [B, r]      positions in A of the merged A keys
    destination: Tensor  # [B, r]      positions in B they are merged into


def bipartite_soft_matching(metric: Tensor, r: int) -> Matching:
    """Match every A key to its most similar B key; merge the ``r`` best matched A keys.

    metric [B, Nk, d] (normalised). Sorting is stable, so ties keep the lower position
    first, as ONNX TopK does.
    """
    if not 0 <= r <= max_merges(metric.shape[1]):
        raise ParameterError(f"cannot merge {r} of {metric.shape[1]} keys (at most {max_merges(metric.shape[1])})")
    a, b = metric[:, ::2], metric[:, 1::2]                                    # [B, Na, d], [B, Nb, d]
    scores = a @ b.transpose(-1, -2)                                          # [B, Na, Nb]
    best, best_idx = scores.max(dim=-1)                                       # [B, Na]
    order = best.sort(dim=-1, descending=True, stable=True).indices           # [B, Na]
    merged = order[:, :r]
    unmerged = order[:, r:].sort(dim=-1).values                               # [B, Na - r]
    return Matching(unmerged=unmerged, merged=merged, destination=best_idx.gather(1, merged))


def _take(x: Tensor, index: Tensor) -> Tensor:
    """x [B, N, C] gathered along N with index [B, M] -> [B, M, C]."""
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[2]))


def merge_sum(x: Tensor, matching: Matching) -> Tensor:
    """Merge by summation: [B, Nk, C] -> [B, Nk - r, C] = cat(kept A, B + merged A)."""
    src, dst = x[:, ::2], x[:, 1::2]
    dst = dst.scatter_add(1, matching.destination[:, :, None].expand(-1, -1, x.shape[2]),
                          _take(src, matching.merged))
    return require("torch").cat([_take(src, matching.unmerged), dst], dim=1)


def merge_weighted(tensors: list[Tensor], size: Tensor, matching: Matching) -> tuple[list[Tensor], Tensor]:
    """Size-weighted average of every per-key tensor [B, Nk, C]; size [B, Nk, 1] -> merged sizes."""
    new_size = merge_sum(size, matching)                                      # [B, Nk - r, 1]
    return [merge_sum(t * size, matching) / new_size for t in tensors], new_size


def matching_margin(metric: Tensor, r: int) -> float:
    """How decisive a matching is: the smallest similarity gap that decides it (float64).

    The gap between the r-th and (r+1)-th best A-key similarity (which A keys merge) and, for
    each merged A key, between its best and second-best B key (where it goes). A margin
    below the runtime's rounding (~1e-6) means another runtime may merge differently.
    """
    a, b = metric[:, ::2].double(), metric[:, 1::2].double()
    scores = a @ b.transpose(-1, -2)                                          # [B, Na, Nb]
    top2 = scores.topk(min(2, scores.shape[-1]), dim=-1).values               # [B, Na, 2]
    best = top2[..., 0].sort(dim=-1, descending=True).values                  # [B, Na]
    gaps = [float("inf")]
    if 0 < r < best.shape[1]:
        gaps.append((best[:, r - 1] - best[:, r]).min().item())
    if r > 0 and top2.shape[-1] == 2:
        merged = bipartite_soft_matching(metric.double(), r).merged           # [B, r]
        second = (top2[..., 0] - top2[..., 1]).gather(1, merged)
        gaps.append(second.min().item())
    return min(gaps)


def merge_keys(memory: Tensor, key_pos: Tensor, size: Tensor, metric: Tensor,
               r: int) -> tuple[Tensor, Tensor, Tensor]:
    """One ToMe step on the keys: memory/key_pos [B, Nk, E], size [B, Nk, 1] -> Nk - r keys."""
    matching = bipartite_soft_matching(metric, r)
    (memory, key_pos), size = merge_weighted([memory, key_pos], size, matching)
    return memory, key_pos, size


@dataclass
class ToMeOutput:
    """The head's outputs with ToMe between layers, and the key sizes each layer saw."""

    head: "HeadOutput"
    sizes: list[Tensor]    # L x [B, Nk_l, 1]: original keys each of layer l's keys stands for
    metrics: list[Tensor]  # per merging layer: its normalised key metric [B, Nk_l, d] (diagnostics)


def forward_with_tome(head: "PETRHead", inputs: dict[str, Tensor], config: ToMeConfig) -> ToMeOutput:
    """Run ``head`` (an edgeprune PETRHead) with ToMe merging between its layers.

    inputs: ``head.example_inputs()``-style dict (memory/key_pos [B, Nk, E] + temporal inputs).
    The head's own forward with this config as its key reduction, plus per-layer sizes.
    """
    if inputs.get("key_padding_mask") is not None:
        raise ParameterError("ToMe cannot merge keys under a key padding mask; drop the mask or use tgGBC")
    out = head(**inputs, pruning=config)
    sizes = [k.size if k.size is not None else k.memory.new_ones(*k.memory.shape[:2], 1) for k in out.layer_keys]
    return ToMeOutput(out, sizes, [k.metric for k in out.layer_keys if k.metric is not None])
