"""Run the board agent in this process: the same timing code a board runs, without SSH.

Life cycle as in Polygraphy's runners: ``activate()`` checks that ONNX Runtime is importable,
``run(request)`` may be called any number of times while active, ``deactivate()`` ends it;
use it as a context manager::

    with LocalRunner() as runner:
        result = runner.run({"models": [{"name": "m", "path": "m.onnx"}], "repeats": 20})

``run`` returns the agent's result dict unchanged (errors are in ``result["error"]``, as from a
board); :func:`edgeprune.runners.results.build_report` turns it into statistics.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from edgeprune._lazy import require
from edgeprune.errors import InternalError
from edgeprune.runners import agent

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]


class LocalRunner:
    """Times models on this machine with ONNX Runtime through ``edgeprune.runners.agent``."""

    name = "local"

    def __init__(self, progress: ProgressCallback | None = None) -> None:
        self._progress = progress
        self._active = False
        self.profile: Any = None   # the DeviceProfile when made by edgeprune.runners.get_runner

    @property
    def is_active(self) -> bool:
        return self._active

    def activate(self) -> None:
        """Fail early (DependencyError naming the extra) when onnxruntime is missing."""
        if self._active:
            raise InternalError("LocalRunner.activate() called twice")
        require("onnxruntime")
        self._active = True
        log.debug("local runner active")

    def deactivate(self) -> None:
        if not self._active:
            raise InternalError("LocalRunner.deactivate() called on an inactive runner")
        self._active = False

    def run(self, request: dict[str, Any]) -> dict[str, Any]:
        """One agent request -> the agent's result dict (see ``edgeprune/runners/agent.py``)."""
        if not self._active:
            raise InternalError("LocalRunner.run() outside its life cycle; use `with LocalRunner() as r:`")
        return agent.run_request(request, progress=self._progress)

    def __enter__(self) -> "LocalRunner":
        self.activate()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.deactivate()
