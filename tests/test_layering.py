"""The package's layers: every import in src/dairllm (function-level ones included, TYPE_CHECKING
ones not) points down, never up, and no module reaches itself through others. Oracle: the
import statements themselves, read with `ast` from the source files."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dairllm"
if not SRC.is_dir():
    pytest.skip("the source tree is not beside the tests", allow_module_level=True)

# package -> packages of dairllm it must never import (directly or from a function)
FORBIDDEN = {
    "engine": ("cluster", "store", "dllama", "commands", "server", "chat", "modes", "convert"),
    "formats": ("engine", "cluster", "store", "dllama", "commands", "server", "chat", "modes",
                "convert"),
    "store": ("cluster", "dllama", "commands", "server", "chat", "modes"),
    "cluster": ("dllama", "commands", "server", "chat", "modes"),
    "dllama": ("cluster", "commands", "server", "chat", "modes"),
    "modes": ("commands", "server", "chat"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_blocks(tree: ast.AST) -> set:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    return skip


def imports_of(path: Path) -> set:
    """dairllm modules `path` imports (resolved relative imports, packages and their modules)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_blocks(tree)
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("dairllm"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("dairllm"):
                continue
            if node.module:                   # `from . import x` imports x, not the package
                out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names)
    return out


@pytest.fixture(scope="module")
def graph() -> dict:
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    return {m: {t for t in imports_of(p) if t in files and t != m} for m, p in files.items()}


def test_the_graph_sees_function_level_imports(graph):
    """The reader itself: modes imports the cluster layouts, and commands import options."""
    assert "dairllm.cluster.layouts" in graph["dairllm.modes"]
    assert "dairllm.commands.options" in graph["dairllm.commands.generate"]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_a_layer_above_it(graph, package):
    bad = sorted((m, t) for m, targets in graph.items() if m.startswith(f"dairllm.{package}")
                 for t in targets for above in FORBIDDEN[package]
                 if t == f"dairllm.{above}" or t.startswith(f"dairllm.{above}."))
    assert not bad, f"{package} imports from above it: {bad}"


def test_no_import_cycles(graph):
    """Depth-first search for a back edge; reports one cycle."""
    state: dict = {}
    stack: list = []

    def visit(m: str) -> "list | None":
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                return stack[stack.index(t):] + [t]
            if t not in state:
                cycle = visit(t)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, " -> ".join(cycle)


def test_argparse_only_in_the_command_layer():
    users = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                   if "argparse" in imports_and_names(p))
    assert all(u.startswith("commands/") or u == "cli.py" for u in users), users


def imports_and_names(path: Path) -> set:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_test_file_imports_another():
    """Shared test code lives in tests/helpers, tests/oracles and conftest.py, never in a test
    file another one imports (a test file's fixtures and skips would leak into the importer)."""
    tests = Path(__file__).resolve().parent
    offenders = []
    for path in sorted(tests.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name} imports {n}" for n in names if n.split(".")[0].startswith("test_")]
    assert not offenders, offenders
