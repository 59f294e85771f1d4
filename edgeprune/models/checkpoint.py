"""Load trained weights into a built model (``edgeprune export --checkpoint PATH``).

Expected file: ``torch.save(model.state_dict(), PATH)`` of a model from
:func:`edgeprune.models.build.build_model` with the same preset and scope, or a dict holding
such a state dict under ``"state_dict"`` (the layout of mmdet-style training checkpoints).
Key names are module paths:

- ``head.*`` (both scopes) -- the PETRHead:
  ``head.reference_points.weight`` ``[Nq, 3]``;
  ``head.query_embedding.{0,2}.{weight,bias}``;
  ``head.layers.<l>.self_attn.{in_proj_weight,in_proj_bias,out_proj.weight,out_proj.bias}``,
  the same for ``cross_attn``; ``head.layers.<l>.ffn.{0,2}.{weight,bias}``;
  ``head.layers.<l>.norms.{0,1,2}.{weight,bias}``; ``head.post_norm.{weight,bias}``;
  ``head.cls_branch.{0,1,3,4,6}.*`` (Linear, LayerNorm, ReLU skipped ...);
  ``head.reg_branch.{0,2,4}.*``.
- ``backbone.*`` (scope full) -- ResNet in the torchvision layout: ``backbone.conv1.weight``,
  ``backbone.bn1.{weight,bias,running_mean,running_var,num_batches_tracked}``,
  ``backbone.layer<1-4>.<i>.{conv1,bn1,conv2,bn2[,conv3,bn3]}.*``,
  ``backbone.layer<s>.0.downsample.{0,1}.*``.
- ``neck.*`` (scope full) -- ``neck.lateral_c4``, ``neck.lateral_c5``, ``neck.fpn_conv``
  (``.weight``, ``.bias``).
- ``position_encoder.*`` (scope full) -- ``position_encoder.{0,2}.{weight,bias}``, PETR's names.

``*.num_batches_tracked`` may be absent (unused at inference). The rig's frustum coordinates
are derived, not stored. Anything else missing, unexpected or of the wrong shape is a
:class:`CheckpointError` naming the counts and the first few keys. To see the names for a
preset: ``list(build_model(preset, scope).state_dict())``.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from edgeprune.errors import CheckpointError, ModelNotFoundError

log = logging.getLogger(__name__)

_SHOWN = 3            # keys named per category in an error message
_OPTIONAL_SUFFIX = ".num_batches_tracked"


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read ``path`` as a state dict (weights only, no code executed)."""
    file = Path(path)
    if not file.is_file():
        what = "is a directory" if file.is_dir() else "does not exist"
        raise ModelNotFoundError(f"checkpoint {file} {what}; give the file written by "
                                 "torch.save(model.state_dict(), PATH)")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    # torch.load on arbitrary bytes fails with arbitrary types (UnpicklingError, RuntimeError,
    # IndexError, EOFError ...); every one means "not a state dict file" and is chained, not hidden.
    except Exception as exc:  # noqa: BLE001
        detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise CheckpointError(f"checkpoint {file} is not a torch state dict file (torch.load failed: "
                              f"{type(exc).__name__} {detail}); "
                              "save one with torch.save(model.state_dict(), PATH)") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise CheckpointError(f"checkpoint {file} holds a {type(obj).__name__}, not a state dict of "
                              "name -> tensor; save one with torch.save(model.state_dict(), PATH)")
    return dict(obj)


def _shown(keys: list[str]) -> str:
    more = f", ... {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def mismatch_report(model: nn.Module, state: Mapping[str, Tensor]) -> str | None:
    """One line describing how ``state`` does not fit ``model``, or None when it fits."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(_OPTIONAL_SUFFIX)]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} (checkpoint {list(state[k].shape)} vs model {list(v.shape)})"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_shown(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_shown(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches ({_shown(shapes)})")
    return "; ".join(parts) + _hint(expected, state, missing, unexpected)


def _hint(expected: Mapping[str, Tensor], state: Mapping[str, Tensor], missing: list[str],
          unexpected: list[str]) -> str:
    """Name the common causes: a wrapper prefix (``module.``), another depth, the wrong scope."""
    heads = {k.split(".", 1)[0] for k in unexpected}
    if len(heads) == 1 and all("." in k and k.split(".", 1)[1] in expected for k in unexpected):
        return f"; the checkpoint's keys carry an extra prefix {heads.pop() + '.'!r}: strip it"
    ckpt_layers, model_layers = _num_layers(state), _num_layers(expected)
    if ckpt_layers and ckpt_layers != model_layers:
        return f"; the checkpoint has {ckpt_layers} decoder layers, the model {model_layers}"
    if missing and not unexpected and not any(k.startswith("head.") for k in missing):
        return "; it holds only the head: a decoder-scope checkpoint needs --scope decoder"
    if unexpected and not missing and not any(k.startswith("head.") for k in unexpected):
        return "; it holds a whole model: use --scope full"
    return ""


def _num_layers(keys: Iterable[str]) -> int:
    """Decoder layers named in ``keys`` (``head.layers.<l>.*``)."""
    return len({k.split(".")[2] for k in keys if k.startswith("head.layers.")})


WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def shipped_weights_path(name: str) -> Path:
    """The file of trained weights ``name`` shipped in the package (``edgeprune/models/weights``)."""
    path = WEIGHTS_DIR / name
    if not path.is_file():
        raise ModelNotFoundError(f"the shipped weights {name} are missing from {WEIGHTS_DIR}; reinstall edgeprune, "
                                 "or pass --checkpoint PATH (train one with edgeprune train-demo)")
    return path


def load_shipped_weights(model: nn.Module, name: str) -> nn.Module:
    """Load shipped whole-model weights (stored in fp16 to keep the wheel small; loaded as fp32).

    A decoder-scope model takes the ``head.*`` part of them.
    """
    state = read_state_dict(shipped_weights_path(name))
    if getattr(model, "scope", "") == "decoder":
        state = {k: v for k, v in state.items() if k.startswith("head.")}
    return load_checkpoint(model, shipped_weights_path(name), state)


def load_checkpoint(model: nn.Module, path: str | os.PathLike,
                    state: Mapping[str, Tensor] | None = None) -> nn.Module:
    """Load the state dict at ``path`` (or ``state``, read from it) into ``model`` (strict); return ``model``.

    Tensors of another floating dtype (an fp16 checkpoint) are cast to the model's.
    """
    state = read_state_dict(path) if state is None else state
    problem = mismatch_report(model, state)
    if problem is not None:
        name = getattr(getattr(model, "preset", None), "name", type(model).__name__)
        scope = getattr(model, "scope", "")
        raise CheckpointError(f"checkpoint {path} does not fit {name}"
                              f"{f' (scope {scope})' if scope else ''}: {problem}; expected keys are "
                              "module paths like head.*, backbone.*, neck.*, position_encoder.* "
                              "(see edgeprune.models.checkpoint)")
    model.load_state_dict(state, strict=True)
    log.info("loaded %d tensors from %s", len(state), path)
    return model
