"""A PETR-style decoder written for the pass tests, independently of ``edgeprune.models``.

Discovery must work on graphs edgeprune did not export, so this module re-states the decoder
with its own module names and two attention flavours:

- ``"hand"``: batch-first multi-head attention written as matmul/softmax ([B, N, E]), scale
  applied after QK^T, key padding mask as an additive bias [B, 1, 1, Nk];
- ``"mha"``: ``nn.MultiheadAttention`` used sequence-first ([N, B, E]) as the PETR reference
  code does (mask given as ``key_padding_mask``);
- ``"mha_bf"``: ``nn.MultiheadAttention(batch_first=True)``, which transposes query, key and
  value separately inside (not part of the main matrix; a regression case).

Layer order is post-norm: self-attention -> norm -> cross-attention -> norm -> FFN -> norm;
every layer's output goes through a final LayerNorm and the shared class / box branches;
outputs are stacked: ``all_cls_scores [L, B, Nq, C]`` and ``all_bbox_preds [L, B, Nq, code]``.

``forward(..., prune=(r, n, k))`` applies tgGBC (methods.md) between layers, written here from
the formulas so that passes can be checked against a reference that shares no code with them.
``record(module)`` collects the intermediate tensors discovery must find (hooks), and
``exported(...)`` caches ONNX exports per process (in ``model_cache.cache_dir()``), since exporting
is the slow part of tests.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from model_cache import cache_dir       # the session's export directory (tests/ is on sys.path)

FLAVOURS = ("hand", "mha")
EXPORTERS = ("torchscript", "dynamo")


@dataclass(frozen=True)
class Dims:
    """Tiny sizes keep exports and ORT runs fast; every size differs so shapes are unambiguous."""

    layers: int = 3
    embed: int = 32
    heads: int = 2
    ffn: int = 64
    queries: int = 20
    keys: int = 50
    classes: int = 10
    code: int = 10
    temporal: int = 0      # StreamPETR-like memory tokens joining the self-attention keys (0: none)


class HandMixer(nn.Module):
    """Batch-first multi-head attention as matmul/softmax: [B, Nq, E] x [B, Nk, E] -> [B, Nq, E]."""

    def __init__(self, embed: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, embed // heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(embed, embed) for _ in range(3))
        self.to_out = nn.Linear(embed, embed)
        self.normalise = nn.Softmax(dim=-1)        # a module so a hook can read the probabilities

    def _heads(self, x: Tensor) -> Tensor:
        bsz, n, _ = x.shape
        return x.reshape(bsz, n, self.heads, self.head_dim).transpose(1, 2)   # [B, h, N, d]

    def forward(self, q_in: Tensor, k_in: Tensor, v_in: Tensor,
                bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """bias: additive [B, 1, 1, Nk] or None -> (out [B, Nq, E], probs [B, h, Nq, Nk])."""
        q, k, v = self._heads(self.to_q(q_in)), self._heads(self.to_k(k_in)), self._heads(self.to_v(v_in))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)   # [B, h, Nq, Nk]
        if bias is not None:
            scores = scores + bias
        probs = self.normalise(scores)
        out = torch.matmul(probs, v).transpose(1, 2)                               # [B, Nq, h, d]
        return self.to_out(out.reshape(q_in.shape[0], q_in.shape[1], -1)), probs


class Block(nn.Module):
    """One post-norm decoder layer. ``flavour`` decides the attention module and layout."""

    def __init__(self, dims: Dims, flavour: str) -> None:
        super().__init__()
        self.flavour = flavour
        if flavour == "hand":
            self.mix_self, self.mix_cross = HandMixer(dims.embed, dims.heads), HandMixer(dims.embed, dims.heads)
        else:
            first = flavour == "mha_bf"
            self.mix_self = nn.MultiheadAttention(dims.embed, dims.heads, batch_first=first)
            self.mix_cross = nn.MultiheadAttention(dims.embed, dims.heads, batch_first=first)
        self.ln_a, self.ln_b, self.ln_c = (nn.LayerNorm(dims.embed) for _ in range(3))
        self.mlp = nn.Sequential(nn.Linear(dims.embed, dims.ffn), nn.ReLU(), nn.Linear(dims.ffn, dims.embed))

    def forward(self, x: Tensor, qpos: Tensor, mem: Tensor, mpos: Tensor, mask: Tensor | None,
                temp: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """hand: x [B, Nq, E], mem [B, Nk, E]; mha: x [Nq, B, E], mem [Nk, B, E].

        ``temp`` (memory tokens, their positions; same layout) joins the self-attention keys
        and values as in StreamPETR. Returns the new x and the head-averaged cross-attention
        probabilities [B, Nq, Nk].
        """
        q = x + qpos
        k, v = q, x
        if temp is not None:
            axis = 0 if self.flavour == "mha" else 1
            k, v = torch.cat([q, temp[0] + temp[1]], dim=axis), torch.cat([x, temp[0]], dim=axis)
        x = self.ln_a(x + self.mix_self(q, k, v)[0])
        if self.flavour == "hand":
            bias = None if mask is None else torch.zeros(mask.shape).masked_fill(mask, -1e9)[:, None, None, :]
            out, probs = self.mix_cross(x + qpos, mem + mpos, mem, bias)
            probs = probs.mean(dim=1)
        else:
            out, probs = self.mix_cross(x + qpos, mem + mpos, mem, key_padding_mask=mask)
        x = self.ln_b(x + out)
        return self.ln_c(x + self.mlp(x)), probs


def drop_schedule(r: int, n: int, layers: int) -> list[int]:
    """Keys dropped after each layer (methods.md): r // n rounded down to even, remainder last."""
    if r <= 0 or n <= 0:
        return [0] * layers
    per = r // n
    per -= per % 2
    return [per] * (n - 1) + [r - (n - 1) * per] + [0] * (layers - n)


