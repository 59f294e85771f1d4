"""Reading and writing ONNX files: one loader with one-line errors, one saver with one size rule.

Protobuf cannot serialize a message of 2 GiB or more, so a model whose weights come close is
written with its weights in ``<file>.data`` beside it. Every writer in edgeprune (export,
rewrite, bench's precision conversions) calls :func:`save_onnx`, so they agree on the limit.
Callers write to a temporary path and rename it (``edgeprune.io.atomic_path``); ``final_name``
names the data file after the file the user will see.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edgeprune import _lazy
from edgeprune.errors import InvalidModelError, ModelNotFoundError
from edgeprune.graph.values import model_nbytes
from edgeprune.io import check_input_file

PROTOBUF_LIMIT = 2**31 - 1                 # bytes: protobuf's hard limit for one message
EXTERNAL_DATA_MARGIN = 2**26              # bytes kept free for nodes and names beside the weights
EXTERNAL_DATA_THRESHOLD = 1024             # tensors at least this big go to the data file
MAX_MODEL_FILE_BYTES = 2**31               # an .onnx file past protobuf's limit is not a model (weights: .data)


def needs_external_data(model: Any) -> bool:
    """True when ``model``'s weights are too big to serialize in one protobuf message."""
    return model_nbytes(model) > PROTOBUF_LIMIT - EXTERNAL_DATA_MARGIN


def save_onnx(model: Any, path: str | os.PathLike, final_name: str | None = None,
              external: bool | None = None) -> str | None:
    """Write ``model`` to ``path``; returns the external data file's name, or None.

    ``external=None`` decides by size (:func:`needs_external_data`); the data file is named
    ``<final_name>.data`` (default: ``path``'s own name) and written beside ``path``.
    """
    onnx = _lazy.require("onnx")
    use_external = needs_external_data(model) if external is None else external
    if not use_external:
        onnx.save_model(model, str(path))
        return None
    location = f"{final_name or Path(path).name}.data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=EXTERNAL_DATA_THRESHOLD)
    return location


def load_model(path: str | os.PathLike, load_external_data: bool = True) -> Any:
    """``onnx.load`` with one-line user errors for a missing, empty, corrupt or special file.

    Always parsed as protobuf: ``onnx.load`` picks a JSON or text parser by the file's
    extension, so ``model.json`` would fail with a UnicodeDecodeError. A FIFO or device is
    refused before it is opened (it would block or never end), and a file over protobuf's
    2 GB limit cannot be an ONNX model.
    """
    onnx = _lazy.require("onnx")
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"model file {p} does not exist; give the path of an .onnx file")
    if p.is_dir():
        raise ModelNotFoundError(f"{p} is a directory; give the path of an .onnx file")
    check_input_file(p, "model", max_bytes=MAX_MODEL_FILE_BYTES)
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(p), format="protobuf", load_external_data=load_external_data)
    except (DecodeError, OSError, ValueError, RuntimeError, onnx.checker.ValidationError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidModelError(f"cannot read {p} as ONNX ({first}); re-export the model or check the file") from exc
    if not model.graph.node or not model.opset_import:
        raise InvalidModelError(f"{p} is not an ONNX model (no graph nodes or opset); re-export the model")
    return model
