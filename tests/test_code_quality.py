"""The code stays as STYLE.md asks: ruff-clean, ruff-formatted, `mypy --strict` clean, and no import
loops in app/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "command",
    [["ruff", "check", "app", "tests", "bench"], ["ruff", "format", "--check", "app", "tests", "bench"], ["mypy"]],
    ids=["ruff", "ruff-format", "mypy"],
)
def test_tool_is_clean(command: list[str]) -> None:
    result = subprocess.run(
        [str(BIN / command[0]), *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _module_imports(path: Path, root: Path) -> set[str]:
    """The app modules `path` imports when it is loaded (not inside functions or TYPE_CHECKING), its
    own packages left out."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for inner in ast.walk(node) if isinstance(node, ast.If | ast.Try) else [node]:
            if isinstance(inner, ast.Import):
                names |= {alias.name for alias in inner.names}
            elif isinstance(inner, ast.ImportFrom) and inner.module and inner.level == 0:
                names.add(inner.module)
                names |= {f"{inner.module}.{alias.name}" for alias in inner.names}
    modules = {_module_name(p, root) for p in (root / "app").rglob("*.py")}
    me = _module_name(path, root)
    # Its own packages are loaded before it anyway (`from app.cli import declared` in app.cli.admin).
    ancestors = {me.rsplit(".", n)[0] for n in range(1, me.count(".") + 1)}
    return {name for name in names if name in modules and name != me and name not in ancestors}


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_of_app_imports_itself_back_through_others() -> None:
    """No import loops: a module-level import graph of app/ without cycles (a loop makes the
    order modules are loaded in matter, and hides which of two modules depends on the other)."""
    root = Path(__file__).resolve().parent.parent
    graph = {_module_name(p, root): _module_imports(p, root) for p in (root / "app").rglob("*.py")}
    loops = []
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done

    def walk(name: str, path: list[str]) -> None:
        state[name] = 1
        for child in sorted(graph.get(name, ())):
            if state.get(child) == 1:
                loops.append([*path[path.index(child) :], child])
            elif child not in state:
                walk(child, [*path, child])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert graph and not loops, loops
