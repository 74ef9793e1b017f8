"""The layers of ``cellduality``: an import goes down, never up, and no import circle exists.

:data:`LAYERS` is the one list of floors, lowest first. A module may import modules of its own floor and
of the floors below it; an import from a floor above is a violation, unless it is a known exception of
:data:`KNOWN_UPWARD` (each says why it is still there, and the test fails once it is gone, so that list
only shrinks). Imports are read with :mod:`ast` from the source: top-level, inside functions (lazy) and
under ``TYPE_CHECKING`` alike. Names loaded by ``importlib`` in a package's ``__init__`` (``rewards``,
``predict``) stay inside that package and are not followed.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cellduality"

#: The floors, lowest first: (name, the modules and packages on it). Written once; docs/architecture.md
#: draws the same order.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("cellduality", "cellduality.parsing", "cellduality.rwjs", "cellduality.topk")),
    ("metrics", ("cellduality.metrics",)),
    ("data", ("cellduality.data",)),
    ("sentences", ("cellduality.sentences",)),
    ("modeling", ("cellduality.modeling",)),
    ("tasks", ("cellduality.tasks",)),
    ("inference", ("cellduality.inference",)),
    ("rewards", ("cellduality.rewards",)),
    ("command helpers", ("cellduality.cli_common", "cellduality.reporting")),
    ("teacher", ("cellduality.teacher",)),
    ("eval", ("cellduality.eval",)),
    ("train", ("cellduality.train",)),
    ("predict", ("cellduality.predict",)),
    ("stages", ("cellduality.stages",)),
    (
        "commands",
        ("cellduality.demo", "cellduality.ablation_goal", "cellduality.ablation", "cellduality.cli"),
    ),
]

#: Imports from a higher floor that remain, (importer, imported): why each is still there. Remove an
#: entry when its import is gone (the test says so); never add one without saying why here.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str:
    """The module ``name`` (or an attribute of it, ``pkg.module.name``) lives in."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(module: str) -> Iterator[tuple[str, int]]:
    """Every ``cellduality`` module that ``module`` imports (anywhere in its code), with the line."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "cellduality":
                    yield _resolve(alias.name), node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from its package upwards
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "cellduality":
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield (full if full in MODULES else _resolve(base)), node.lineno


def _graph() -> dict[str, dict[str, int]]:
    """Module -> the modules it imports, each with the line of its first import."""
    graph: dict[str, dict[str, int]] = {}
    for module in MODULES:
        targets = graph.setdefault(module, {})
        for target, line in _imports(module):
            if target != module:
                targets[target] = min(line, targets.get(target, line))
    return graph


GRAPH = _graph()


def floor_of(module: str) -> int:
    """The index in :data:`LAYERS` of the floor ``module`` stands on (the longest entry that holds it)."""
    best, length = None, -1
    for i, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            holds = module == entry or (entry != "cellduality" and module.startswith(entry + "."))
            if holds and len(entry) > length:
                best, length = i, len(entry)
    if best is None:
        raise AssertionError(f"{module} stands on no floor: add it to LAYERS in tests/test_layers.py")
    return best


def upward_imports() -> dict[tuple[str, str], str]:
    """Every import from a higher floor: (importer, imported) -> where, as ``file:line``."""
    found = {}
    for module, targets in GRAPH.items():
        for target, line in targets.items():
            if floor_of(target) > floor_of(module):
                where = MODULES[module].relative_to(PACKAGE.parent)
                found[(module, target)] = (
                    f"{where}:{line} ({LAYERS[floor_of(module)][0]} imports {LAYERS[floor_of(target)][0]})"
                )
    return found


def circles() -> list[list[str]]:
    """The import circles: strongly connected groups of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def test_every_module_stands_on_one_floor() -> None:
    for module in MODULES:
        floor_of(module)
    named = [entry for _, entries in LAYERS for entry in entries]
    assert len(named) == len(set(named)), "a module or package is on two floors"
    missing = [entry for entry in named if entry not in MODULES]
    assert not missing, f"LAYERS names modules that do not exist: {missing}"


