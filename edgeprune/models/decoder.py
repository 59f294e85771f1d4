"""PETR-family transformer decoder with its shared class and box branches (``PETRHead``).

Faithful to ``shared/docs/architectures.md``: 6 post-norm layers
(self_attn -> norm -> cross_attn -> norm -> ffn -> norm), a final LayerNorm applied to every
layer's output before the shared branches, learned 3D reference points whose sine
embedding gives the query position, and StreamPETR's propagated queries and temporal
memory. The head optionally applies tgGBC key pruning between layers (the torch oracle of
the ONNX pass) and can run on a subset of its queries (the torch oracle of GPQ).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Protocol, Sequence

import torch
from torch import Tensor, nn

from edgeprune.errors import ParameterError
from edgeprune.models.attention import build_attention
from edgeprune.models.config import DecoderConfig

TEMPORAL_INPUTS = ("prev_query", "prev_ref", "temp_memory", "temp_pos")


def sine_embedding_3d(pos: Tensor, feats_per_axis: int = 128, temperature: float = 10000.0) -> Tensor:
    """Sine/cosine embedding of 3D points in [0, 1]: [..., 3] -> [..., 3 * feats_per_axis].

    Axis order (y, x, z) and interleaved sin/cos as in PETR's ``pos2posemb3d``.
    """
    dim_t = torch.arange(feats_per_axis, dtype=torch.float32, device=pos.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / feats_per_axis)
    scaled = pos * (2 * math.pi)
    per_axis = []
    for axis in (1, 0, 2):
        angle = scaled[..., axis, None] / dim_t                               # [..., F]
        per_axis.append(torch.stack((angle[..., 0::2].sin(), angle[..., 1::2].cos()), dim=-1).flatten(-2))
    return torch.cat(per_axis, dim=-1)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class DecoderLayer(nn.Module):
    """Post-norm layer: self_attn -> norm -> cross_attn -> norm -> ffn -> norm."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        e = cfg.embed_dims
        self.self_attn = build_attention(cfg.attention, e, cfg.num_heads)
        self.cross_attn = build_attention(cfg.attention, e, cfg.num_heads)
        self.ffn = nn.Sequential(nn.Linear(e, cfg.ffn_dims), nn.ReLU(inplace=True), nn.Linear(cfg.ffn_dims, e))
        self.norms = nn.ModuleList(nn.LayerNorm(e) for _ in range(3))

    def forward(self, tgt: Tensor, query_pos: Tensor, memory: Tensor, key_pos: Tensor,
                temp_memory: Tensor | None, temp_pos: Tensor | None,
                key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """tgt/query_pos [B, Nq, E]; memory/key_pos [B, Nk, E] -> (tgt [B, Nq, E], probs [B, h, Nq, Nk])."""
        q = tgt + query_pos
        k, v = q, tgt
        if temp_memory is not None:                       # StreamPETR: memory joins self-attention
            k = torch.cat([q, temp_memory + temp_pos], dim=1)
            v = torch.cat([tgt, temp_memory], dim=1)
        tgt = self.norms[0](tgt + self.self_attn(q, k, v)[0])
        attended, probs = self.cross_attn(tgt + query_pos, memory + key_pos, memory, key_padding_mask)
        tgt = self.norms[1](tgt + attended)
        tgt = self.norms[2](tgt + self.ffn(tgt))
        return tgt, probs


@dataclass(frozen=True)
class LayerKeys:
    """The keys (image tokens) one decoder layer attends to, and how they were reduced."""

    memory: Tensor                   # [B, Nk_l, E]
    key_pos: Tensor                  # [B, Nk_l, E]
    mask: Tensor | None = None       # [B, Nk_l] bool, True = ignore
    size: Tensor | None = None       # [B, Nk_l, 1] original tokens each key stands for (merging)
    keep: Tensor | None = None       # [B, Nk_l] indices into the previous layer's keys (pruning)
    metric: Tensor | None = None     # [B, Nk_{l-1}, d] what a merge matched on (diagnostics)


class KeyReduction(Protocol):
    """How keys shrink between layers: tgGBC (``TgGBCConfig``) or ToMe (``ToMeConfig``).

    ``layer_schedule`` validates and returns keys removed after each layer; ``reduce`` maps
    layer ``l``'s keys to layer ``l+1``'s given that layer's module, class logits
    [B, Nq, C] and cross-attention probs [B, h, Nq, Nk_l].
    """

    def layer_schedule(self, num_keys: int, num_layers: int, num_queries: int) -> list[int]: ...

    def reduce(self, keys: LayerKeys, amount: int, layer: nn.Module, logits: Tensor,
               probs: Tensor) -> LayerKeys: ...


@dataclass
class HeadOutput:
    """Everything one forward pass produces; the first two are the exported outputs."""

    all_cls_scores: Tensor            # [L, B, Nq, C]
    all_bbox_preds: Tensor            # [L, B, Nq, code]
    cross_attn_probs: list[Tensor]    # L x [B, h, Nq, Nk_l]
    layer_logits: list[Tensor]        # L x [B, Nq, C]
    keep_indices: list[Tensor | None]  # L x [B, Nk_{l+1}] indices into layer l's keys, or None
    layer_keys: list[LayerKeys]       # L x the keys each layer attended to


def _branch(e: int, out: int, norm: bool) -> nn.Sequential:
    """Class branch (Linear-LN-ReLU x2, Linear) or box branch (Linear-ReLU x2, Linear)."""
    mods: list[nn.Module] = []
    for _ in range(2):
        mods += [nn.Linear(e, e)] + ([nn.LayerNorm(e)] if norm else []) + [nn.ReLU(inplace=True)]
    return nn.Sequential(*mods, nn.Linear(e, out))


class PETRHead(nn.Module):
    """Queries + decoder + shared branches. Key-count agnostic; ``num_keys`` only sizes examples."""

    def __init__(self, cfg: DecoderConfig, num_keys: int | None = None) -> None:
        super().__init__()
        self.cfg, self.num_keys = cfg, num_keys
        e = cfg.embed_dims
        self.reference_points = nn.Embedding(cfg.num_queries, 3)
        nn.init.uniform_(self.reference_points.weight, 0, 1)
        self.query_embedding = nn.Sequential(nn.Linear(e * 3 // 2, e), nn.ReLU(inplace=True), nn.Linear(e, e))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.post_norm = nn.LayerNorm(e)
        self.cls_branch = _branch(e, cfg.num_classes, norm=True)
        self.reg_branch = _branch(e, cfg.code_size, norm=False)

    # ----------------------------------------------------------------- inputs
    def input_names(self) -> list[str]:
        names = ["memory", "key_pos"]
        if self.cfg.num_propagated:
            names += ["prev_query", "prev_ref"]
        if self.cfg.memory_len:
            names += ["temp_memory", "temp_pos"]
        return names

    @property
    def temporal_memory_len(self) -> int:
        """Temporal tokens joining self-attention: the memory bank minus the propagated queries."""
        return max(self.cfg.memory_len - self.cfg.num_propagated, 0) if self.cfg.memory_len else 0

    def example_inputs(self, batch: int = 1, seed: int = 0, num_keys: int | None = None) -> dict[str, Tensor]:
        """Seeded random inputs in ``input_names()`` order (memory/positions ~ N(0, 1))."""
        if batch < 1:
            raise ParameterError(f"batch must be >= 1 (got {batch})")
        nk = num_keys or self.num_keys
        if not nk:
            raise ParameterError("num_keys is unknown: pass num_keys= or build the head from a preset")
        gen = torch.Generator().manual_seed(seed)
        e, p, m = self.cfg.embed_dims, self.cfg.num_propagated, self.temporal_memory_len
        shapes = {"memory": (batch, nk, e), "key_pos": (batch, nk, e), "prev_query": (batch, p, e),
                  "prev_ref": (batch, p, 3), "temp_memory": (batch, m, e), "temp_pos": (batch, m, e)}
        return {n: (torch.rand(shapes[n], generator=gen) if n == "prev_ref" else
                    torch.randn(shapes[n], generator=gen)) for n in self.input_names()}

    # ---------------------------------------------------------------- queries
    def _split_query_indices(self, indices: Sequence[int]) -> tuple[list[int], list[int]]:
        """Original query indices -> (learned subset, propagated subset), validated and sorted."""
        total, nl = self.cfg.total_queries, self.cfg.num_queries
        idx = sorted(int(i) for i in indices)
        if len(set(idx)) != len(idx) or not idx or idx[0] < 0 or idx[-1] >= total:
            raise ParameterError(f"query indices must be unique, non-empty and in [0, {total}); got {len(idx)} indices")
        return [i for i in idx if i < nl], [i - nl for i in idx if i >= nl]

    def _initial_queries(self, batch: int, prev_query: Tensor | None, prev_ref: Tensor | None,
                         query_indices: Sequence[int] | None) -> tuple[Tensor, Tensor]:
        """-> (tgt [B, Nq, E] zeros for learned queries, reference points [B, Nq, 3])."""
        ref = self.reference_points.weight                                    # [Nl, 3]
        learned, prop = (list(range(self.cfg.num_queries)), list(range(self.cfg.num_propagated)))
        if query_indices is not None:
            learned, prop = self._split_query_indices(query_indices)
            ref = ref[learned]
        ref = ref.unsqueeze(0).expand(batch, -1, -1)
        tgt = ref.new_zeros(batch, ref.shape[1], self.cfg.embed_dims)
        if self.cfg.num_propagated:
            if prev_query is None or prev_ref is None:
                raise ParameterError("this StreamPETR head needs prev_query and prev_ref inputs")
            if query_indices is not None:
                prev_query, prev_ref = prev_query[:, prop], prev_ref[:, prop]
            tgt = torch.cat([tgt, prev_query], dim=1)
            ref = torch.cat([ref, prev_ref], dim=1)
        return tgt, ref

    def select_queries(self, indices: Sequence[int]) -> "PETRHead":
        """A smaller head keeping only ``indices`` (original numbering; learned then propagated).

        Its propagated inputs hold only the kept propagated queries, in ascending order.
        """
        learned, prop = self._split_query_indices(indices)
        small = PETRHead(replace(self.cfg, num_queries=len(learned), num_propagated=len(prop)), self.num_keys)
        state = dict(self.state_dict())
        state["reference_points.weight"] = state["reference_points.weight"][learned].clone()
        small.load_state_dict(state)
        return small.train(self.training)

    # ---------------------------------------------------------------- forward
    def query_start(self, tgt: Tensor, ref: Tensor, memory: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Reference points ``[B, Nq, 3]`` -> ``(tgt, query_pos, ref_logit)`` the first layer takes.

        With ``query_content="position"`` the content is the position embedding plus zero times
        one memory value. The zero term keeps the content a runtime tensor: otherwise the whole
        first self-attention is input-independent, exporters fold it into one constant mixed
        over all queries, and GPQ's query slicing of the ONNX graph could no longer give what
        the model computes with fewer queries.
        """
        query_pos = self.query_embedding(sine_embedding_3d(ref, self.cfg.embed_dims // 2))  # [B, Nq, E]
        if self.cfg.query_content == "position":
            tgt = query_pos + memory[:, :1, :1] * 0.0
        return tgt, query_pos, inverse_sigmoid(ref)

    def _predict(self, tgt: Tensor, ref_logit: Tensor) -> tuple[Tensor, Tensor]:
        """Layer output [B, Nq, E] -> (class logits [B, Nq, C], boxes [B, Nq, code])."""
        normed = self.post_norm(tgt)
        reg = self.reg_branch(normed)
        centre = (reg[..., :3] + ref_logit).sigmoid()
        return self.cls_branch(normed), torch.cat([centre, reg[..., 3:]], dim=-1)

    def forward(self, memory: Tensor, key_pos: Tensor, prev_query: Tensor | None = None,
                prev_ref: Tensor | None = None, temp_memory: Tensor | None = None,
                temp_pos: Tensor | None = None, key_padding_mask: Tensor | None = None,
                pruning: KeyReduction | None = None,
                query_indices: Sequence[int] | None = None) -> HeadOutput:
        """memory/key_pos [B, Nk, E] (+ temporal inputs) -> HeadOutput; see module docstring.

        ``pruning`` reduces keys between layers: ``TgGBCConfig`` (tgGBC) or ``ToMeConfig`` (ToMe).
        """
        tgt, ref = self._initial_queries(memory.shape[0], prev_query, prev_ref, query_indices)
        tgt, query_pos, ref_logit = self.query_start(tgt, ref, memory)
        drops = (pruning.layer_schedule(memory.shape[1], self.cfg.num_layers, tgt.shape[1])
                 if pruning is not None else [0] * self.cfg.num_layers)
        keys = LayerKeys(memory, key_pos, key_padding_mask)
        logits_all, boxes_all, probs_all, keeps, seen = [], [], [], [], []
        for layer, drop in zip(self.layers, drops):
            tgt, probs = layer(tgt, query_pos, keys.memory, keys.key_pos, temp_memory, temp_pos, keys.mask)
            logits, boxes = self._predict(tgt, ref_logit)
            seen.append(keys)
            if drop > 0:
                assert pruning is not None
                keys = pruning.reduce(keys, drop, layer, logits, probs)
            keeps.append(keys.keep if drop > 0 else None)
            logits_all.append(logits), boxes_all.append(boxes), probs_all.append(probs)
        return HeadOutput(torch.stack(logits_all), torch.stack(boxes_all), probs_all, logits_all, keeps, seen)
