"""Lazy imports of optional dependencies, failing with the extra that provides them."""
from __future__ import annotations

import importlib
from types import ModuleType

from edgeprune.errors import DependencyError

# module name -> (pip extra, what needs it)
_EXTRAS = {
    "torch": ("export", "exporting models (pip install torch==2.13.0 first)"),
    "onnx": ("rewrite", "reading and writing ONNX graphs"),
    "onnx_graphsurgeon": ("rewrite", "graph rewrites"),
    "onnxruntime": ("runtime", "running models"),
    "onnxsim": ("simplify", "simplifying exported graphs"),
    "onnxscript": ("export", "the dynamo exporter"),
    "onnxconverter_common": ("rewrite", "fp16 conversion"),
    "paramiko": ("remote", "benchmarking on a board over SSH"),
    "matplotlib": ("plot", "--plot"),
    "tqdm": ("progress", "progress bars"),
}


def require(module: str) -> ModuleType:
    """Import ``module`` or raise a DependencyError naming the pip extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        _reraise_interrupt(exc)
        extra, why = _EXTRAS.get(module.split(".")[0], ("all", "this feature"))
        raise DependencyError(
            f"{module} is needed for {why} but is not installed ({exc}); "
            f"install it with: pip install 'edgeprune[{extra}]'"
        ) from exc


def _reraise_interrupt(exc: BaseException) -> None:
    """A Ctrl-C or SIGTERM that lands while a C extension initialises (pybind11 reports it as
    ``ImportError: initialization failed`` caused by the interrupt) is the interrupt, not a
    missing package: raise it again so the command stops and cleans up as it would anywhere."""
    cause = exc.__cause__ or exc.__context__
    while cause is not None:
        if isinstance(cause, KeyboardInterrupt):
            raise cause
        cause = cause.__cause__ or cause.__context__


def available(module: str) -> bool:
    """True when ``module`` can be imported."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        _reraise_interrupt(exc)
        return False
    return True
