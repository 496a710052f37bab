"""The shape of gptctl's imports: no cycle among its modules (also not one hidden by an import inside a
function), and a registry that is plain SQL: it loads no torch and knows nothing of the engine, the
settings or the checkpoint layer above it."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import gptctl

PACKAGE = Path(gptctl.__file__).parent


def module_files() -> dict[str, Path]:
    """Every gptctl module by its dotted name (a package by its own, from its __init__.py)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_names(path: Path, modules: dict[str, Path] | None = None) -> set[str]:
    """What a file imports, at its top or inside functions. With `modules`, `from a.b import c` is the
    module a.b.c where that is one of them, else a.b (as `from gptctl.registry import queries` imports
    the submodule queries, and `from gptctl.registry import open_registry` the package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's own package
                parts = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
                base = ".".join([*parts[: len(parts) - node.level + 1], *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                names.add(sub if modules is None or sub in modules else base)
                if modules is None:
                    names.add(base)
    return names


def import_graph() -> dict[str, set[str]]:
    """Each gptctl module and the gptctl modules it imports."""
    modules = module_files()
    return {name: {m for m in imported_names(path, modules) if m in modules and m != name}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules around it (first repeated last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for nxt in sorted(graph[module]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_no_import_cycle_among_gptctl_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_names_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_registry_is_plain_sql():
    """No module of gptctl.registry imports torch, the engine, the settings or the checkpoint layer,
    not even inside a function: it stores rows; the layers above it parse settings and read files."""
    forbidden = ("torch", "gptctl.engine", "gptctl.settings", "gptctl.checkpoints", "tiktoken", "datasets", "numpy")
    for path in (PACKAGE / "registry").rglob("*.py"):
        bad = sorted(n for n in imported_names(path) if n.split(".")[0] in forbidden
                     or any(n == f or n.startswith(f + ".") for f in forbidden))
        assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {', '.join(bad)}"


def test_importing_the_registry_loads_no_torch():
    heavy = ("torch", "tiktoken", "datasets", "numpy")
    code = f"import sys, json, gptctl.registry; print(json.dumps([m for m in {heavy!r} if m in sys.modules]))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout) == []
