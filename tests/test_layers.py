"""The layers of slimguard hold: imports only go down, and nothing imports in a circle.

Every import in ``src/slimguard`` counts: at module level, inside functions, and under ``TYPE_CHECKING``.
A *unit* is the first path component under ``src/slimguard`` (a subpackage such as ``core`` or a
top-level module such as ``pipeline``). :data:`LAYERS` lists the units bottom first; a unit may import
units of its own layer or below, never above, and no two units may import each other. Inside the
package, no two modules may import each other, directly or round a longer circle (``data.core`` ->
``data.builtin`` -> ``data.core`` is one). Plugins register into registries when the plugin index
(:mod:`slimguard.plugins`) imports them, so a lower layer looks a plugin up by name instead of
importing it.

Run this file to print the unit graph, the mutual pairs and the module cycles::

    python tests/test_layers.py
"""

from __future__ import annotations

import ast
import collections
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = "slimguard"

LAYERS: list[set[str]] = [
    {"core"},                      # config, Registry[T], errors, module allowlist, masks, outputs, recipes
    {"_version", "ui"},            # the version string; progress bars
    {"codec"},                     # tensor codecs
    {"data"},                      # data sets and file loaders
    {"runtime"},                   # measurement, ONNX export and runtimes
    {"train"},                     # the one training loop
    {"models"},                    # zoo, model sources, model info (the zoo trains with train/)
    {"lm"},                        # decoder LMs: docs-lm, perplexity, generation (a zoo model)
    {"transforms"},                # the verbs and the one step runner (handlers looked up by config type)
    {"artifact"},                  # the .slim format
    {"evaluate"},                  # scoring (file size comes from the artifact)
    {"prune", "quantize", "share", "lowrank", "distill"},  # techniques: configs + handlers
    {"report"},                    # HTML report
    {"robust", "guard"},           # attacks, scorecard; contracts, OOD, monitor, faults
    {"pipeline", "inspect"},       # recipes end to end; per-tensor view
    {"serve"},                     # the guarded HTTP service (FastAPI, uvicorn)
    {"search"},                    # accuracy-aware multi-objective search over recipes (optimize)
    {"cli", "__init__", "__main__", "plugins"},  # entry points (python -m slimguard) and the plugin index
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    base = SRC.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _target(name: str) -> str | None:
    """The slimguard module an import names (its longest prefix that is a module), or None."""
    if name != PKG and not name.startswith(PKG + "."):
        return None
    while not _is_module(name):
        name = name.rpartition(".")[0]
    return name


def module_graph() -> dict[str, set[str]]:
    """Module -> the slimguard modules it imports anywhere in its source (self-imports left out)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((SRC / PKG).rglob("*.py")):
        me = _module_name(path)
        package = me if path.name == "__init__.py" else me.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                # ``from pkg import sub`` imports the module pkg.sub when there is one
                names = [f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names]
            for name in names:
                target = _target(name)
                if target is not None and target != me:
                    found.add(target)
        graph[me] = found
    return graph


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def unit_graph(graph: dict[str, set[str]] | None = None) -> dict[str, set[str]]:
    """Unit -> the other units it imports."""
    units: dict[str, set[str]] = collections.defaultdict(set)
    for mod, targets in (graph or module_graph()).items():
        units[unit_of(mod)] |= {unit_of(t) for t in targets} - {unit_of(mod)}
    return dict(units)


def mutual_pairs(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if a in graph.get(b, set())})


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one member (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def layer_of(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise KeyError(unit)


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return module_graph()


def test_every_unit_has_a_layer(graph):
    units = {unit_of(m) for m in graph}
    placed = set().union(*LAYERS)
    assert units - placed == set(), "place each new subpackage or module in LAYERS"
    assert placed - units == set(), "LAYERS names a unit that no longer exists"


def test_core_imports_nothing_else_from_slimguard(graph):
    outside = {f"{m} -> {t}" for m, ts in graph.items() if unit_of(m) == "core"
               for t in ts if unit_of(t) != "core"}
    assert outside == set()


def test_no_import_goes_up_a_layer(graph):
    up = sorted(f"{m} -> {t}" for m, ts in graph.items() for t in ts
                if layer_of(unit_of(t)) > layer_of(unit_of(m)))
    assert up == []


def test_no_two_units_import_each_other(graph):
    assert mutual_pairs(unit_graph(graph)) == []


def test_no_modules_import_each_other(graph):
    assert cycles(graph) == []


def test_only_the_entry_points_import_the_plugin_index(graph):
    assert {unit_of(m) for m, ts in graph.items() if f"{PKG}.plugins" in ts} == {"__init__", "cli"}


def test_the_checker_sees_cycles_and_imports_inside_functions(tmp_path, monkeypatch):
    """The checks above would pass on a checker that saw nothing; this one sees a cycle made of an import
    inside a function and a relative import, and an upward import."""
    pkg = tmp_path / PKG
    (pkg / "core").mkdir(parents=True)
    (pkg / "data").mkdir()
    for init in (pkg / "__init__.py", pkg / "core" / "__init__.py", pkg / "data" / "__init__.py"):
        init.write_text("")
    (pkg / "data" / "core.py").write_text("def f():\n    import slimguard.data.builtin\n")
    (pkg / "data" / "builtin.py").write_text("from .core import f\n")
    (pkg / "core" / "config.py").write_text("from slimguard.data import core\n")
    monkeypatch.setitem(globals(), "SRC", tmp_path)
    toy = module_graph()
    assert toy["slimguard.data.core"] == {"slimguard.data.builtin"}
    assert cycles(toy) == [["slimguard.data.builtin", "slimguard.data.core"]]
    assert unit_graph(toy)["core"] == {"data"}


def _order(unit: str) -> tuple[int, str]:
    placed = [i for i, layer in enumerate(LAYERS) if unit in layer]
    return (placed[0] if placed else len(LAYERS), unit)


if __name__ == "__main__":
    modules = module_graph()
    units = unit_graph(modules)
    for unit in sorted(units, key=_order):
        print(f"{unit:12} -> {', '.join(sorted(units[unit], key=_order)) or '-'}")
    pairs = mutual_pairs(units)
    print(len(pairs), "mutual pairs:", pairs)
    loops = cycles(modules)
    print(len(loops), "module cycles:", loops)
