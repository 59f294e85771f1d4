"""Every runner, and the timing of ONNX models with ONNX Runtime: statistics and reports.

* ``agent``: the single-file board agent (Python 3.6, numpy + onnxruntime only; copied to
  boards) and the one definition of its protocol (version, progress line, error kinds);
* ``local``: :class:`LocalRunner`, the agent run in this process; ``ssh``: :class:`SshRunner`,
  the agent pushed to a board over SSH (``ssh_link``: connection, files, model cache;
  ``ssh_exec``: running a command without hanging); ``factory``: :func:`get_runner`, the one
  place a device profile becomes a runner; ``probe``: ``edgeprune devices check``'s probe;
* ``bench``: options -> agent request -> runner -> :class:`BenchReport` (what the CLI calls);
* ``precision``: fp32/fp16 variants of the models;
* ``results``: typed records built from the agent's JSON; ``stats``: median CI, speedup CI,
  drift; ``profile``: per-op and per-layer kernel time; ``report``: table, JSON, CSV, PNG.

Imports go one way: ``runners`` -> ``devices`` (profiles, SSH connection, checks), never back.
Nothing here imports onnx, torch or paramiko at import time: a board with only numpy and
onnxruntime can run ``edgeprune bench --device local``.
"""
from __future__ import annotations

from edgeprune.runners.factory import get_runner

__all__ = ["get_runner"]
