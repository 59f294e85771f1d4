"""Timing ONNX models with ONNX Runtime, and the statistics and reports of those timings.

* ``local``: :class:`LocalRunner`, the board agent (``edgeprune/devices/agent.py``) run in
  this process; remote boards use the SSH runner of ``edgeprune.devices`` with the same
  ``run(request) -> result`` interface.
* ``bench``: options -> agent request -> runner -> :class:`BenchReport` (what the CLI calls).
* ``precision``: fp32/fp16 variants of the models.
* ``results``: typed records built from the agent's JSON; ``stats``: median CI, speedup CI,
  drift; ``profile``: per-op and per-layer kernel time; ``report``: table, JSON, CSV, PNG.

Nothing here imports onnx or torch at import time: a board with only numpy and onnxruntime
can run ``edgeprune bench --device local``.
"""
from __future__ import annotations
