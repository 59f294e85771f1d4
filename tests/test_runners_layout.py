"""Package layout rules of runners/ and devices/: one import direction, one protocol definition."""
from __future__ import annotations

import ast
from pathlib import Path

from edgeprune.runners import agent
from edgeprune.runners.results import ERROR_TYPES
from edgeprune.runners.ssh import BOARD_ERRORS

PACKAGE = Path(agent.__file__).resolve().parents[1]


def _imported_modules(path: Path) -> list[str]:
    """Every module ``path`` imports, at module level or inside functions."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_devices_never_imports_runners():
    offenders = {str(p.relative_to(PACKAGE)): name for p in sorted((PACKAGE / "devices").rglob("*.py"))
                 for name in _imported_modules(p) if name.startswith("edgeprune.runners")}
    assert offenders == {}


def test_every_agent_error_kind_has_one_host_exception():
    assert set(ERROR_TYPES) == set(agent.ERROR_KINDS) and len(set(agent.ERROR_KINDS)) == len(agent.ERROR_KINDS)
    assert set(BOARD_ERRORS) <= set(agent.ERROR_KINDS)


def test_host_code_does_not_repeat_the_protocol_strings():
    """Error kinds and the progress prefix are spelled only in the agent; the host imports them."""
    spelled = [f'"{kind}"' for kind in agent.ERROR_KINDS] + [repr(agent.PROGRESS_PREFIX)]
    host = [p for p in sorted(PACKAGE.rglob("*.py")) if p.name != "agent.py"]
    repeats = {str(p.relative_to(PACKAGE)): text for p in host for text in spelled if text in p.read_text()}
    assert repeats == {}
