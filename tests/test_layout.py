"""The package map's rules (docs/architecture.md): no import cycles, small modules, a short passes/ top."""
from __future__ import annotations

import ast
from pathlib import Path

import edgeprune

PACKAGE = Path(edgeprune.__file__).resolve().parent
MAX_LINES = 500
SINGLE_FILE_AGENT = PACKAGE / "runners" / "agent.py"     # copied to boards whole: exempt from the size rule


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, known: set[str]) -> set[str]:
    """edgeprune modules ``path`` imports, at module level, in functions or under TYPE_CHECKING."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                      for a in node.names}
    return {name for name in found if name in known}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_modules() -> None:
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(path, known) - {name} for name, path in modules.items()}
    # a package's __init__ importing its own submodules is how a package exports names, not a cycle
    for name in graph:
        graph[name] = {dep for dep in graph[name] if not (modules[name].name == "__init__"
                                                          and dep.startswith(name + "."))}
    assert _cycles(graph) == []


def test_no_module_over_500_lines_but_the_board_agent() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in _modules().values()
            if p != SINGLE_FILE_AGENT and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_passes_keeps_at_most_ten_modules_at_its_top_level() -> None:
    top = [p for p in (PACKAGE / "passes").iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()]
    assert 0 < len(top) <= 10, sorted(p.name for p in top)


def test_the_board_agent_imports_nothing_from_edgeprune() -> None:
    assert _imports(SINGLE_FILE_AGENT, set(_modules())) == set()
