"""README's Python API example runs as written (docs that cannot rot)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
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


def _bash_blocks(text: str) -> list[str]:
    return [line.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
            for line in block.splitlines() if line.strip()]


def test_readme_test_commands_are_what_ci_runs() -> None:
    """README's full test command is the one .ci/run calls; the quick one only deselects slow tests."""
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    commands = [line for line in _bash_blocks(README.read_text()) if " -m pytest" in line]
    assert commands[0] == ".venv/bin/python -m pytest -q"
    assert commands[0] in [line.strip() for line in ci]
    assert commands[1] == commands[0] + ' -m "not slow"'
    assert not any("not slow" in line for line in ci)
