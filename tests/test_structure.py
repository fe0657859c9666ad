"""The package's shape: no module over 500 lines and no circle among the imports a module makes when it is loaded
(imports inside functions, made when a verb runs, and ``TYPE_CHECKING`` blocks do not count)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "textok").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _load_time_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The textok modules ``name`` imports at load time (top level, not under ``if TYPE_CHECKING``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in known:  # `from .x import Name` names a module or something in one
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
                visit(getattr(node, "finalbody", []))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("textok"):
                        add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                if module.startswith("textok"):
                    for alias in node.names:
                        add(f"{module}.{alias.name}")

    visit(ast.parse(path.read_text()).body)
    return found


def test_no_module_is_over_500_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_load_time_import_graph_has_no_circle():
    modules = _modules()
    graph = {name: _load_time_imports(name, path, set(modules)) for name, path in modules.items()}
    # a package's __init__ importing its own submodules is how Python loads packages, not a circle
    graph = {name: {t for t in targets if not (t.startswith(name + ".") and modules[name].name == "__init__.py")}
             for name, targets in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            circle = walk(name)
            assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_graph_reader_sees_imports():
    """The reader finds a known load-time import (so a circle could be seen at all)."""
    modules = _modules()
    assert "textok.models.kinds" in _load_time_imports("textok.models.registry", modules["textok.models.registry"],
                                                       set(modules))
