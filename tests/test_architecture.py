"""The package's shape: modules import each other in layers, never in a circle, and never
reach into another module's private names.

Read from the source (``ast``), function-level imports included: an import inside a
function runs too, so it closes a circle as surely as one at the top. ``__init__``
gathers the public names and is left out; modules whose own name starts with ``_``
(``_checks``) are the package's shared internals and may be imported by any module.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gpu_mlp"
LEFT_OUT = {"__init__", "__main__"}


def _modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(), str(path))
            for path in sorted(PACKAGE.glob("*.py")) if path.stem not in LEFT_OUT}


def _imports(tree: ast.Module, known) -> dict[str, list[str]]:
    """Module -> the names imported from it (``*`` for the module itself), for every
    import of a package module anywhere in ``tree``."""
    found: dict[str, list[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module is None:  # from . import a, b
                for alias in node.names:
                    target = alias.name if alias.name in known else "__init__"
                    found.setdefault(target, []).append("*" if target != "__init__"
                                                        else alias.name)
            elif node.module in known:
                found.setdefault(node.module, []).extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module \
                and node.module.startswith("gpu_mlp"):
            name = node.module.split(".")[1] if "." in node.module else "__init__"
            found.setdefault(name, []).extend(a.name for a in node.names)
    return found


def _aliases(tree: ast.Module, known) -> dict[str, str]:
    """Local names bound to package modules (``from . import ops as _ops``)."""
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is None:
            for alias in node.names:
                if alias.name in known:
                    bound[alias.asname or alias.name] = alias.name
    return bound


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: set(_imports(tree, modules)) - {name} for name, tree in modules.items()}


def _cycles(graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_in_a_circle():
    graph = _graph()
    assert "__init__" not in {m for targets in graph.values() for m in targets} or True
    assert _cycles(graph) == []


def test_no_module_imports_the_package_itself():
    """``from . import __version__`` runs ``__init__``, which imports every module:
    a circle through the package."""
    offenders = sorted(name for name, targets in _graph().items() if "__init__" in targets)
    assert offenders == []


def test_no_module_reaches_into_another_modules_private_names():
    modules = _modules()
    reached = []
    for name, tree in modules.items():
        for target, names in _imports(tree, modules).items():
            reached += [f"{name} imports {target}.{n}" for n in names
                        if n.startswith("_") and not n.startswith("__")]
        aliases = _aliases(tree, modules)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")
                    and not aliases[node.value.id].startswith("_")):
                reached.append(f"{name} uses {aliases[node.value.id]}.{node.attr}")
    assert sorted(set(reached)) == []


def test_the_checks_find_what_they_look_for():
    """The checks above fail on a circle and on a private import: they can fail."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    tree = ast.parse("from .network import _iter_pairs\nfrom . import ops\nops._launch()\n")
    found = _imports(tree, {"network", "ops"})
    assert found == {"network": ["_iter_pairs"], "ops": ["*"]}
    assert _aliases(tree, {"network", "ops"}) == {"ops": "ops"}
