"""``--precision fp32|fp16|int8|int8-dynamic|both|all``: which variants of each model are benchmarked.

Converted copies come from the rewrite's precision passes (the same conversions as
``edgeprune rewrite --precision ...``; imported lazily because they need onnx):
``edgeprune.passes.precision.fp16.convert_fp16`` and ``edgeprune.passes.precision.int8.quantize_int8``.
They are written to a work directory that the caller removes after the benchmark
(:func:`edgeprune.runners.bench.benchmark` uses a temporary directory). ``both`` is fp32 +
fp16, ``all`` is fp32 + fp16 + int8 + int8-dynamic. Without a ``--precision`` the given
files run unchanged (this path needs no ``onnx``, so it works on a board with only the
runtime install).

Static int8 needs calibration inputs; bench calibrates on the inputs it times: the
``--inputs X.npz`` arrays when given (one sample ``[B, ...]`` or several ``[S, B, ...]``),
else :data:`BENCH_CALIBRATION_RUNS` seeded random feeds drawn like the timing inputs
(``--seed``). That is enough to time the int8 kernels (the scales do not change the work);
for an int8 model to use, calibrate on real inputs with ``edgeprune rewrite --precision int8
--calib X.npz`` (or ``--data DIR``) and bench that file.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from edgeprune._lazy import available
from edgeprune.errors import ModelNotFoundError, ParameterError
from edgeprune.runners.results import ModelSpec

log = logging.getLogger(__name__)

CONVERSIONS = ("fp32", "fp16", "int8", "int8-dynamic")
EXPANSIONS: dict[str, tuple[str, ...]] = {"both": ("fp32", "fp16"), "all": CONVERSIONS}
PRECISIONS = CONVERSIONS + tuple(EXPANSIONS)
BENCH_CALIBRATION_RUNS = 2
_FLOAT16 = 10   # onnx.TensorProto.FLOAT16


def model_precision(path: str | Path) -> str:
    """"int8" with quantization ops, "fp16" when any initializer, graph input or output is
    float16, else "fp32".

    The same rules as ``edgeprune.passes.precision.fp16.is_fp16`` and ``int8.is_quantized``
    (which refuse to convert such a model again), read without loading external weight data.
    """
    from edgeprune.graph.files import load_model    # one-line errors, protobuf whatever the suffix
    from edgeprune.graph.ops import QUANTIZED_OPS

    graph = load_model(path, load_external_data=False).graph
    if any(n.op_type in QUANTIZED_OPS for n in graph.node):
        return "int8"
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


def bench_calibration(model: Any, npz: str | None, seed: int) -> list[dict[str, Any]]:
    """Calibration feeds for static int8 in bench: ``npz``'s arrays, else seeded random feeds."""
    from edgeprune.graph.run import cpu_session
    from edgeprune.passes.queries.inputs import calibration_samples, load_calibration
    from edgeprune.passes.verify import random_inputs

    if npz is not None:
        return calibration_samples(model, load_calibration(npz))
    sess = cpu_session(model, optimize=False)
    return [random_inputs(sess, seed + i) for i in range(BENCH_CALIBRATION_RUNS)]


def convert_to_int8(src: Path, dst: Path, dynamic: bool, npz: str | None = None, seed: int = 0) -> Path:
    """Write the int8 quantization of ``src`` to ``dst`` (static: calibrated per :func:`bench_calibration`)."""
    from dataclasses import replace

    from edgeprune.graph.files import load_model, save_onnx
    from edgeprune.passes.precision.int8 import DEFAULT_CONFIG, quantize_int8, summary

    model = load_model(src)
    config = replace(DEFAULT_CONFIG, dynamic=dynamic)
    feeds = None if dynamic else bench_calibration(model, npz, seed)
    if feeds is not None:
        log.info("int8 of %s: calibrated on %s (timing only; for accuracy calibrate with edgeprune rewrite "
                 "--precision int8 --calib X.npz)", src, f"--inputs {npz}" if npz else
                 f"{len(feeds)} random feeds (seed {seed})")
    quantized, kept = quantize_int8(model, config, feeds)
    save_onnx(quantized, dst)
    log.info("%s", summary(kept, config, quantized, len(feeds or ())))
    return dst


def _unique_names(paths: Sequence[Path]) -> list[str]:
    names: list[str] = []
    for p in paths:
        name, i = p.stem, 2
        while name in names:
            name, i = f"{p.stem}#{i}", i + 1
        names.append(name)
    return names


def _convert(path: Path, precision: str, dst: Path, npz: str | None, seed: int) -> Path:
    if precision == "fp16":
        return convert_to_fp16(path, dst)
    return convert_to_int8(path, dst, dynamic=precision == "int8-dynamic", npz=npz, seed=seed)


def _variants(path: Path, name: str, precision: str, workdir: Path, npz: str | None, seed: int) -> list[ModelSpec]:
    actual = model_precision(path)
    wanted = EXPANSIONS.get(precision, (precision,))
    if actual != "fp32":
        if wanted == (actual,) or (actual == "int8" and wanted == ("int8-dynamic",)):
            return [ModelSpec(name, str(path), actual)]
        raise ParameterError(f"{path} is already {actual}; --precision {precision} needs the fp32 model "
                             f"(give the fp32 file, or drop --precision)")
    specs = []
    for p in wanted:
        label = name if len(wanted) == 1 else f"{name}-{p}"
        if p == "fp32":
            specs.append(ModelSpec(label, str(path), "fp32"))
            continue
        converted = _convert(path, p, workdir / f"{name.replace('#', '_')}.{p}.onnx", npz, seed)
        specs.append(ModelSpec(label, str(converted), p, source=str(path)))
    return specs


def plan_models(paths: Sequence[str | Path], precision: str | None, workdir: Path, *,
                calib_npz: str | None = None, seed: int = 0) -> list[ModelSpec]:
    """Model variants in benchmark order (the first is the speedup baseline).

    ``both`` gives ``m1-fp32, m1-fp16, m2-fp32, m2-fp16, ...``; ``all`` adds ``-int8`` and
    ``-int8-dynamic`` after each model's fp16. ``calib_npz``/``seed``: static int8's calibration
    inputs (see the module docstring).
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
        specs += _variants(f, n, precision, workdir, calib_npz, seed)
    return specs
