"""Where external checkpoints come from: local files, folders and globs, and MLflow runs, models and experiments.

`resolve(sources, download_dir)` turns source strings into `Checkpoint`s (URI, local file, MLflow run id or None),
in the order of the sources; a source that names several checkpoints gives them in the order below.

    path/to/file.pt                 one file (.safetensors, or a .pt/.pth state dict of tensors)
    path/to/folder                  every *.safetensors, *.pt and *.pth file directly inside, sorted by name
    'path/**/*.pt'                  a glob pattern (*, ?, [..], ** across folders): the matching checkpoint
                                    files (.safetensors, .pt, .pth), sorted by path
    runs:/<run_id>/<artifact path>  an artifact of an MLflow run
    models:/<name>/<version>        a registered model version (recorded as such)
    models:/<name>@<alias>          the version an alias points to (recorded as models:/<name>/<version>)
    experiment:<name>/<artifact path>[?metric=<key>[&top=N][&order=asc]]
                                    that artifact of every FINISHED run of experiment <name> (a name without '/')
                                    that has it, oldest run first (recorded as runs:/<run_id>/<artifact path>);
                                    with metric=<key> only runs that logged <key>, highest last value first
                                    (order=asc: lowest first); top=N keeps the first N and needs metric

A local file is recorded by its absolute path. MLflow sources are resolved by the `remote` the caller passes
(`soup_pipeline.tracking.mlflow_sources.mlflow_sources`: this module, like every core module, never imports MLflow);
an MLflow artifact that is a folder must hold exactly one checkpoint file, and downloads go under
`download_dir`. A source that resolves to nothing, a missing run, artifact, experiment, model, version or
alias, or an unknown scheme raises one IngredientError naming the source and the fix.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..runtime.errors import IngredientError

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")
SYNTAX = ("a checkpoint file, folder or glob, runs:/<run_id>/<path>, models:/<name>/<version>, models:/<name>@<alias> "
          "or experiment:<name>/<path>[?metric=<key>[&top=N][&order=asc]]")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # two letters at least: C:\ is a drive, not a scheme
_GLOB = re.compile(r"[*?[]")
MLFLOW_SCHEMES = ("runs:/", "models:/", "experiment:")


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint a source resolved to: where it came from, the local file, and its MLflow run (or None)."""

    uri: str
    path: Path
    run_id: str | None = None


Remote = Callable[[str, Path], list[Checkpoint]]  # (MLflow source, download folder) -> its checkpoints


def resolve(sources: Sequence[str], download_dir: str | Path, *, remote: Remote | None = None) -> list[Checkpoint]:
    """Every checkpoint the sources name, in order; MLflow sources through `remote`, downloading under
    `download_dir`."""
    return [checkpoint for source in sources
            for checkpoint in resolve_one(str(source), Path(download_dir), remote=remote)]


def resolve_one(source: str, download_dir: Path, *, remote: Remote | None = None) -> list[Checkpoint]:
    """The checkpoints one source names (never none: that is an IngredientError)."""
    if source.startswith(MLFLOW_SCHEMES):
        if remote is None:
            raise IngredientError(f"source {source!r} is in MLflow, and no MLflow resolver was given; import it with "
                                  "`soup-pipeline import` or pass "
                                  "remote=soup_pipeline.tracking.mlflow_sources.mlflow_sources()")
        return remote(source, download_dir)
    return _local(source)


# --- local files -----------------------------------------------------------------------------------------------


def _local(source: str) -> list[Checkpoint]:
    path = Path(source).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted((p for p in path.iterdir() if p.is_file() and p.name.endswith(CHECKPOINT_SUFFIXES)),
                       key=lambda p: p.name)
    elif _SCHEME.match(source):
        raise IngredientError(f"source {source!r} has an unknown scheme '{_SCHEME.match(source).group(1)}:'; "
                              f"give {SYNTAX}")
    elif _GLOB.search(source):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True)
                       if Path(p).is_file() and p.endswith(CHECKPOINT_SUFFIXES))
    else:
        raise IngredientError(f"source {source!r} does not exist; give {SYNTAX}")
    if not files:
        raise IngredientError(f"source {source!r} holds no {', '.join(CHECKPOINT_SUFFIXES)} file; "
                              "point it at the checkpoints or fix the pattern")
    return [Checkpoint(uri=str(p.resolve()), path=p) for p in files]
