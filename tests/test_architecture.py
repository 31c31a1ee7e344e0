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


# A matrix product on NumPy goes through ops.gemm / ops.gemv -- SciPy's BLAS -- never
# NumPy's matmul: NumPy brings an OpenBLAS of its own, whose idle threads spin for about
# 0.1 s after a call on the cores SciPy's want next: GEMMs alternating between the two ran
# 20x slower on 2 cores (bench/blas_shapes.py pools; bench/README.md, "The weight
# gradient's orientation"). (Dot products of vectors, ``vdot``, are no matrix products:
# left to NumPy.) The modules that training steps, fit and the estimators run; not the
# NumPy reference (gpu_mlp/reference.py).
MATRIX_PRODUCTS = {"matmul", "dot", "inner", "tensordot"}
OFF_THE_STEP = {"reference", "datasets", "plotting", "cli", "checkpoint", "accounting",
                "_version"}


def _numpy_matrix_products(tree: ast.Module) -> list[int]:
    """Lines of ``a @ b``, ``x.matmul/dot/inner/tensordot(...)`` and an ``einsum``
    given ``optimize`` (which may hand its contractions to ``tensordot``)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.BinOp, ast.AugAssign)) and isinstance(node.op, ast.MatMult):
            lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and (
                node.func.attr in MATRIX_PRODUCTS or node.func.attr == "einsum"
                and any(k.arg == "optimize" for k in node.keywords)):
            lines.append(node.lineno)
    return sorted(lines)


def test_a_step_never_multiplies_matrices_with_numpys_own_blas():
    found = [f"gpu_mlp/{name}.py:{line}" for name, tree in _modules().items()
             if name not in OFF_THE_STEP for line in _numpy_matrix_products(tree)]
    assert found == []


def test_the_matrix_product_check_finds_what_it_looks_for():
    tree = ast.parse("a @ b\nb @= c\nnp.inner(a, b)\nxp.matmul(a, b)\na.dot(b)\n"
                     "np.einsum('ij,ij->i', a, a)\nnp.einsum('ij,jk', a, b, optimize=True)\n"
                     "np.vdot(a, b)\n")
    assert _numpy_matrix_products(tree) == [1, 2, 3, 4, 5, 7]
