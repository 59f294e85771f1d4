"""torch -> ONNX export with validation, simplification and a recorded decoder map.

Public API (imported lazily so that ``edgeprune.export.decoder_map`` works without torch):

- :func:`export_onnx` -> :class:`ExportReport` (``edgeprune.export.exporter``)
- :class:`ValidationReport`, :func:`compare_outputs` (``edgeprune.export.validate``)
- :class:`DecoderMap`, :func:`read_decoder_map`, :func:`write_decoder_map`
  (``edgeprune.export.decoder_map``)
- :func:`simplify_model` (``edgeprune.export.simplify``)
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "export_onnx": "exporter", "ExportReport": "exporter", "resolve_options": "exporter",
    "EXPORTERS": "exporter", "DEFAULT_OPSET": "exporter",
    "ValidationReport": "validate", "OutputCheck": "validate", "compare_outputs": "validate",
    "ExportValidationError": "validate", "DEFAULT_TOLERANCE": "validate",
    "DecoderMap": "decoder_map", "LayerMap": "decoder_map", "TensorRef": "decoder_map",
    "QueryTensor": "decoder_map", "read_decoder_map": "decoder_map", "write_decoder_map": "decoder_map",
    "DECODER_MAP_KEY": "decoder_map",
    "simplify_model": "simplify", "SimplifyResult": "simplify",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'edgeprune.export' has no attribute {name!r}")
    return getattr(importlib.import_module(f"edgeprune.export.{_WHERE[name]}"), name)
