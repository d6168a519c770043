"""Package layout: ``import projector_kd`` is the method alone, and no module of the package imports itself back
through another (lazy imports inside functions count too)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "projector_kd"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The ``projector_kd`` modules ``path`` imports, wherever the import statement is."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("projector_kd")}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {
        name: {other for other in _imports(path) if other in modules and other != name}
        for name, path in modules.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a package importing its own ``__init__`` does not count), or None."""
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> list[str] | None:
        if name in stack:
            return stack[stack.index(name) :] + [name]
        if name in done:
            return None
        for other in sorted(graph[name]):
            if name.startswith(other + "."):  # a submodule reading its package's __init__
                continue
            found = visit(other, stack + [name])
            if found:
                return found
        done.add(name)
        return None

    for name in sorted(graph):
        found = visit(name, [])
        if found:
            return found
    return None


def test_the_package_has_no_import_cycle():
    graph = _graph()
    assert "projector_kd.engine.cli" in graph and "projector_kd.engine.errors" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"p": set(), "p.x": {"p"}}) is None


def test_import_projector_kd_loads_the_method_alone():
    code = (
        "import sys, projector_kd; "
        "print(sorted(m for m in sys.modules if m.startswith('projector_kd'))); "
        "print(sorted(projector_kd.__all__))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True, check=True
    )
    loaded, exported = result.stdout.splitlines()
    assert loaded == "['projector_kd', 'projector_kd.losses']"
    assert "'ProjectorDistillLoss'" in exported and "'kd_loss'" in exported
