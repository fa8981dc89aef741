"""The package's layers, top to bottom, and the import graph they are checked against (read from the source by
`soup_pipeline.workspace.code.imported_files`, function-level imports included)."""

from __future__ import annotations

from pathlib import Path

from soup_pipeline.workspace.code import PACKAGE, imported_files

# A module may import its own layer and the layers below it, never one above; the README's code layout lists them.
LAYERS = [
    ("entry points", ["cli.py", "prefect", "templates"]),
    ("tracking", ["tracking"]),
    ("stages", ["stages"]),
    ("workspace", ["config.py", "workspace"]),
    ("algorithms", ["soups", "training"]),
    ("evaluation", ["evaluation"]),
    ("core", ["core"]),
    ("runtime", ["runtime", "__init__.py"]),
]


def layer_of(path: Path) -> int:
    """The rank of `path`'s layer, 0 the top; a file outside every layer is an error."""
    first = path.relative_to(PACKAGE).parts[0]
    for rank, (_, entries) in enumerate(LAYERS):
        if first in entries:
            return rank
    raise AssertionError(f"{path.relative_to(PACKAGE)} is in no layer: add it to LAYERS and the README's code layout")


def import_graph() -> dict[Path, set[Path]]:
    """Every module of the package and the package modules it imports. Importing `pkg.a.b` runs `pkg/a/__init__.py`
    first, which counts, except from inside `pkg/a/` itself: there that package is already running."""
    graph = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        running = {parent / "__init__.py" for parent in file.parents}
        graph[file] = imported_files(file) - {file} - running
    return graph


def upward_arrows(graph: dict[Path, set[Path]]) -> list[str]:
    """Each import of a module from a higher layer than the importer's, as `importer -> imported`."""
    return [f"{a.relative_to(PACKAGE)} -> {b.relative_to(PACKAGE)}" for a, targets in graph.items()
            for b in sorted(targets) if layer_of(b) < layer_of(a)]


def cycles(graph: dict[Path, set[Path]]) -> list[list[str]]:
    """The import cycles: each strongly connected set of two or more modules (Tarjan's algorithm, iterative)."""
    index: dict[Path, int] = {}
    low: dict[Path, int] = {}
    stack: list[Path] = []
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                members = []
                while True:
                    member = stack.pop()
                    members.append(str(member.relative_to(PACKAGE)))
                    if member == node:
                        break
                if len(members) > 1:
                    found.append(sorted(members))
    return found


def below_tracking() -> list[str]:
    """The dotted names of every module in the layers under tracking (those that must not need MLflow, Prefect, DVC)."""
    lowest = [name for name, _ in LAYERS].index("tracking") + 1
    files = [path for path in sorted(PACKAGE.rglob("*.py")) if layer_of(path) >= lowest]
    return [".".join((PACKAGE.name, *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
            for path in files]
