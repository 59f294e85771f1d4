"""``--precision fp32|fp16|both``: which variants of each model are benchmarked.

fp16 copies come from the rewrite's fp16 pass (``edgeprune.passes.precision.fp16.convert_fp16``, the
same conversion as ``edgeprune rewrite --precision fp16``; imported lazily because it needs
onnx) and are written to a work directory that the caller removes after the benchmark
(:func:`edgeprune.runners.bench.benchmark` uses a temporary directory). Without a
``--precision`` the given files run unchanged (this path needs no ``onnx``, so it works on a
board with only the runtime install).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from edgeprune._lazy import available
from edgeprune.errors import ModelNotFoundError, ParameterError
from edgeprune.runners.results import ModelSpec

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "both")
_FLOAT16 = 10   # onnx.TensorProto.FLOAT16


def model_precision(path: str | Path) -> str:
    """"fp16" when any initializer, graph input or output is float16, else "fp32".

    The same rule as ``edgeprune.passes.precision.fp16.is_fp16`` (which refuses to convert such a model
    again), read without loading external weight data.
    """
    from edgeprune.graph.files import load_model    # one-line errors, protobuf whatever the suffix

    graph = load_model(path, load_external_data=False).graph
    if any(init.data_type == _FLOAT16 for init in graph.initializer):
        return "fp16"
    io = list(graph.input) + list(graph.output)
    return "fp16" if any(v.type.tensor_type.elem_type == _FLOAT16 for v in io) else "fp32"


def convert_to_fp16(src: Path, dst: Path) -> Path:
    """Write the fp16 conversion of ``src`` to ``dst`` (external data when too big for protobuf)."""
    from edgeprune.graph.files import load_model, save_onnx     # need onnx: imported only when converting
    from edgeprune.passes.precision.fp16 import convert_fp16

    save_onnx(convert_fp16(load_model(src)), dst)
    log.info("converted %s to fp16: %s", src, dst)
    return dst


def _unique_names(paths: Sequence[Path]) -> list[str]:
    names: list[str] = []
    for p in paths:
        name, i = p.stem, 2
        while name in names:
            name, i = f"{p.stem}#{i}", i + 1
        names.append(name)
    return names


def _variants(path: Path, name: str, precision: str, workdir: Path) -> list[ModelSpec]:
    actual = model_precision(path)
    if precision == "fp32" and actual == "fp16":
        raise ParameterError(f"{path} is already fp16 and cannot be turned back into fp32; "
                             "drop --precision or use --precision fp16")
    if precision == "both" and actual == "fp16":
        raise ParameterError(f"{path} is already fp16; --precision both needs the fp32 model "
                             "(give the fp32 file, or use --precision fp16)")
    if precision == "fp32":
        return [ModelSpec(name, str(path), "fp32")]
    if actual == "fp16":
        return [ModelSpec(name, str(path), "fp16")]
    fp16 = convert_to_fp16(path, workdir / f"{name.replace('#', '_')}.fp16.onnx")
    if precision == "fp16":
        return [ModelSpec(name, str(fp16), "fp16", source=str(path))]
    return [ModelSpec(f"{name}-fp32", str(path), "fp32"),
            ModelSpec(f"{name}-fp16", str(fp16), "fp16", source=str(path))]


def plan_models(paths: Sequence[str | Path], precision: str | None, workdir: Path) -> list[ModelSpec]:
    """Model variants in benchmark order (the first is the speedup baseline).

    ``both`` gives ``m1-fp32, m1-fp16, m2-fp32, m2-fp16, ...``.
    """
    if precision is not None and precision not in PRECISIONS:
        raise ParameterError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    files = [Path(p) for p in paths]
    if not files:
        raise ParameterError("no model given; pass one or more MODEL.onnx files")
    for f in files:
        if not f.is_file():
            raise ModelNotFoundError(f"model file {f} does not exist; give the path of an .onnx file")
    names = _unique_names(files)
    if precision is None:
        # Run the files as given; label their precision only when onnx can tell (host side).
        label = model_precision if available("onnx") else (lambda _p: None)
        return [ModelSpec(n, str(f), label(f)) for n, f in zip(names, files)]
    specs: list[ModelSpec] = []
    for n, f in zip(names, files):
        specs += _variants(f, n, precision, workdir)
    return specs
