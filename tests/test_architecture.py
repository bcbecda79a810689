"""The package's layout: one module, one idea; imports point one way; no private name crosses a module.

Every module of gradbook is parsed (module-level imports and imports inside functions alike) and the
rules of the README's "How the package is built" are checked on the import graph.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "gradbook"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")

#: Modules that measure a model or decide from measurements: they never draw.
MEASURING = {"records", "watch", "onepass", "measure", "train", "diagnosis", "remedies"}
#: Modules that draw or make widgets.
DRAWING = {"plot", "widgets", "explorers"}
#: Modules that measure, train, decide, build networks or draw: theory predicts and uses none of them.
NOT_FOR_THEORY = MEASURING | DRAWING | {"nets", "scratch", "toys", "data"}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _tree(module: str) -> ast.Module:
    return ast.parse((PACKAGE / f"{module}.py").read_text(), filename=f"{module}.py")


def imports(module: str) -> dict[str, set[str]]:
    """{imported gradbook module: names taken from it} for every import anywhere in ``module``."""
    out: dict[str, set[str]] = {}
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module is None:          # from . import a, b
                for alias in node.names:
                    out.setdefault(alias.name, set())
            elif node.level == 1 or (node.module or "").startswith("gradbook"):
                target = node.module.removeprefix("gradbook.") if node.level == 0 else node.module
                if target == "gradbook":
                    for alias in node.names:
                        out.setdefault(alias.name, set())
                else:
                    out.setdefault(target.split(".")[0], set()).update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("gradbook."):
                    out.setdefault(alias.name.split(".")[1], set())
    return out


def _function_level_imports(module: str) -> list[str]:
    found = []
    for fn in ast.walk(_tree(module)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("gradbook")):
                    found.append(f"{fn.name}: from {'.' * node.level}{node.module or ''} import ...")
    return found


GRAPH = {m: {t for t in imports(m) if t in MODULES} for m in MODULES}


def test_the_import_graph_has_no_cycle():
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for t in sorted(GRAPH[m]):
            visit(t, path + [m])
        state[m] = 2

    for m in MODULES:
        visit(m, [])


def test_no_import_of_the_package_hides_inside_a_function():
    """A function-level import of a gradbook module is how a cycle hides; lazy imports of heavy optional
    libraries (matplotlib, ipywidgets, scipy.optimize) are fine."""
    hidden = {m: _function_level_imports(m) for m in MODULES}
    assert not {m: v for m, v in hidden.items() if v}


def test_theory_predicts_and_never_measures_builds_or_draws():
    assert not GRAPH["theory"] & NOT_FOR_THEORY, GRAPH["theory"] & NOT_FOR_THEORY


@pytest.mark.parametrize("module", sorted(MEASURING))
def test_measuring_never_draws(module):
    assert not GRAPH[module] & DRAWING, f"{module} imports {GRAPH[module] & DRAWING}"


def _private_uses(module: str) -> list[str]:
    """`_name`s of other gradbook modules used in ``module``: imported by name or read as attributes."""
    tree = _tree(module)
    aliases = {}   # local name -> gradbook module it stands for
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("gradbook")):
            for alias in node.names:
                if node.module is None or node.module == "gradbook":
                    aliases[alias.asname or alias.name] = alias.name
                elif alias.name.startswith("_") and alias.name != "__future__":
                    found.append(f"from {node.module} import {alias.name}")
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 1 and node.module.startswith("_"):
            continue
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in aliases and node.attr.startswith("_"):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_no_private_name_crosses_a_module():
    crossing = {m: _private_uses(m) for m in MODULES}
    assert not {m: v for m, v in crossing.items() if v}


def test_modules_and_functions_stay_readable():
    """No module over MAX_MODULE_LINES lines; no function whose code (its docstring aside) is over
    MAX_FUNCTION_LINES lines unless its docstring says why ("Long because ...")."""
    long_modules = {m: n for m in MODULES if (n := len((PACKAGE / f"{m}.py").read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long_modules
    long_functions = []
    for m in MODULES:
        for node in ast.walk(_tree(m)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node) or ""
                body = node.body[1:] if doc else node.body    # the code, not its documentation
                length = node.end_lineno - body[0].lineno + 1 if body else 0
                if length > MAX_FUNCTION_LINES and "Long because" not in doc:
                    long_functions.append(f"{m}.{node.name}: {length} lines")
    assert not long_functions


def test_the_checks_can_fail():
    """The parser sees the imports it must see, so the tests above cannot pass by seeing nothing."""
    assert {"records", "onepass"} <= GRAPH["measure"] and "remedies" in GRAPH["diagnosis"]
    assert GRAPH["explorers"] >= {"widgets", "plot", "toys", "theory", "measure", "nets"}
    assert imports("measure")["records"] >= {"output_tensor", "weight_tensors"}


def test_the_readme_lists_every_module_bottom_up():
    """The README's table "How the package is built" names every module once, each below all it imports."""
    import re

    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme.split("## How the package is built", 1)[1].split("\n## ", 1)[0]
    order = [name for row in re.findall(r"^\| (`[^|]+`) \|", section, flags=re.M)
             for name in re.findall(r"`(\w+)`", row)]
    assert sorted(order) == MODULES, (sorted(order), MODULES)
    for i, m in enumerate(order):
        above = set(order[:i])
        assert GRAPH[m] <= above, f"{m} imports {GRAPH[m] - above}, which the README lists below it"
