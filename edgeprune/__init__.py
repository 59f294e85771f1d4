"""edgeprune: PETR-family 3D detectors from PyTorch to fast ONNX models on edge boards.

Pipeline, one subpackage each:
``models`` (reference torch models) -> ``export`` (torch -> ONNX, validated) ->
``passes`` (graph rewrites: tgGBC, GPQ, fp16, ToMe) -> ``runners`` (ONNX Runtime timing)
-> ``devices`` (where runners run: this machine or a board over SSH).
``methods`` holds the PyTorch reference implementations of the pruning methods, the
oracles every graph pass is tested against.
"""
from __future__ import annotations

__version__ = "0.1.0"
