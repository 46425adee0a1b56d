"""The packages' import graph, read from the source: ``distill`` (entry points aside) never imports
``data_modules``, and no project module imports itself through others.

Every ``import`` counts, also those inside functions (they run too, only later). ``import a.b``
is an edge to ``a.b``; ``from a import name`` is an edge to ``a.name`` when that is a module and
to ``a`` (its ``__init__``, which holds the re-exported name) otherwise.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("distill", "data_modules")
# The modules of distill allowed to import data_modules: the `distill` command (`distill data ...`) and `distill demo`.
DISTILL_ENTRY_POINTS = frozenset({"distill.cli", "distill.demo"})


def project_modules() -> dict[str, Path]:
    """``{dotted module name: source file}`` of every module of the project packages (a package is its ``__init__``)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that module ``name`` (source ``path``) imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names)
    return {module for module in found if module in modules and module != name}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                components.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(components)


def test_the_graph_sees_function_local_and_from_imports():
    graph = import_graph()
    assert "distill.formats.phases" in graph["data_modules.frames"]  # from distill.formats.phases import ...
    assert "distill.infer_onnx" in graph["distill.cli"]  # inside main()
    assert "distill.models" in graph["distill.modules.segmentation"]  # a name re-exported by the package
    assert "data_modules.synth_prostate" in graph["distill.cli"]  # the entry point may import data_modules


def test_distill_imports_data_modules_only_from_its_entry_points():
    offenders = {
        module: sorted(target for target in targets if target.split(".")[0] == "data_modules")
        for module, targets in import_graph().items()
        if module.split(".")[0] == "distill" and module not in DISTILL_ENTRY_POINTS
    }
    assert {module: targets for module, targets in offenders.items() if targets} == {}


def test_no_import_cycle():
    assert import_cycles(import_graph()) == []
