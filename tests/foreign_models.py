"""Decoders from public code, built at test time with random weights: the foreign-graph corpus.

Users arrive with ONNX files exported from their own modules, not edgeprune's. Each class
here wraps a public decoder (``torch.nn.TransformerDecoder``, Hugging Face DETR, Conditional
DETR) in the smallest module that returns what tgGBC reads: per-layer class logits stacked as
``all_cls_scores [L, B, Nq, C]``, the model's own class head applied to each layer's output.
Nothing of edgeprune is imported.

Every wrapper exposes the same layer-by-layer surface, so a PyTorch tgGBC can run between
its layers (``tests/test_foreign_graphs.py``)::

    hidden, keys = m.prepare(inputs)        # keys: per-key tensors, batch-first [B, Nk, ...]
    hidden = m.layer(l, hidden, keys)       # one decoder layer on (possibly fewer) keys
    logits = m.logits(l, hidden)            # [B, Nq, C], through the model's class head
    with m.cross_probs() as probs: ...      # probs[l]: layer l's cross-attention, head mean [B, Nq, Nk]

``forward`` is the same loop without pruning. Query/key projections are scaled up so that
attention is peaked and the kept key set has a clear margin (random init gives near ties).
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from model_cache import cache_dir, simplified      # the session's export directory (tests/ is on sys.path)

EXPORTERS = {"torchscript": 17, "dynamo": 18}


@dataclass(frozen=True)
class Sizes:
    """Tiny but distinct sizes: a few hundred keys, so the quick suite stays fast."""

    layers: int = 3
    embed: int = 64
    heads: int = 4
    ffn: int = 128
    queries: int = 20
    height: int = 12
    width: int = 25          # keys = height * width = 300
    classes: int = 7

    @property
    def keys(self) -> int:
        return self.height * self.width


@dataclass(frozen=True)
class Keys:
    """Per-key tensors, batch-first: what tgGBC gathers between layers."""

    memory: Tensor               # [B, Nk, E]
    pos: Tensor | None           # [B, Nk, E] key position embedding
    padding: Tensor | None       # [B, Nk] bool, True = padded (ignored) key

    def gather(self, keep: Tensor) -> Keys:
        """The keys ``keep`` [B, K] of every per-key tensor."""
        def take(x: Tensor | None) -> Tensor | None:
            if x is None:
                return None
            idx = keep if x.dim() == 2 else keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])
            return torch.gather(x, 1, idx)
        return Keys(take(self.memory), take(self.pos), take(self.padding))


def _padding(batch: int, sizes: Sizes) -> Tensor:
    """Pad the right columns of every image, a different width per batch element: [B, Nk] True = pad."""
    pad = torch.zeros(batch, sizes.height, sizes.width, dtype=torch.bool)
    for b in range(batch):
        pad[b, :, sizes.width - 4 - 3 * b:] = True
    return pad.reshape(batch, -1)


class ForeignDecoder(nn.Module):
    """Shared loop: ``forward`` = prepare, then per layer: layer + class logits; stacked."""

    sizes: Sizes
    name: str = "foreign"

    def example_inputs(self, batch: int, mask: bool, seed: int = 0) -> dict[str, Tensor]:
        gen = torch.Generator().manual_seed(seed)
        s = self.sizes
        salience = torch.exp(0.5 * torch.randn(batch, s.keys, 1, generator=gen))    # tokens differ in norm
        inputs = {"memory": torch.randn(batch, s.keys, s.embed, generator=gen) * salience,
                  "key_pos": torch.randn(batch, s.keys, s.embed, generator=gen)}
        if mask:
            inputs["key_padding_mask"] = _padding(batch, s)
        return inputs

    def forward(self, memory: Tensor, key_pos: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        hidden, keys = self.prepare({"memory": memory, "key_pos": key_pos, "key_padding_mask": key_padding_mask})
        out = []
        for i in range(self.sizes.layers):
            hidden = self.layer(i, hidden, keys)
            out.append(self.logits(i, hidden))
        return torch.stack(out)                                                   # [L, B, Nq, C]

    def prepare(self, inputs: dict[str, Tensor | None]) -> tuple[Tensor, Keys]:
        raise NotImplementedError

    def layer(self, i: int, hidden: Tensor, keys: Keys) -> Tensor:
        raise NotImplementedError

    def logits(self, i: int, hidden: Tensor) -> Tensor:
        raise NotImplementedError

    def cross_probs(self) -> contextlib.AbstractContextManager[list[Tensor]]:
        raise NotImplementedError


def _scale_(linear_weight: Tensor, factor: float) -> None:
    with torch.no_grad():
        linear_weight.mul_(factor)


# --------------------------------------------------------------------------- torch.nn
class TorchStack(ForeignDecoder):
    """``nn.TransformerDecoder`` (post-norm layers, ``batch_first`` either way) on learned queries.

    Cross-attention reads key = value = ``memory + key_pos``, so nn.MultiheadAttention packs the
    key and value projections into one MatMul and splits its output; the layers call it with
    ``need_weights=False`` (the SDPA path). The class head reads each layer's output through the
    decoder's final norm."""

    def __init__(self, batch_first: bool, sizes: Sizes = Sizes(), seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.sizes, self.batch_first = sizes, batch_first
        self.name = f"torch-{'bf' if batch_first else 'sf'}"
        layer = nn.TransformerDecoderLayer(sizes.embed, sizes.heads, sizes.ffn, dropout=0.0, batch_first=batch_first)
        self.decoder = nn.TransformerDecoder(layer, sizes.layers, norm=nn.LayerNorm(sizes.embed))
        self.query = nn.Parameter(torch.randn(sizes.queries, sizes.embed))
        self.class_head = nn.Linear(sizes.embed, sizes.classes)
        for block in self.decoder.layers:
            _scale_(block.multihead_attn.in_proj_weight[:2 * sizes.embed], 2.0)       # peaked cross-attention
        _scale_(self.class_head.weight, 3.0)
        self.eval()

    def _layout(self, x: Tensor) -> Tensor:
        return x if self.batch_first else x.transpose(0, 1)

    def prepare(self, inputs: dict[str, Tensor | None]) -> tuple[Tensor, Keys]:
        memory = inputs["memory"] + inputs["key_pos"]                    # key = value = memory + pos
        batch = memory.shape[0]
        hidden = self.query.unsqueeze(0).expand(batch, -1, -1)
        return self._layout(hidden), Keys(memory, None, inputs.get("key_padding_mask"))

    def layer(self, i: int, hidden: Tensor, keys: Keys) -> Tensor:
        return self.decoder.layers[i](hidden, self._layout(keys.memory), memory_key_padding_mask=keys.padding)

    def logits(self, i: int, hidden: Tensor) -> Tensor:
        return self.class_head(self.decoder.norm(self._layout(hidden)))

    @contextlib.contextmanager
    def cross_probs(self) -> Iterator[list[Tensor]]:
        """Recompute each call's probabilities with ``need_weights=True`` (the layer asks for none)."""
        probs: list[Tensor] = []

        def hook(mod: nn.Module, args: tuple, kwargs: dict, _out: Any) -> None:
            kw = {k: v for k, v in kwargs.items() if k in ("key_padding_mask", "attn_mask")}
            _, weights = mod.forward(*args, **kw, need_weights=True, average_attn_weights=True)
            probs.append(weights)                                                     # [B, Nq, Nk]

        handles = [b.multihead_attn.register_forward_hook(hook, with_kwargs=True) for b in self.decoder.layers]
        try:
            yield probs
        finally:
            for h in handles:
                h.remove()


class TorchPackedWeights(TorchStack):
    """The same layers, but cross-attention called as users call ``nn.MultiheadAttention`` directly:
    ``mha(x, memory, memory)`` with the default ``need_weights=True`` (a different export path)."""

    def __init__(self, sizes: Sizes = Sizes(), seed: int = 0) -> None:
        super().__init__(batch_first=False, sizes=sizes, seed=seed)
        self.name = "torch-weights"

    def layer(self, i: int, hidden: Tensor, keys: Keys) -> Tensor:
        block = self.decoder.layers[i]
        x = block.norm1(hidden + block._sa_block(hidden, None, None))
        attn, _ = block.multihead_attn(x, self._layout(keys.memory), self._layout(keys.memory),
                                       key_padding_mask=keys.padding)
        x = block.norm2(x + attn)
        return block.norm3(x + block._ff_block(x))


# --------------------------------------------------------------------------- Hugging Face DETR
def _detr_config(sizes: Sizes, attn: str, cls_name: str = "DetrConfig", **extra: Any) -> Any:
    import transformers

    config = getattr(transformers, cls_name)(**extra,
        d_model=sizes.embed, decoder_layers=sizes.layers, decoder_attention_heads=sizes.heads,
        decoder_ffn_dim=sizes.ffn, encoder_layers=1, encoder_attention_heads=sizes.heads,
        encoder_ffn_dim=sizes.ffn, num_queries=sizes.queries, num_labels=sizes.classes - 1, dropout=0.0,
        use_timm_backbone=False, use_pretrained_backbone=False)
    config._attn_implementation = attn
    return config


class DetrStack(ForeignDecoder):
    """Hugging Face ``DetrDecoder`` (eager or sdpa attention) with DETR's query embeddings and class
    head applied to every layer's normed output, as ``DetrForObjectDetection`` does with aux loss."""

    def __init__(self, attn: str, sizes: Sizes = Sizes(), seed: int = 0) -> None:
        super().__init__()
        from transformers.models.detr.modeling_detr import DetrDecoder

        torch.manual_seed(seed)
        self.sizes, self.name = sizes, f"detr-{attn}"
        self.config = _detr_config(sizes, attn)
        self.decoder = DetrDecoder(self.config)
        self.query_pos = nn.Embedding(sizes.queries, sizes.embed)
        self.class_labels_classifier = nn.Linear(sizes.embed, sizes.classes)
        for block in self.decoder.layers:
            _scale_(block.encoder_attn.q_proj.weight, 6.0)
            _scale_(block.encoder_attn.k_proj.weight, 6.0)
        _scale_(self.class_labels_classifier.weight, 3.0)
        self.eval()

    def prepare(self, inputs: dict[str, Tensor | None]) -> tuple[Tensor, Keys]:
        memory = inputs["memory"]
        hidden = torch.zeros(memory.shape[0], self.sizes.queries, self.sizes.embed)
        return hidden, Keys(memory, inputs["key_pos"], inputs.get("key_padding_mask"))

    def _encoder_mask(self, hidden: Tensor, keys: Keys) -> Tensor | None:
        """DETR's own 4-D cross-attention mask for the implementation in use (pixel mask 1 = real)."""
        from transformers.masking_utils import create_bidirectional_mask

        if keys.padding is None:
            return None
        return create_bidirectional_mask(config=self.config, inputs_embeds=hidden,
                                         attention_mask=(~keys.padding).long(), encoder_hidden_states=keys.memory)

    def layer(self, i: int, hidden: Tensor, keys: Keys) -> Tensor:
        query_pos = self.query_pos.weight.unsqueeze(0).expand(hidden.shape[0], -1, -1)
        return self.decoder.layers[i](hidden, None, keys.pos, query_pos, keys.memory,
                                      encoder_attention_mask=self._encoder_mask(hidden, keys))

    def logits(self, i: int, hidden: Tensor) -> Tensor:
        return self.class_labels_classifier(self.decoder.layernorm(hidden))

    @contextlib.contextmanager
    def cross_probs(self) -> Iterator[list[Tensor]]:
        """Run the layers with eager attention (sdpa returns no weights; both compute the same)."""
        probs: list[Tensor] = []
        saved = self.config._attn_implementation
        self.config._attn_implementation = "eager"
        handles = [b.encoder_attn.register_forward_hook(lambda _m, _a, out: probs.append(out[1].mean(dim=1)))
                   for b in self.decoder.layers]
        try:
            yield probs
        finally:
            self.config._attn_implementation = saved
            for h in handles:
                h.remove()


class DetrAuxStack(DetrStack):
    """``DetrDecoder`` with ``auxiliary_loss=True``, called whole as ``DetrForObjectDetection`` trains it:
    each layer's output goes through the decoder's layernorm (which also feeds the next layer) and
    is stacked; the class head runs once on the stack, ``class_labels_classifier(intermediate)``
    (the auxiliary outputs). ONNX: Concat of every layer -> one MatMul + Add -> all_cls_scores."""

    stacked_head = True

    def __init__(self, attn: str, sizes: Sizes = Sizes(), seed: int = 0) -> None:
        super().__init__(attn, sizes, seed)
        self.name = f"detr-aux-{attn}"
        self.config.auxiliary_loss = True

    def forward(self, memory: Tensor, key_pos: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        query_pos = self.query_pos.weight.unsqueeze(0).expand(memory.shape[0], -1, -1)
        pixels = None if key_padding_mask is None else (~key_padding_mask).long()
        out = self.decoder(inputs_embeds=torch.zeros_like(query_pos), encoder_hidden_states=memory,
                           encoder_attention_mask=pixels, spatial_position_embeddings=key_pos,
                           object_queries_position_embeddings=query_pos)
        return self.class_labels_classifier(out.intermediate_hidden_states)          # [L, B, Nq, C]

    def layer(self, i: int, hidden: Tensor, keys: Keys) -> Tensor:
        return self.decoder.layernorm(super().layer(i, hidden, keys))

    def logits(self, i: int, hidden: Tensor) -> Tensor:
        return self.class_labels_classifier(hidden)


class DetrWholeModel(DetrStack):
    """The whole ``DetrForObjectDetection`` (a tiny ResNet backbone, the encoder, the decoder, the heads)
    exported from ``pixel_values`` (+ ``pixel_mask``) to its ``logits``: the last layer's class scores
    only, so earlier layers' logits are recomputed through the graph's own head. The layer loop
    repeats ``DetrModel.forward`` up to the decoder (``prepare``)."""

    final_only = True
    stride = 32                     # the ResNet's feature map is the image / 32: sizes.height x sizes.width keys

    def __init__(self, sizes: Sizes = Sizes(), seed: int = 0) -> None:
        nn.Module.__init__(self)
        from transformers import DetrForObjectDetection, ResNetConfig

        torch.manual_seed(seed)
        self.sizes, self.name = sizes, "detr-whole"
        backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                                out_features=["stage4"])
        self.config = _detr_config(sizes, "eager", backbone_config=backbone)
        self.detr = DetrForObjectDetection(self.config)
        self.decoder = self.detr.model.decoder
        self.query_pos = self.detr.model.query_position_embeddings
        self.class_labels_classifier = self.detr.class_labels_classifier
        for block in self.decoder.layers:      # the encoder's LayerNorm gives every memory token the same
            _scale_(block.encoder_attn.q_proj.weight, 48.0)       # norm: flat attention unless q/k are scaled
            _scale_(block.encoder_attn.k_proj.weight, 48.0)       # far more than the decoder-only stacks'
        _scale_(self.class_labels_classifier.weight, 4.0)
        self.eval()

    def example_inputs(self, batch: int, mask: bool, seed: int = 0) -> dict[str, Tensor]:
        gen = torch.Generator().manual_seed(seed)
        s = self.sizes
        inputs = {"pixel_values": torch.randn(batch, 3, s.height * self.stride, s.width * self.stride, generator=gen)}
        if mask:                    # padded image columns: whole feature-map columns, as _padding pads keys
            pad = _padding(batch, s).reshape(batch, s.height, s.width)
            pixels = pad.repeat_interleave(self.stride, 1).repeat_interleave(self.stride, 2)
            inputs["pixel_mask"] = (~pixels).long()
        return inputs

    def forward(self, pixel_values: Tensor, pixel_mask: Tensor | None = None) -> Tensor:   # type: ignore[override]
        return self.detr(pixel_values=pixel_values, pixel_mask=pixel_mask).logits            # [B, Nq, C]

    def prepare(self, inputs: dict[str, Tensor | None]) -> tuple[Tensor, Keys]:
        model, pixels = self.detr.model, inputs["pixel_values"]
        pixel_mask = inputs.get("pixel_mask")
        batch = pixels.shape[0]
        feature_map, mask = model.backbone(pixels, pixel_mask if pixel_mask is not None else
                                           torch.ones(batch, *pixels.shape[2:], dtype=torch.long))[-1]
        features = model.input_projection(feature_map).flatten(2).transpose(1, 2)
        pos = model.position_embedding(shape=feature_map.shape, device=pixels.device, dtype=pixels.dtype,
                                       mask=mask).flatten(2).transpose(1, 2)
        memory = model.encoder(inputs_embeds=features, attention_mask=mask.flatten(1),
                               spatial_position_embeddings=pos).last_hidden_state
        hidden = torch.zeros(batch, self.sizes.queries, self.sizes.embed)
        padding = None if pixel_mask is None else ~mask.flatten(1).bool()
        return hidden, Keys(memory, pos, padding)


class ConditionalDetrStack(DetrStack):
    """Hugging Face ``ConditionalDetrDecoder``: its cross-attention keys concatenate (per head) a
    content projection of the memory with a projection of the key position embedding (layer 0
    also adds that projection to the content), so each layer reads two per-key tensors.
    The loop repeats ``ConditionalDetrDecoder.forward`` (reference points, query sine embedding
    scaled by ``query_scale`` after the first layer)."""

    def __init__(self, attn: str, sizes: Sizes = Sizes(), seed: int = 0) -> None:
        nn.Module.__init__(self)
        from transformers.models.conditional_detr.modeling_conditional_detr import ConditionalDetrDecoder

        torch.manual_seed(seed)
        self.sizes, self.name = sizes, f"conditional-detr-{attn}"
        self.config = _detr_config(sizes, attn, "ConditionalDetrConfig")
        self.decoder = ConditionalDetrDecoder(self.config)
        self.query_pos = nn.Embedding(sizes.queries, sizes.embed)
        self.class_labels_classifier = nn.Linear(sizes.embed, sizes.classes)
        for block in self.decoder.layers:
            for proj in ("q_content_proj", "k_content_proj", "k_pos_proj", "q_pos_sine_proj"):
                _scale_(getattr(block.encoder_attn, proj).weight, 4.0)
        _scale_(self.class_labels_classifier.weight, 3.0)
        self.eval()

    def layer(self, i: int, hidden: Tensor, keys: Keys) -> Tensor:
        from transformers.models.conditional_detr.modeling_conditional_detr import \
            encode_sinusoidal_position_embedding

        query_pos = self.query_pos.weight.unsqueeze(0).expand(hidden.shape[0], -1, -1)
        centers = self.decoder.ref_point_head(query_pos).sigmoid()[..., :2]          # [B, Nq, 2]
        sine = encode_sinusoidal_position_embedding(centers, num_pos_feats=self.sizes.embed // 2)
        if i > 0:
            sine = sine * self.decoder.query_scale(hidden)
        return self.decoder.layers[i](hidden, None, keys.pos, query_pos, sine, keys.memory,
                                      encoder_attention_mask=self._encoder_mask(hidden, keys), is_first=i == 0)


# --------------------------------------------------------------------------- exports
MODELS = {
    "torch-bf": lambda: TorchStack(batch_first=True),
    "torch-sf": lambda: TorchStack(batch_first=False),
    "torch-weights": TorchPackedWeights,
    "detr-eager": lambda: DetrStack("eager"),
    "detr-sdpa": lambda: DetrStack("sdpa"),
    "conditional-detr": lambda: ConditionalDetrStack("sdpa"),
    "detr-aux-eager": lambda: DetrAuxStack("eager"),
    "detr-aux-sdpa": lambda: DetrAuxStack("sdpa"),
    "detr-whole": DetrWholeModel,
}


@functools.lru_cache(maxsize=None)
def model(name: str) -> ForeignDecoder:
    """The corpus module ``name`` (seed 0, eval), cached: do not modify it."""
    return MODELS[name]()


@functools.lru_cache(maxsize=None)
def exported(name: str, exporter: str, batch: int, mask: bool, dynamic: bool = False, simplify: bool = False,
             opset: int | None = None) -> Path:
    """Path of a cached plain ``torch.onnx.export`` of ``model(name)`` (read-only): static shapes, or
    with ``dynamic`` a symbolic batch axis on every input (``dynamic_axes`` / ``dynamic_shapes``);
    with ``simplify``, that export run through onnxsim; ``opset`` instead of the exporter's usual one."""
    if simplify:
        raw = exported(name, exporter, batch, mask, dynamic)
        return simplified(raw, f"{raw.stem}-sim")
    module = model(name)
    inputs = module.example_inputs(batch, mask)
    path = cache_dir() / (f"foreign-{name}-{exporter}-b{batch}-{'mask' if mask else 'nomask'}{'-dyn' * dynamic}"
                          f"{f'-opset{opset}' if opset else ''}.onnx")
    output = "logits" if getattr(module, "final_only", False) else "all_cls_scores"
    kwargs: dict[str, Any] = dict(input_names=list(inputs), output_names=[output],
                                  opset_version=opset or EXPORTERS[exporter])
    if exporter == "dynamo":
        kwargs.update(dynamo=True, external_data=False, verbose=False, report=False, verify=False)
        if dynamic:
            batch_dim = torch.export.Dim("batch", min=1, max=8)
            kwargs.update(dynamic_shapes={k: {0: batch_dim} for k in inputs})
    else:
        kwargs.update(dynamo=False)
        if dynamic:
            kwargs.update(dynamic_axes={k: {0: "batch"} for k in inputs})
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)      # TorchScript cannot export aten::_native_multi_head_attention
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, tuple(inputs.values()), str(path), **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return path


def with_queries(module: ForeignDecoder, kept: list[int]) -> ForeignDecoder:
    """A copy of ``module`` that has only the queries ``kept`` (ascending): the learned query
    embedding sliced, everything else shared. GPQ's graph must compute exactly this."""
    import copy

    small = copy.copy(module)                    # shallow: shares every layer and head
    small._parameters = dict(module._parameters)
    small._modules = dict(module._modules)
    small.sizes = replace(module.sizes, queries=len(kept))
    index = torch.tensor(kept)
    if isinstance(getattr(module, "query", None), nn.Parameter):              # nn.TransformerDecoder stacks
        small.query = nn.Parameter(module.query.detach()[index])
    else:                                                                      # DETR: query_position_embeddings
        small.query_pos = nn.Embedding.from_pretrained(module.query_pos.weight.detach()[index])
    return small
