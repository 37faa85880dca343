"""The package's shape, checked on its source with `ast` so it stays: stages import ops, never each other; no import
cycle, counting imports inside functions; no function longer than a screen."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dpo_ray"
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, tuple[ast.Module, bool]]:
    """Module name -> (its syntax tree, whether it is a package's __init__)."""
    return {_module_name(p): (ast.parse(p.read_text(), str(p)), p.name == "__init__.py")
            for p in sorted(PACKAGE.rglob("*.py"))}


def _relative_base(name: str, is_package: bool, level: int) -> list[str]:
    parts = name.split(".") if is_package else name.split(".")[:-1]
    return parts[: len(parts) - level + 1]


def _imports(name: str, tree: ast.Module, known: set[str], is_package: bool) -> set[str]:
    """The package's modules `name` imports anywhere in its file (top level, functions, TYPE_CHECKING blocks)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(_relative_base(name, is_package, node.level) + ([base] if base else []))
            # `from dpo_ray.stages import train` imports the module dpo_ray.stages.train.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, tree, set(modules), is_package) for name, (tree, is_package) in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_is_seen_whole():
    graph = _graph()
    assert {"dpo_ray.stages.train", "dpo_ray.ops.scorers", "dpo_ray.cli", "dpo_ray.pipeline"} <= set(graph)
    # The checker sees function-level and package-relative imports (the two ways a cycle hides).
    assert "dpo_ray.pipeline" in graph["dpo_ray.cli"]
    assert "dpo_ray.stages.train" in graph["dpo_ray.pipeline"]


def test_no_import_cycle():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()))


def test_the_cycle_finder_finds_one_and_relative_imports_resolve():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    tree = ast.parse("def f():\n    from ..ops import scorers\n    from . import train\n")
    known = {"dpo_ray.ops.scorers", "dpo_ray.stages.train", "dpo_ray.stages.sample"}
    assert _imports("dpo_ray.stages.sample", tree, known, False) == {"dpo_ray.ops.scorers", "dpo_ray.stages.train"}


def test_no_stage_imports_another_stage():
    graph = _graph()
    stages = {m for m in graph if m.startswith("dpo_ray.stages.")}
    crossing = {(m, other) for m in stages for other in graph[m] & stages}
    assert not crossing
    # Nor does anything a stage may import (ops, the runner) lead back to a stage.
    for m in graph:
        if m.startswith(("dpo_ray.ops", "dpo_ray.runner")):
            assert not graph[m] & stages, m


def test_every_stage_has_the_stage_shape():
    for path in sorted((PACKAGE / "stages").glob("*.py")):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assigned = {t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                    for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
        assert {"inputs", "run"} <= names and "SOURCES" in assigned, path.name


def test_no_function_longer_than_a_screen():
    long = []
    for name, (tree, _) in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long
