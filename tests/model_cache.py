"""Exports of edgeprune decoders shared by the pass tests, made once per test session.

Exporting is the slow part of the pass tests (a 24000-key decoder takes seconds per export),
so every (preset, exporter, batch, layers, attention, simplify) combination is exported at
most once per pytest process, into the session's directory :func:`cache_dir` (conftest's
``session_model_cache`` fixture points it under pytest's ``tmp_path_factory``, so the files go
with pytest's other temporary files; outside pytest a temporary directory removed at exit)::

    from model_cache import decoder_model, exported_decoder        # tests/ is on sys.path
    path = exported_decoder("streampetr-vov-1600x640", "dynamo", batch=2, layers=2)   # read-only
    model = decoder_model("streampetr-vov-1600x640", layers=2)     # the torch module exported

The files are plain ``torch.onnx.export`` graphs (TorchScript opset 17, dynamo opset 18, static
shapes, input names ``model.input_names()``, outputs ``all_cls_scores`` / ``all_bbox_preds``),
optionally run through onnxsim: what a user's own export script produces, so passes must find
the decoder by matching. Copy a file before editing it.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import io
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

EXPORTERS = ("torchscript", "dynamo")
OPSET = {"torchscript": 17, "dynamo": 18}


_directory: list[Path] = []          # set once per test session by use_directory()


def use_directory(path: Path) -> None:
    """Export into ``path`` (the test session's directory) from now on; set before any export."""
    if _directory and _directory[0] != path:
        raise RuntimeError(f"the model cache already exports into {_directory[0]}")
    _directory[:] = [path]


def cache_dir() -> Path:
    """The session's export directory: the one given to :func:`use_directory`, else a temporary
    directory removed when the process exits (a script importing this module)."""
    if not _directory:
        path = Path(tempfile.mkdtemp(prefix="edgeprune-model-cache-"))
        atexit.register(shutil.rmtree, path, True)
        _directory.append(path)
    return _directory[0]


@functools.lru_cache(maxsize=None)
def decoder_model(preset: str, layers: Optional[int] = None, attention: str = "manual") -> Any:
    """``build_model(preset, "decoder", num_layers=layers, attention=attention)`` (seed 0, eval), cached.

    The same object is returned on every call: do not modify it.
    """
    from edgeprune.models.build import build_model

    return build_model(preset, "decoder", num_layers=layers, attention=attention)


@functools.lru_cache(maxsize=None)
def exported_decoder(preset: str, exporter: str, batch: int = 1, layers: Optional[int] = None,
                     attention: str = "manual", simplify: bool = False) -> Path:
    """Path of the ONNX export of :func:`decoder_model` at ``batch`` (static shapes), cached."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    stem = f"{preset}-{exporter}-b{batch}-L{layers or 'all'}-{attention}"
    if simplify:
        return simplified(exported_decoder(preset, exporter, batch, layers, attention), f"{stem}-sim")
    path = cache_dir() / f"{stem}.onnx"
    model = decoder_model(preset, layers, attention)
    _export(model, model.example_inputs(batch=batch, seed=0), path, exporter)
    return path


def _export(module: Any, inputs: dict, path: Path, exporter: str) -> None:
    import torch

    kwargs: dict = dict(input_names=list(inputs), output_names=list(module.output_names()),
                        opset_version=OPSET[exporter])
    if exporter == "dynamo":
        kwargs.update(dynamo=True, external_data=False, verbose=False, report=False, verify=False)
    else:
        kwargs.update(dynamo=False)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(inputs.values()), str(path), **kwargs)


def simplified(raw: Path, stem: str) -> Path:
    """``raw`` run through onnxsim, saved in the cache as ``stem``.onnx (as users often do before handing a graph over)."""
    import onnx
    import onnxsim

    model, ok = onnxsim.simplify(onnx.load(str(raw)))
    if not ok:
        raise RuntimeError(f"onnxsim could not validate the simplified {raw.name}")
    path = cache_dir() / f"{stem}.onnx"
    onnx.save(model, str(path))
    return path
