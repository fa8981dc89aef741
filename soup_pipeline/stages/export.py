"""`soup-pipeline export` in a pipeline root: the soup a source names under runs/soups/, with the spec the registry
would record for it, and the base CLIP the pipeline's fine-tunes started from (`soup_pipeline.core.export` writes
the folders; `soup_pipeline.tracking.export` reads a registered version instead)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Params
from ..core.export import export
from ..core.ingredients import read_ingredient, read_state_file, verify_ingredient
from ..runtime.errors import SoupError
from ..workspace.loading import load_splits, preprocess_config
from ..workspace.paths import StagePaths, base_reference
from ..workspace.results import served_spec

SOUP_FILE = "soup.safetensors"
SOURCES = "models:/NAME/VERSION, models:/NAME@ALIAS or runs/soups/<method>"


def soup_folder(root: Path, source: str) -> Path:
    """The folder runs/soups/<method> a source names (relative to the root, or absolute; the folder or its
    soup.safetensors); an unknown source is refused naming the sources export takes."""
    path = Path(source) if Path(source).is_absolute() else root / source
    folder = path.parent if path.name == SOUP_FILE else path
    if folder.resolve().parent != (StagePaths(root).runs / "soups").resolve():
        raise SoupError(f"unknown source {source!r}: give {SOURCES} (a soup of the pipeline root {root})")
    return folder


def soup_model(params: Params, root: str | Path, source: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict of the soup `source` names and its spec as the registry records it (its sidecar's classifier
    spec and base model, the pipeline's class names and preprocessing); a soup not built is refused."""
    folder = soup_folder(Path(root), source)
    if not (folder / SOUP_FILE).is_file():
        raise SoupError(f"the soup {folder.name} is not built (no {folder / SOUP_FILE}); build it first: "
                        f"soup-pipeline soup --method {folder.name} (or `dvc repro`)")
    soup = read_ingredient(folder / SOUP_FILE)
    verify_ingredient(soup)
    return read_state_file(soup.path), served_spec(soup, load_splits(params).classnames, preprocess_config(params))


def run(classifier_state: dict[str, torch.Tensor], spec: dict, out: str | Path, *, base: str | None,
        params: Params | None, root: str | Path) -> dict[str, Path]:
    """Write OUT/open_clip and OUT/classifier; the base is `base`, else the pipeline's (`base_reference`), and
    either must be the model the soup's fine-tunes started from."""
    if base is None and params is None:
        raise SoupError(f"which CLIP did the fine-tunes start from? pass --base WEIGHTS (the model "
                        f"{spec.get('base_model')}), or run export in its pipeline root (with its params file)")
    base = base or base_reference(params, StagePaths(Path(root)))
    return export(classifier_state, spec, out, base, cache_dir=params.model.cache_dir if params else None)
