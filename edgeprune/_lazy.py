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
        extra, why = _EXTRAS.get(module.split(".")[0], ("all", "this feature"))
        raise DependencyError(
            f"{module} is needed for {why} but is not installed ({exc}); "
            f"install it with: pip install 'edgeprune[{extra}]'"
        ) from exc


def available(module: str) -> bool:
    """True when ``module`` can be imported."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
