"""The package's sub-packages depend one way, and no module imports itself back.

The README draws the layers; this test reads every ``import`` of every module of
``iunet_nb`` (also those inside functions, which run later but are dependencies
all the same) and checks that

* a module imports only modules of its own layer or of layers below it, and
* the import graph between modules has no cycle.
"""
from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "iunet_nb"

#: Layer of each top-level part of the package, lowest first (as the README draws them).
LAYERS: dict[str, int] = {
    "iunet_nb.common": 0,
    "iunet_nb.torch_internals": 0,
    "iunet_nb.nn": 1,
    "iunet_nb.engine": 2,
    "iunet_nb.compat": 3,
    "iunet_nb.arch": 4,
    "iunet_nb.measure": 5,
    "iunet_nb.notebook": 6,
    "iunet_nb.apps": 7,
}
#: Everything else (the package's public face, the original package's module names and the
#: command-line entry points) is on top.
TOP = 8


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _all_modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, pathlib.Path]) -> str | None:
    """The package module that ``name`` (a module or ``module.attribute``) refers to."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """The modules of the package that ``path`` imports anywhere in its code."""
    found: set[str] = set()
    own = _module_name(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from pkg import sub`` imports the module pkg.sub where there is one.
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            if n == "iunet_nb" or n.startswith("iunet_nb."):
                target = _resolve(n, modules)
                if target is not None and target != own:
                    found.add(target)
    return found


def _layer(module: str) -> int:
    for prefix, layer in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return TOP


def _group(module: str) -> str:
    for prefix in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return prefix
    return module


def _graph() -> dict[str, set[str]]:
    modules = _all_modules()
    return {m: _imports(p, modules) for m, p in modules.items()}


def test_every_import_goes_to_the_same_layer_or_below() -> None:
    wrong = [
        f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
        for m, targets in _graph().items() for t in sorted(targets)
        if _layer(t) > _layer(m)
    ]
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_sub_packages_of_one_layer_do_not_import_each_other_upwards() -> None:
    """Two groups of one layer (there are none yet besides the top) must not import each other."""
    graph = _graph()
    pairs = {(_group(m), _group(t)) for m, ts in graph.items() for t in ts
             if _group(m) != _group(t) and _layer(m) == _layer(t) < TOP}
    assert not pairs, f"same-layer imports between sub-packages: {sorted(pairs)}"


def test_the_import_graph_has_no_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_a_wrong_import(tmp_path: pathlib.Path) -> None:
    """The reader above finds an upward import written inside a function."""
    src = tmp_path / "mod.py"
    src.write_text("def f():\n    from iunet_nb.engine.fused import apply_fused\n")
    modules = {"iunet_nb.engine.fused": PACKAGE / "engine" / "fused.py", "iunet_nb.engine": PACKAGE}
    found = set()
    for node in ast.walk(ast.parse(src.read_text())):
        if isinstance(node, ast.ImportFrom):
            found |= {_resolve(f"{node.module}.{a.name}", modules) for a in node.names}
    assert found == {"iunet_nb.engine.fused"}
    assert _layer("iunet_nb.engine.fused") > _layer("iunet_nb.nn.coupling")