def keep_keys(logits: Tensor, probs: Tensor, drop: int, k: int) -> Tensor:
    """logits [B, Nq, C], probs [B, Nq, Nk] -> indices [B, Nk - drop] of the keys to keep."""
    conf = logits.max(dim=-1).values.sigmoid()                        # [B, Nq]
    if k > 0:
        top = conf.topk(k, dim=-1).indices                            # [B, k]
        conf = conf.gather(1, top)
        probs = probs.gather(1, top[..., None].expand(-1, -1, probs.shape[-1]))
    importance = (probs * conf[..., None]).sum(dim=1)                 # [B, Nk]
    return importance.topk(probs.shape[-1] - drop, dim=-1).indices


class HandDecoder(nn.Module):
    """memory, key_pos [B, Nk, E] (+ key_padding_mask [B, Nk] bool) -> stacked scores and boxes."""

    def __init__(self, flavour: str = "hand", dims: Dims = Dims(), seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.flavour, self.dims = flavour, dims
        self.anchors = nn.Parameter(torch.rand(dims.queries, 3))                      # [Nq, 3] in (0, 1)
        self.anchor_embed = nn.Sequential(nn.Linear(3, dims.embed), nn.ReLU(), nn.Linear(dims.embed, dims.embed))
        self.blocks = nn.ModuleList(Block(dims, flavour) for _ in range(dims.layers))
        self.final_ln = nn.LayerNorm(dims.embed)
        e = dims.embed
        self.score_head = nn.Sequential(nn.Linear(e, e), nn.LayerNorm(e), nn.ReLU(),
                                        nn.Linear(e, e), nn.LayerNorm(e), nn.ReLU(), nn.Linear(e, dims.classes))
        self.box_head = nn.Sequential(nn.Linear(e, e), nn.ReLU(), nn.Linear(e, e), nn.ReLU(),
                                      nn.Linear(e, dims.code))
        for name, param in self.named_parameters():   # trained models have no zero biases / unit LN weights
            if name.endswith("bias") or ("ln" in name and name.endswith("weight")):
                nn.init.uniform_(param, -0.2, 0.2) if name.endswith("bias") else nn.init.uniform_(param, 0.8, 1.2)
        self.eval()

    def _heads(self, x: Tensor, anchor_logit: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, Nq, E] -> (logits [B, Nq, C], boxes [B, Nq, code])."""
        h = self.final_ln(x)
        box = self.box_head(h)
        return self.score_head(h), torch.cat([(box[..., :3] + anchor_logit).sigmoid(), box[..., 3:]], dim=-1)

    def forward(self, memory: Tensor, key_pos: Tensor, key_padding_mask: Tensor | None = None,
                temp_memory: Tensor | None = None, temp_pos: Tensor | None = None,
                prune: tuple[int, int, int] | None = None) -> tuple[Tensor, Tensor]:
        """memory/key_pos [B, Nk, E]; temp_memory/temp_pos [B, M, E] when ``dims.temporal``."""
        bsz = memory.shape[0]
        temp = None if temp_memory is None else (temp_memory, temp_pos)
        qpos = self.anchor_embed(self.anchors).unsqueeze(0).expand(bsz, -1, -1)       # [B, Nq, E]
        anchor_logit = torch.log(self.anchors / (1 - self.anchors))                   # [Nq, 3]
        x = torch.zeros_like(qpos)
        drops = drop_schedule(*prune[:2], self.dims.layers) if prune else [0] * self.dims.layers
        scores, boxes = [], []
        for block, drop in zip(self.blocks, drops):
            if self.flavour != "mha":
                x, probs = block(x, qpos, memory, key_pos, key_padding_mask, temp)
                out = x
            else:   # sequence-first inside the decoder, as the PETR reference code
                seq = None if temp is None else (temp[0].transpose(0, 1), temp[1].transpose(0, 1))
                x, probs = block(x.transpose(0, 1), qpos.transpose(0, 1), memory.transpose(0, 1),
                                 key_pos.transpose(0, 1), key_padding_mask, seq)
                out = x = x.transpose(0, 1)
            logits, box = self._heads(out, anchor_logit)
            scores.append(logits)
            boxes.append(box)
            if drop:
                keep = keep_keys(logits, probs, drop, prune[2])                          # [B, Nk']
                memory = memory.gather(1, keep[..., None].expand(-1, -1, memory.shape[-1]))
                key_pos = key_pos.gather(1, keep[..., None].expand(-1, -1, key_pos.shape[-1]))
                if key_padding_mask is not None:
                    key_padding_mask = key_padding_mask.gather(1, keep)
        return torch.stack(scores), torch.stack(boxes)

    def example_inputs(self, batch: int = 1, seed: int = 0, mask: bool = True) -> dict[str, Tensor]:
        """Seeded inputs; the mask hides the last 7 keys of every batch element (and key 3 of the second)."""
        gen = torch.Generator().manual_seed(seed)
        shape = (batch, self.dims.keys, self.dims.embed)
        inputs = {"memory": torch.randn(shape, generator=gen), "key_pos": torch.randn(shape, generator=gen)}
        if mask:
            kpm = torch.zeros(batch, self.dims.keys, dtype=torch.bool)
            kpm[:, -7:] = True
            kpm[1:, 3] = True
            inputs["key_padding_mask"] = kpm
        if self.dims.temporal:
            shape = (batch, self.dims.temporal, self.dims.embed)
            inputs.update(temp_memory=torch.randn(shape, generator=gen), temp_pos=torch.randn(shape, generator=gen))
        return inputs


@dataclass
class Recorded:
    """Intermediate tensors of one forward pass, per layer (all batch-first)."""

    cross_probs: list[Tensor] = field(default_factory=list)   # L x [B, Nq, Nk], head mean
    key_inputs: list[Tensor] = field(default_factory=list)    # L x [B, Nk, E]  (memory + key_pos)
    value_inputs: list[Tensor] = field(default_factory=list)  # L x [B, Nk, E]  (memory)
    logits: list[Tensor] = field(default_factory=list)        # L x [B, Nq, C]


def record(module: HandDecoder, inputs: dict[str, Tensor]) -> Recorded:
    """Run ``module`` with hooks on each cross-attention and the class branch's last Linear."""
    rec = Recorded()
    seq_first = module.flavour == "mha"

    def on_cross(_mod: nn.Module, args: tuple, kwargs: dict, output: tuple) -> None:
        key, value = (args[1], args[2])
        if seq_first:
            key, value = key.transpose(0, 1), value.transpose(0, 1)
        rec.key_inputs.append(key.detach())
        rec.value_inputs.append(value.detach())
        probs = output[1]
        rec.cross_probs.append((probs.mean(dim=1) if probs.dim() == 4 else probs).detach())

    handles = [b.mix_cross.register_forward_hook(on_cross, with_kwargs=True) for b in module.blocks]
    handles.append(module.score_head[-1].register_forward_hook(
        lambda _m, _a, out: rec.logits.append(out.detach())))
    try:
        with torch.no_grad():
            module(**inputs)
    finally:
        for h in handles:
            h.remove()
    return rec


def export(module: HandDecoder, path: Path, exporter: str, inputs: dict[str, Tensor],
           simplify: bool = False) -> Path:
    """Export with ``torch.onnx.export`` (TorchScript opset 17 or dynamo opset 18), optionally onnxsim."""
    import onnx

    names = list(inputs)
    kwargs = dict(input_names=names, output_names=["all_cls_scores", "all_bbox_preds"])
    if exporter == "torchscript":
        torch.onnx.export(module, tuple(inputs.values()), str(path), dynamo=False, opset_version=17, **kwargs)
    else:
        torch.onnx.export(module, tuple(inputs.values()), str(path), dynamo=True, opset_version=18,
                          external_data=False, **kwargs)
    if simplify:
        import onnxsim

        model, ok = onnxsim.simplify(onnx.load(str(path)))
        assert ok, "onnxsim could not validate the simplified decoder"
        onnx.save(model, str(path))
    return path


@functools.lru_cache(maxsize=None)
def exported(flavour: str, exporter: str, simplify: bool = False, batch: int = 1,
             mask: bool = True, temporal: int = 0) -> Path:
    """Path of a cached export of ``HandDecoder(flavour, Dims(temporal=...))`` (read-only: copy to edit)."""
    module = HandDecoder(flavour, Dims(temporal=temporal))
    name = (f"{flavour}-{exporter}-{'sim' if simplify else 'raw'}-b{batch}-{'mask' if mask else 'nomask'}"
            f"-t{temporal}.onnx")
    if simplify:   # simplify a copy of the raw export (cached) instead of exporting twice
        raw = exported(flavour, exporter, False, batch, mask, temporal)
        import onnx
        import onnxsim

        model, ok = onnxsim.simplify(onnx.load(str(raw)))
        assert ok, "onnxsim could not validate the simplified decoder"
        onnx.save(model, str(cache_dir() / name))
        return cache_dir() / name
    return export(module, cache_dir() / name, exporter, module.example_inputs(batch, mask=mask))
