"""The sweep's output directory: what makes a sweep resumable.

::

    OUT/sweep.json            what was swept (model sha256, dataset, timing options); a re-run must match
    OUT/models/<id>.onnx      each setting's rewrite (kept: a resumed setting is not rewritten again)
    OUT/results/<id>.json     a finished setting (accuracy, latency, device); never written twice
    OUT/table.{md,csv,json}   the table of the settings of the last command, and
    OUT/pareto.png            its latency-vs-mAP plot

Every file is written atomically (:func:`edgeprune.io.atomic_path`), so an interrupted sweep
leaves finished settings and nothing half-written; the next run of the same command skips
every setting with a result and reuses every rewrite already made.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from edgeprune.errors import OutputPathError, ParameterError
from edgeprune.io import write_report

IDENTITY = "sweep.json"


@dataclass(frozen=True)
class SweepStore:
    """Paths and reads/writes of one sweep directory."""

    root: Path

    @staticmethod
    def check_out(root: str | os.PathLike) -> Path:
        """Refuse an ``--out`` that is a file, or a directory holding something other than a sweep."""
        path = Path(root)
        if path.exists() and not path.is_dir():
            raise OutputPathError(f"--out {path} is a file; give a directory (new, or one an earlier sweep wrote)")
        if path.is_dir() and any(path.iterdir()) and not (path / IDENTITY).is_file():
            raise OutputPathError(f"--out {path} is a non-empty directory without {IDENTITY}; give a new directory "
                                  "or the --out of an earlier sweep to resume it")
        return path

    @classmethod
    def open(cls, root: str | os.PathLike, identity: Mapping[str, Any]) -> SweepStore:
        """Create ``root`` (or reopen it when it holds a sweep with the same ``identity``)."""
        store = cls(cls.check_out(root))
        path = store.root
        store.check_identity(identity)
        for sub in ("models", "results"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        return store

    def check_identity(self, identity: Mapping[str, Any]) -> None:
        """Refuse to mix results of another model, dataset or timing into this directory."""
        target = self.root / IDENTITY
        wanted = json.loads(json.dumps(identity))
        if target.is_file():
            found = json.loads(target.read_text())
            differs = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
            if differs:
                raise ParameterError(f"--out {self.root} holds a sweep with other {', '.join(differs)} "
                                     f"({', '.join(f'{k}={found.get(k)!r}' for k in differs)}); resume it with the "
                                     "same model, --data and timing options, or give a new --out")
            return
        self.root.mkdir(parents=True, exist_ok=True)
        write_report(target, json.dumps(wanted, indent=1, sort_keys=True) + "\n", suffix=".json")

    def model(self, setting_id: str) -> Path:
        return self.root / "models" / f"{setting_id}.onnx"

    def result_path(self, setting_id: str) -> Path:
        return self.root / "results" / f"{setting_id}.json"

    def finished(self, setting_id: str) -> bool:
        return self.result_path(setting_id).is_file()

    def read_result(self, setting_id: str) -> dict[str, Any]:
        return json.loads(self.result_path(setting_id).read_text())

    def write_result(self, setting_id: str, result: Mapping[str, Any]) -> None:
        write_report(self.result_path(setting_id), json.dumps(result, indent=1, sort_keys=True) + "\n", suffix=".json")
