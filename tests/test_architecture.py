"""The architecture rules, checked on the source: no import cycles between modules, no
function-level imports of the package (the CLI's lazy imports aside), and no code that
special-cases a registered component by name outside the component's own module."""

from __future__ import annotations

import ast
import inspect
import sys
from pathlib import Path

import grimp

import longtail.data.samplers as samplers
import longtail.hooks as hooks
import longtail.losses as losses
import longtail.methods as methods
import longtail.models as models
import longtail.optim as optim

PACKAGE = Path(__file__).resolve().parents[1] / "longtail"
# lazy on purpose: `longtail --help` / `longtail data stats` start without importing torch
LAZY_IMPORTS_ALLOWED = {"cli.py", "data/stats.py"}


def _strongly_connected(graph: grimp.ImportGraph):
    """Tarjan's SCCs of the module import graph; returns the components with > 1 module."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return out


def test_no_module_imports_itself_through_others():
    graph = grimp.build_graph("longtail")
    assert _strongly_connected(graph) == []


def test_a_planted_cycle_is_found():
    graph = grimp.ImportGraph()
    for m in ("p", "p.a", "p.b", "p.c"):
        graph.add_module(m)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.c")
    assert _strongly_connected(graph) == []
    graph.add_import(importer="p.c", imported="p.a")
    assert _strongly_connected(graph) == [["p.a", "p.b", "p.c"]]


def _function_level_imports(path: Path):
    tree = ast.parse(path.read_text())
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("longtail"):
                    yield node.lineno, node.module
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        if alias.name.startswith("longtail"):
                            yield node.lineno, alias.name


def test_no_function_level_imports_of_the_package():
    found = [
        f"{p.relative_to(PACKAGE)}:{line} {mod}"
        for p in sorted(PACKAGE.rglob("*.py"))
        if str(p.relative_to(PACKAGE)) not in LAZY_IMPORTS_ALLOWED
        for line, mod in _function_level_imports(p)
    ]
    assert found == []


def _registered():
    """{name: the file that registers it} over every component registry."""
    out = {}
    for registry in (
        losses.LOSSES,
        samplers.SAMPLERS,
        methods.METHODS,
        hooks.HOOKS,
        optim.OPTIMIZERS,
        optim.SCHEDULES,
        models.BACKBONES,
        models.HEADS,
        models.NECKS,
    ):
        for name in registry.names():
            obj = registry.get(name)
            target = getattr(obj, "build", obj)  # OptimInfo / ScheduleInfo
            out.setdefault(name, set()).add(Path(inspect.getsourcefile(target)).resolve())
    return out


def _name_comparisons(path: Path, names):
    """String constants equal to a component name, compared with == / != / in / not in."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        consts = []
        for op in operands:
            if isinstance(op, ast.Constant) and isinstance(op.value, str):
                consts.append(op.value)
            elif isinstance(op, (ast.Tuple, ast.List, ast.Set)):
                consts += [
                    e.value
                    for e in op.elts
                    if isinstance(e, ast.Constant) and isinstance(e.value, str)
                ]
        for value in consts:
            if value in names:
                yield node.lineno, value


def test_no_component_is_special_cased_by_name_elsewhere():
    registered = _registered()
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, name in _name_comparisons(path, registered):
            if path.resolve() not in registered[name]:
                found.append(f"{path.relative_to(PACKAGE)}:{line} compares with {name!r}")
    assert found == []