def test_no_import_from_a_higher_floor() -> None:
    found = upward_imports()
    new = {pair: where for pair, where in found.items() if pair not in KNOWN_UPWARD}
    assert not new, "imports from a higher floor:\n" + "\n".join(
        f"  {a} -> {b}: {where}" for (a, b), where in sorted(new.items())
    )


def test_known_upward_imports_are_still_needed() -> None:
    """An exception whose import is gone must leave the list, so the list only shrinks."""
    found = upward_imports()
    gone = [pair for pair in KNOWN_UPWARD if pair not in found]
    assert not gone, f"no longer imported upward, remove from KNOWN_UPWARD: {gone}"


def test_no_import_circle() -> None:
    found = circles()
    assert not found, "import circles:\n" + "\n".join("  " + " <-> ".join(group) for group in found)


def test_metrics_imports_only_the_lowest_floor() -> None:
    """``cellduality.metrics`` sits below the tasks: numpy, scipy, pandas, scikit-learn, the standard
    library modules named here and the base floor only (anywhere in its code, lazy imports included)."""
    metrics = [name for name, _ in LAYERS].index("metrics")
    allowed = {
        "__future__",
        "collections",
        "dataclasses",
        "functools",
        "gzip",
        "importlib",
        "io",
        "math",
        "numpy",
        "pandas",
        "scipy",
        "sklearn",
        "types",
        "typing",
    }
    for module, path in MODULES.items():
        if floor_of(module) != metrics:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            for name in names:
                if name.split(".")[0] == "cellduality":
                    assert floor_of(_resolve(name)) in (0, metrics), f"{module} imports {name}"
                else:
                    assert name.split(".")[0] in allowed, f"{module} imports {name}"


def test_the_reader_sees_lazy_imports_and_the_search_finds_circles() -> None:
    """An import inside a function counts, ``from pkg import module`` names the module, and a circle of
    three is found (the checker checked on a graph of its own)."""
    assert "cellduality.eval.report" in GRAPH["cellduality.eval.runner"]  # inside run_eval
    assert (
        "cellduality.metrics.baselines" in GRAPH["cellduality.eval.runner"]
    )  # from ... import baselines as b
    saved = dict(GRAPH)
    try:
        GRAPH.clear()
        GRAPH.update({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}})
        assert circles() == [["a", "b", "c"]]
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


def _top_level_definitions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and not node.name.startswith("_")
    }


def test_each_metrics_formula_is_defined_once_and_never_re_exported() -> None:
    """The metrics library holds each formula once: no module above it defines a public function or class
    of the same name (a second copy), and none lists a name it imports from it in its ``__all__`` (a shim
    left behind by a move)."""
    library = {
        name: module
        for module, path in MODULES.items()
        if module.startswith("cellduality.metrics.")
        for name in _top_level_definitions(path)
    }
    assert {"pearson", "pearson_delta_de", "accuracy", "scfid", "GONeighbourBaseline", "MetricInfo"} <= set(
        library
    )
    copies, shims = [], []
    for module, path in MODULES.items():
        if module == "cellduality.metrics" or module.startswith("cellduality.metrics."):
            continue
        copies += [
            f"{module}.{name} (also {library[name]})" for name in _top_level_definitions(path) & set(library)
        ]
        tree = ast.parse(path.read_text())
        imported = {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cellduality.metrics")
            for alias in node.names
        }
        exported: set[str] = set()
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
                exported |= {e.value for e in getattr(node.value, "elts", []) if isinstance(e, ast.Constant)}
        shims += [f"{module} re-exports {name}" for name in sorted(imported & exported)]
    assert not copies, "formulas defined twice:\n  " + "\n  ".join(copies)
    assert not shims, "\n  ".join(shims)
