"""The layers the README's code layout names are the package's folders, and the imports keep to them: no cycle,
no arrow that runs up; the stages folder holds entry points only; no souping function grows past a screen."""

from __future__ import annotations

import ast
import re

from doc_pages import section
from package_layers import LAYERS, PACKAGE, cycles, import_graph, layer_of, upward_arrows


def test_no_module_imports_a_higher_layer_and_there_is_no_cycle():
    graph = import_graph()
    assert upward_arrows(graph) == []
    assert cycles(graph) == []


def test_a_planted_cycle_and_an_upward_arrow_are_both_found():
    graph = import_graph()
    errors, config = PACKAGE / "runtime" / "errors.py", PACKAGE / "config.py"
    graph[errors] = graph[errors] | {config}  # runtime importing the params model: up four layers
    assert "runtime/errors.py -> config.py" in upward_arrows(graph)
    (cycle,) = [c for c in cycles(graph) if "runtime/errors.py" in c]
    assert "config.py" in cycle
    graph = import_graph()
    ingredients, data = PACKAGE / "core" / "ingredients.py", PACKAGE / "core" / "data.py"
    graph[ingredients] = graph[ingredients] | {data}
    graph[data] = graph[data] | {ingredients}  # a cycle inside one layer: no arrow runs up, the cycle is found
    assert upward_arrows(graph) == []
    assert ["core/data.py", "core/ingredients.py"] in cycles(graph)
    graph = import_graph()
    paths = PACKAGE / "workspace" / "paths.py"
    graph[paths] = graph[paths] | {PACKAGE / "stages" / "soup.py"}  # the workspace reaching up into an entry point
    assert "workspace/paths.py -> stages/soup.py" in upward_arrows(graph)


def test_every_module_is_in_a_layer_and_the_readme_lists_the_layers_as_they_are():
    for path in PACKAGE.rglob("*.py"):
        layer_of(path)  # raises for a module outside every layer
    table = section("Code layout").strip().split("\n\n", 1)[0]
    rows = [re.findall(r"`soup_pipeline/([^`]*?)/?`", line.split("|")[2]) for line in table.splitlines()[2:]]
    names = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert names == [name for name, _ in LAYERS]
    assert rows == [[entry for entry in entries if entry != "__init__.py"] for _, entries in LAYERS]
    on_disk = {path.name for path in PACKAGE.iterdir() if path.name != "__pycache__" and
               (path.suffix == ".py" or path.is_dir())}
    assert on_disk == {entry for _, entries in LAYERS for entry in entries}


def test_the_stages_folder_holds_entry_points_only():
    modules = sorted((PACKAGE / "stages").glob("*.py"))
    not_entry = [path.name for path in modules if path.name != "__init__.py" and not any(
        isinstance(node, ast.FunctionDef) and node.name == "run" for node in ast.parse(path.read_text()).body)]
    assert len(modules) > 1 and not_entry == [], "a module without `run` belongs in soup_pipeline/workspace/"


def test_every_souping_function_reads_on_one_screen():
    long = [f"{path.relative_to(PACKAGE)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted((PACKAGE / "soups").glob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 60]
    assert long == []
