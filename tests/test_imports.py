"""No import cycle among shoal's modules at module level.

The graph is read from the source with ``ast``, not by importing: an edge
``a -> b`` for every ``import``/``from ... import`` that runs when ``a`` is
imported (top-level statements, including those inside a top-level ``if`` or
``try``, but not ``if TYPE_CHECKING:`` blocks nor imports inside functions,
which run later). Importing ``shoal.x.y`` also runs ``shoal/x/__init__.py``,
so that package is an edge too, unless it is one of the importer's own
packages (Python has started it before the importer, by construction).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Cycles that exist today outside the parameter-server package, each a
# frozenset of its modules. Remove an entry when its cycle is gone; the test
# fails on any cycle not listed here, and on a listed one that has gone away.
KNOWN_CYCLES: set[frozenset[str]] = set()
# The same, counting imports inside functions. None stands: the sparse artefact's
# file format (with CompressError, which its readers raise) lives in models/, so
# compress imports models to write it and models never imports compress.
KNOWN_CALL_TIME_CYCLES: set[frozenset[str]] = set()
# Cycles between top-level packages counting imports inside functions; none stands.
KNOWN_PACKAGE_CYCLES: set[frozenset[str]] = set()


def module_names(src: Path = SRC) -> dict[str, Path]:
    names = {}
    for path in sorted((src / "shoal").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run at import time (not under TYPE_CHECKING, not in a def)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, ast.If):
                if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                        or isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING"):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(tree.body)
    return found


def _is_type_checking(node: ast.stmt) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"
                                         or isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _every_import(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run, in functions too (not under TYPE_CHECKING)."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif _is_type_checking(node):
            found.extend(_every_import(ast.Module(body=node.orelse, type_ignores=[])))
        else:
            found.extend(_every_import(node))
    return found


def import_graph(src: Path = SRC, *, at_call_time: bool = False) -> dict[str, set[str]]:
    """Module -> the shoal modules its top-level imports run (``at_call_time``:
    and those its functions import when they run)."""
    modules = module_names(src)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if _is_package(name, modules) else name.rpartition(".")[0]
        targets: set[str] = set()
        tree = ast.parse(path.read_text(), str(path))
        imports = _every_import(tree) if at_call_time else _top_level_imports(tree)
        for node in imports:
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = node.module or ""
            if node.level:  # relative: from the importer's package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)} | {name}
        edges = set()
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # the module and every package above it
                candidate = ".".join(parts[:i])
                if candidate in modules and candidate not in own:
                    edges.add(candidate)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same edges between shoal's top-level packages (``shoal.ps``, ``shoal.training``, ...)."""
    top = lambda module: ".".join(module.split(".")[:2])  # noqa: E731
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        packages.setdefault(top(module), set()).update(top(t) for t in targets if top(t) != top(module))
    return packages


def test_the_graph_sees_imports_that_run_and_skips_those_that_do_not():
    graph = import_graph()
    assert "shoal.strategies.base" in graph["shoal.strategies.sync"]
    assert "shoal.registry" in graph["shoal.config"]
    assert "shoal.training.loop" not in graph["shoal.worker"]  # imported inside _run, at call time


def test_cycles_finds_a_cycle_and_only_that():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [frozenset({"a", "b", "c"})]


def test_no_import_cycle_among_shoals_modules_at_module_level():
    found = set(cycles(import_graph()))
    new = [sorted(c) for c in found - KNOWN_CYCLES]
    gone = [sorted(c) for c in KNOWN_CYCLES - found]
    assert not new, f"import cycles at module level: {new}"
    assert not gone, f"cycles listed in KNOWN_CYCLES no longer exist (remove them): {gone}"


def test_no_import_cycle_among_shoals_modules_even_counting_imports_inside_functions():
    # Deferred imports break a cycle at import time but not in the design: a module
    # that needs another's function at call time still depends on it.
    found = set(cycles(import_graph(at_call_time=True)))
    new = [sorted(c) for c in found - KNOWN_CALL_TIME_CYCLES]
    gone = [sorted(c) for c in KNOWN_CALL_TIME_CYCLES - found]
    assert not new, f"import cycles through imports inside functions: {new}"
    assert not gone, f"cycles listed in KNOWN_CALL_TIME_CYCLES no longer exist (remove them): {gone}"


# The only modules above the training loop: the per-process entry and the CLI.
ABOVE_TRAINING = ("shoal.worker", "shoal.cli")


def test_no_lower_layer_imports_the_training_loop_even_at_call_time():
    # strategies, ps, fl, compress, parallel and bench share optimiser, evaluation,
    # checkpoints, group and masks through shoal.engine; the parameter-server
    # supervisor gets the loop it runs handed down by shoal.worker.
    graph = import_graph(at_call_time=True)
    up = sorted(f"{module} -> {target}" for module, targets in graph.items() for target in targets
                if target.startswith("shoal.training") and not module.startswith("shoal.training")
                and not module.startswith(ABOVE_TRAINING))
    assert not up, f"imports from a lower layer up into shoal.training: {up}"
    assert "shoal.training.loop" in graph["shoal.worker"]  # the check sees the one that is allowed


def test_no_cycle_among_shoals_packages():
    packages = package_graph(import_graph())
    assert "shoal.engine" in packages["shoal.ps"]  # the graph sees edges between packages
    assert not cycles(packages), f"packages in a cycle at module level: {cycles(packages)}"
    found = set(cycles(package_graph(import_graph(at_call_time=True))))
    assert not found - KNOWN_PACKAGE_CYCLES, f"packages in a cycle counting imports inside functions: {found}"
    assert not KNOWN_PACKAGE_CYCLES - found, "cycles in KNOWN_PACKAGE_CYCLES no longer exist (remove them)"
