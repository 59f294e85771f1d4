"""README's Python API example runs as written (docs that cannot rot)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert os.path.getsize("p.onnx") > 0 and os.path.getsize("d.onnx") > 0
    out = namespace["out"]
    assert [p.shape[-1] for p in out.cross_attn_probs] == [4224, 2224]      # r=2000 after layer 0
    assert namespace["pruner"].kept_indices == list(range(900))
