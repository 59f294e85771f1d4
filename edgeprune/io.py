"""Atomic file output: write to a temporary file beside the target, then rename.

A failed or interrupted command therefore never leaves a half-written output file.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from edgeprune.errors import OutputPathError


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early (before long work) when ``path`` cannot be created."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise OutputPathError(f"output path {target} is a directory; give a file name such as {target}/model.onnx")
    if not parent.is_dir():
        raise OutputPathError(f"cannot write {target}: directory {parent} does not exist; create it or choose another -o")
    if not os.access(parent, os.W_OK):
        raise OutputPathError(f"cannot write {target}: directory {parent} is not writable; choose another -o")
    return target


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it onto ``path`` on success.

    Extra files written next to the temporary one (ONNX external data) are the caller's to
    name after the final path.
    """
    target = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent or ".")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
