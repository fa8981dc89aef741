"""The code each pipeline stage runs: the import closure of its entry module inside this package (read from
the source, function-level imports included), plus the package data those modules read.

`dvc.yaml` lists exactly these files as each stage's code deps (a test keeps them equal), so that a code
change reruns the stages that run it and nothing else; a scaffolded project, whose code lives in the
installed package, depends on their digests instead (`write_code_digests`).
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

from ..runtime.atomic import write_text

PACKAGE = Path(__file__).resolve().parent.parent  # the soup_pipeline package (this module sits in its workspace/)
NAME = PACKAGE.name
CLI = "cli.py"  # every stage runs as `soup-pipeline <stage>`: the CLI's module-level imports and the stage's handler
DVC_STAGES = ("prepare", "pretrain", "import", "finetune", "soup", "refine", "evaluate", "ablate")
PACKAGE_DATA = {"core/models.py": ["core/configs"]}  # module -> package data folders it reads
CODE_DIGESTS = Path(".soup-pipeline") / "code"  # a scaffolded project's per-stage code digests, under its root


def _module_file(dotted: str) -> Path | None:
    """The file of module `dotted` inside this package (a package's __init__.py), or None."""
    parts = dotted.split(".")
    if parts[0] != NAME:
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _package_of(path: Path) -> str:
    """The package a module file belongs to (for a package's __init__.py, that package)."""
    return ".".join(path.relative_to(PACKAGE.parent).parts[:-1])


def imported_files(path: Path, *, top_level_only: bool = False, function: str | None = None) -> set[Path]:
    """The package's files that `path` imports (a `from pkg import name` counts `pkg/name.py` when it exists):
    anywhere in it, at module level only, or in one module-level `function`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    if function is not None:
        (tree,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == function]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = _package_of(path)
    found: set[Path] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(anchor + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            for end in range(1, len(parts) + 1):  # importing a.b.c runs a, a.b and a.b.c
                file = _module_file(".".join(parts[:end]))
                if file is not None:
                    found.add(file)
    return found


def closure(entries: set[Path]) -> set[Path]:
    """Every package file that importing `entries` runs (each file's imports, function-level ones included)."""
    todo, seen = list(entries), set()
    while todo:
        file = todo.pop()
        if file not in seen:
            seen.add(file)
            todo.extend(imported_files(file) - seen)
    return seen


def stage_code(stage: str) -> list[str]:
    """The code deps of `stage`: the CLI, its module-level imports and those of the stage's handler `_<stage>`, and
    their closure; as paths relative to the project root (`soup_pipeline/...`), sorted; package data as folders."""
    cli = PACKAGE / CLI
    entries = imported_files(cli, top_level_only=True) | imported_files(cli, function=f"_{stage}")
    files = {cli} | closure(entries - {cli})
    data = {PACKAGE / folder for file in files for folder in PACKAGE_DATA.get(str(file.relative_to(PACKAGE)), [])}
    return sorted(str(path.relative_to(PACKAGE.parent)) for path in files | data)


def _content(path: Path) -> bytes:
    if path.is_dir():
        return b"".join(p.name.encode() + p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
                        and "__pycache__" not in p.parts)
    return path.read_bytes()


def code_digest(stage: str) -> str:
    """The SHA-256 of the code `stage` runs in the installed package (paths and contents)."""
    return hashlib.sha256(b"".join(rel.encode() + _content(PACKAGE.parent / rel)
                                   for rel in stage_code(stage))).hexdigest()


def write_code_digests(root: str | Path) -> list[Path]:
    """Write ROOT/.soup-pipeline/code/<stage>.sha256 for every DVC stage, touching only those whose digest changed
    (a scaffolded project's stages depend on these files, so an unchanged digest reruns nothing)."""
    folder = Path(root) / CODE_DIGESTS
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for stage in DVC_STAGES:
        path, text = folder / f"{stage}.sha256", code_digest(stage) + "\n"
        if not path.is_file() or path.read_text() != text:
            write_text(path, text)
            written.append(path)
    return written
