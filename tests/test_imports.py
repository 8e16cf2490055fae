"""The package's import structure: the apply side loads no matcher, and no module imports itself back."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import weight_mapper

PACKAGE = Path(weight_mapper.__file__).parent
MATCHER_ONLY = ("scipy", "rapidfuzz", "rich")


def _loaded_after(statement: str) -> set[str]:
    """Top-level package names in ``sys.modules`` after ``statement`` runs in a fresh interpreter."""
    code = f"{statement}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_applying_a_plan_loads_no_matcher():
    loaded = _loaded_after("import weight_mapper.apply, weight_mapper.renamer, weight_mapper.transforms, "
                           "weight_mapper.plan, weight_mapper.mapping_dict")
    assert "torch" in loaded  # the check itself works: it sees what was imported
    assert loaded.isdisjoint(MATCHER_ONLY), sorted(loaded & set(MATCHER_ONLY))


def test_the_matcher_still_loads_through_the_package():
    loaded = _loaded_after("from weight_mapper import WeightMapper, STRATEGIES\nassert 'best_match' in STRATEGIES")
    assert {"scipy", "rapidfuzz"} <= loaded
    assert "networkx" not in loaded  # the module tree is our own (weight_mapper/tree.py)


def test_lazy_names_are_public_and_unknown_names_fail():
    assert "WeightMapper" in weight_mapper.__all__ and "WeightMapper" in dir(weight_mapper)
    assert weight_mapper.WeightMapper.__name__ == "WeightMapper"
    try:
        weight_mapper.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("an unknown attribute must raise AttributeError")


def _module_imports(path: Path) -> set[str]:
    """The package modules ``path`` imports when it is loaded (module level, not TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If):
                if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name.startswith("weight_mapper."))
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "weight_mapper":  # from weight_mapper import validate
                    out.update(f"weight_mapper.{a.name}" for a in node.names
                               if (PACKAGE / f"{a.name}.py").exists())
                elif node.module.startswith("weight_mapper."):
                    out.add(node.module)

    visit(tree.body)
    return out


def _import_graph() -> dict[str, set[str]]:
    return {f"weight_mapper.{p.stem}": _module_imports(p) for p in sorted(PACKAGE.glob("*.py"))
            if p.stem != "__init__"}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, each as the path that closes it (depth-first search)."""
    found, state = [], {}

    def walk(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                walk(nxt, [*path, nxt])
        state[node] = "done"

    for node in graph:
        if node not in state:
            walk(node, [node])
    return found


def test_no_module_imports_itself_back():
    graph = _import_graph()
    assert graph["weight_mapper.planner"] >= {"weight_mapper.plan", "weight_mapper.assign"}  # the graph is read
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_the_plan_imports_nothing_of_the_matcher():
    graph = _import_graph()
    seen, todo = set(), ["weight_mapper.plan"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph.get(module, ()))
    matcher = {"weight_mapper.assign", "weight_mapper.combine", "weight_mapper.score", "weight_mapper.storage",
               "weight_mapper.tree", "weight_mapper.planner", "weight_mapper.mapper", "weight_mapper.table"}
    assert seen.isdisjoint(matcher), sorted(seen & matcher)


def test_lazy_match_is_the_function_even_after_the_matcher_loaded():
    # The core lives in weight_mapper.matching, not weight_mapper.match: a submodule named like
    # the function would replace the package attribute as soon as anything imported it.
    import weight_mapper
    import weight_mapper.mapper  # noqa: F401  (loads the matcher)

    assert callable(weight_mapper.match) and weight_mapper.match.__name__ == "match"
    assert weight_mapper.MatchOptions.__module__ == "weight_mapper.matching"
