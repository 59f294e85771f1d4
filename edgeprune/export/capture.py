"""Expose a decoder's internal tensors as extra outputs of the exported graph.

The decoder map must name tensors that survive onnxsim. Graph output names always do, so
the exporter exports :class:`StructureCapture` (the model plus extra outputs called
``edgeprune.l{l}.cross_attn_probs`` etc.), simplifies, and only then demotes the extras to
intermediate tensors. The extras are read with forward hooks, so the model needs no
export-only code path:

- a pre-hook on ``model.head`` gives ``memory``, ``key_pos`` and ``key_padding_mask``;
- a hook on ``model.head`` gives its ``HeadOutput`` (``cross_attn_probs``, ``layer_logits``);
- a pre-hook on each ``head.layers[l].cross_attn`` gives the key and value it projects.

An extra that is the very tensor object of a graph input, a main output or an earlier extra
is not exported again; the plan records it as an alias (the exporter knows its name).
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from edgeprune.errors import InternalError
from edgeprune.export.record import GLOBAL_ROLES, LAYER_ROLES, HeadFacts, PlannedExtra, extra_name

log = logging.getLogger(__name__)


def _bind(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Call arguments by parameter name (the head is called with keywords, attention positionally)."""
    return dict(inspect.signature(fn).bind(*args, **kwargs).arguments)


def cross_attention_modules(head: nn.Module) -> list[nn.Module] | None:
    """``head.layers[l].cross_attn`` for every layer, or None if the head is laid out differently."""
    layers = getattr(head, "layers", None)
    if layers is None:
        return None
    mods = [getattr(layer, "cross_attn", None) for layer in layers]
    return None if any(m is None for m in mods) else mods  # type: ignore[return-value]


class StructureCapture(nn.Module):
    """``model`` returning its outputs followed by the planned extra tensors.

    Use as a context manager (hooks are removed on exit); call :meth:`plan` once eagerly
    before exporting so the output list is fixed.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        # torch.onnx.export restores the wrapper's own mode afterwards, recursively: a
        # wrapper left in training mode would switch BatchNorm to batch statistics.
        self.train(model.training)
        self._seen: dict[str, Any] = {}
        self._handles: list[Any] = []
        self._plan: tuple[PlannedExtra, ...] | None = None

    # ------------------------------------------------------------------ hooks
    def __enter__(self) -> "StructureCapture":
        head = getattr(self.model, "head", None)
        if head is None:
            log.warning("model has no .head: no decoder structure will be recorded")
            return self
        self._handles.append(head.register_forward_pre_hook(self._head_inputs, with_kwargs=True))
        self._handles.append(head.register_forward_hook(self._head_output))
        attns = cross_attention_modules(head)
        if attns is None:
            log.warning("head has no layers[l].cross_attn: key/value projection inputs will not be recorded")
        for index, attn in enumerate(attns or ()):
            hook = self._attention_hook(index, attn)
            self._handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _head_inputs(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        bound = _bind(module.forward, args, kwargs)
        for role in GLOBAL_ROLES:
            self._seen[extra_name(role)] = bound.get(role)

    def _head_output(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        probs = getattr(output, "cross_attn_probs", None) or []
        logits = getattr(output, "layer_logits", None) or []
        self._seen["num_layers"] = len(logits)
        for index, tensor in enumerate(logits):
            self._seen[extra_name("logits", index)] = tensor
        for index, tensor in enumerate(probs):
            self._seen[extra_name("cross_attn_probs", index)] = tensor

    def _attention_hook(self, index: int, attn: nn.Module) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            bound = _bind(attn.forward, args, kwargs)
            self._seen[extra_name("key_input", index)] = bound.get("key")
            self._seen[extra_name("value_input", index)] = bound.get("value")
        return hook

    # --------------------------------------------------------------- planning
    def _extras(self) -> list[tuple[str, Tensor | None]]:
        """(name, tensor) of every extra the last forward saw, globals first, then per layer."""
        items = [(extra_name(role), self._seen.get(extra_name(role))) for role in GLOBAL_ROLES]
        for index in range(int(self._seen.get("num_layers", 0))):
            items += [(extra_name(role, index), self._seen.get(extra_name(role, index))) for role in LAYER_ROLES]
        return items

    def plan(self, inputs: dict[str, Tensor],
             output_names: Sequence[str]) -> tuple[tuple[PlannedExtra, ...], tuple[Tensor, ...]]:
        """Run once eagerly and decide which extras become graph outputs and which are aliases.

        Returns the plan and the model's own outputs on ``inputs`` (a free reference).
        """
        self._seen.clear()
        with torch.no_grad():
            outputs = tuple(self.model(*inputs.values()))
        if getattr(self.model, "head", None) is None:
            self._plan = ()
            return self._plan, outputs
        known: dict[int, str] = {id(t): n for n, t in inputs.items()}
        known.update({id(t): n for n, t in zip(output_names, outputs)})
        planned = []
        for name, tensor in self._extras():
            if not isinstance(tensor, Tensor):
                planned.append(PlannedExtra(name, "absent"))
            elif id(tensor) in known:
                planned.append(PlannedExtra(name, "alias", known[id(tensor)], tuple(tensor.shape)))
            else:
                known[id(tensor)] = name
                planned.append(PlannedExtra(name, "output", None, tuple(tensor.shape)))
        self._plan = tuple(planned)
        return self._plan, tuple(outputs)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        if self._plan is None:
            raise InternalError("StructureCapture.plan() must run before the export traces forward()")
        self._seen.clear()
        outputs = tuple(self.model(*inputs))
        extras = tuple(self._seen[p.name] for p in self._plan if p.kind == "output")
        return outputs + extras


def describe_head(model: nn.Module) -> HeadFacts:
    """Read the head's configuration (``head.cfg``, a DecoderConfig) when it has one."""
    cfg = getattr(getattr(model, "head", None), "cfg", None)
    preset = getattr(model, "preset", None)
    scope = str(getattr(model, "scope", "") or "decoder")
    if cfg is None:
        attns = cross_attention_modules(getattr(model, "head", nn.Module())) or []
        heads = {int(getattr(a, "num_heads", 0) or getattr(getattr(a, "mha", None), "num_heads", 0)) for a in attns}
        return HeadFacts(heads.pop() if len(heads) == 1 and 0 not in heads else None, None,
                         _attention_kind(attns), scope, getattr(preset, "name", None), ())
    dims = (cfg.embed_dims, cfg.ffn_dims, cfg.num_classes, cfg.code_size, cfg.num_heads,
            cfg.embed_dims // cfg.num_heads, cfg.memory_len, cfg.num_propagated)
    return HeadFacts(cfg.num_heads, cfg.num_queries, cfg.attention, scope, getattr(preset, "name", None),
                     tuple(d for d in dims if d))


def _attention_kind(attns: list[nn.Module]) -> str:
    kinds = {"torch" if (hasattr(a, "mha") or isinstance(a, nn.MultiheadAttention)) else
             "manual" if hasattr(a, "in_proj_weight") else "unknown" for a in attns}
    return kinds.pop() if len(kinds) == 1 else "unknown"
