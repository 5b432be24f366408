"""The house rules, read from the code: the package's folders are layers and no module imports
one above its own; the import graph has no cycle; only the runtime and the stages import Ray, only
the report and tracking import wandb; no function outside the training loop is over 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT


#: kdray's layers, lowest first: a module may import its own layer and those below it. The
#: top-level modules are the base (errors, config, metrics, cache, the run's files...), and the
#: entry points `kdray.search` and `kdray.__main__` sit with the command line.
LAYERS = ("base", "data", "train", "serve", "evaluate", "runtime", "report", "stages", "cli")
ENTRY_POINTS = {"kdray.search", "kdray.__main__"}
#: The one function allowed to be long: the training loop reads top to bottom.
LONG_ALLOWED = {"kdray/train/loop.py:distill"}


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for path in sorted((root / "kdray").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _body(path: Path) -> ast.Module:
    """The module without its `if __name__ == "__main__":` block: that runs only when the file is
    the program (`python -m`), as the module `__main__`, not the one imported by name."""
    tree = ast.parse(path.read_text())
    return ast.Module(body=[n for n in tree.body if not (isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))],
                      type_ignores=[])


def imported(path: Path, mods: dict[str, Path] | None = None) -> set[str]:
    """Every module an import in `path` names, at module level or inside functions: for `from
    kdray.x import y` the module `kdray.x.y` when it is one (`from kdray import metrics`), else
    `kdray.x`."""
    found = set()
    for node in ast.walk(_body(path)):
        if isinstance(node, ast.ImportFrom) and node.module:
            subs = {f"{node.module}.{a.name}" for a in node.names}
            found |= subs & set(mods or ())
            if not subs <= set(mods or ()):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def kdray_imports(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the kdray modules it imports."""
    mods = modules(root)
    return {m: {d for d in imported(p, mods) if d in mods and d != m} for m, p in mods.items()}


def layer(module: str) -> int:
    parts = module.split(".")
    if module in ENTRY_POINTS:
        return LAYERS.index("cli")
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS):
        return LAYERS.index(parts[1]) if parts[1] in LAYERS else 0
    return 0


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (`[a, b, ..., a]`), or None (depth-first search)."""
    state: dict[str, str] = {}

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                return path[path.index(d):] + [m, d] if d in path else [m, d]
            if d not in state and (cycle := visit(d, path + [m])):
                return cycle
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m, [])):
            return cycle
    return None


def upward(graph: dict[str, set[str]]) -> list[str]:
    """`a -> b` for each import of a module in a higher layer."""
    return [f"{m} ({LAYERS[layer(m)]}) -> {d} ({LAYERS[layer(d)]})" for m, deps in sorted(graph.items())
            for d in sorted(deps) if layer(d) > layer(m)]


def test_kdrays_import_graph_has_no_cycle_and_no_upward_import():
    graph = kdray_imports()
    assert {"kdray.runtime.engine", "kdray.train.loop", "kdray.stages.search", "kdray.stages.pipeline"} <= set(graph)
    assert "kdray.train.loop" in graph["kdray.runtime.engine"]  # the walk sees imports inside functions too
    assert {layer(m) for m in graph} == set(range(len(LAYERS)))  # every layer has modules
    assert find_cycle(graph) is None
    assert upward(graph) == []


def test_only_the_runtime_and_the_stages_import_ray_and_only_the_report_and_tracking_wandb():
    mods = modules()
    ray = sorted(m for m, p in mods.items() if any(i == "ray" or i.startswith("ray.") for i in imported(p)))
    wandb = sorted(m for m, p in mods.items() if any(i == "wandb" or i.startswith("wandb.") for i in imported(p)))
    assert ray and all(m.startswith(("kdray.runtime.", "kdray.stages.")) for m in ray), ray
    assert wandb and all(m.startswith("kdray.report.") or m == "kdray.runtime.tracking" for m in wandb), wandb


def long_functions(root: Path = ROOT, limit: int = 80) -> list[str]:
    out = []
    for path in sorted((root / "kdray").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit:
                out.append(f"{path.relative_to(root)}:{node.name}")
    return out


def test_no_function_outside_the_training_loop_is_over_80_lines():
    assert set(long_functions()) <= LONG_ALLOWED, sorted(set(long_functions()) - LONG_ALLOWED)


def test_the_rules_find_what_they_guard_against(tmp_path):
    """A lower module importing a higher one (inside a function), a cycle, and a long function,
    planted in a tree of the same shape, are each found."""
    (tmp_path / "kdray" / "train").mkdir(parents=True)
    (tmp_path / "kdray" / "stages").mkdir()
    for d in ("kdray", "kdray/train", "kdray/stages"):
        (tmp_path / d / "__init__.py").write_text("")
    (tmp_path / "kdray" / "train" / "low.py").write_text("def f():\n    from kdray.stages.high import g\n")
    (tmp_path / "kdray" / "stages" / "high.py").write_text(
        "from kdray.train import low\n\nif __name__ == '__main__':\n    from kdray.train import mid\n")
    (tmp_path / "kdray" / "train" / "mid.py").write_text("def g():\n" + "    x = 1\n" * 90)
    graph = kdray_imports(tmp_path)
    assert graph["kdray.train.low"] == {"kdray.stages.high"} and graph["kdray.stages.high"] == {"kdray.train.low"}
    assert find_cycle(graph) == ["kdray.stages.high", "kdray.train.low", "kdray.stages.high"]
    assert upward(graph) == ["kdray.train.low (train) -> kdray.stages.high (stages)"]
    assert long_functions(tmp_path) == ["kdray/train/mid.py:g"]
