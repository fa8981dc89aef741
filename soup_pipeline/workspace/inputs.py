"""A stage's inputs as `dvc.yaml` declares them, hashed, so a run outside DVC reuses an output exactly
when `dvc repro` would: when the declared code and data dependencies and params values are unchanged.

Read from the root's own `dvc.yaml` (plain YAML; DVC itself is not imported): the `deps` of the
stage (files, and folders file by file, by content) and the values of its `params` keys. A root
without a `dvc.yaml` has nothing to agree with, and the stages fall back to their own checks.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from ..config import Params
from ..core.ingredients import unchanged_file_sha256
from ..runtime.errors import SoupError


def content_sha256(path: Path) -> str:
    """SHA-256 of a file's content, or of a folder's files (relative path and content, in order); "missing" when
    absent."""
    if path.is_file():
        return unchanged_file_sha256(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        listing = [(str(p.relative_to(path)), content_sha256(p)) for p in files]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return "missing"


def _value(params: dict, dotted: str):
    for part in dotted.split("."):
        params = params.get(part) if isinstance(params, dict) else None
    return params


def stage_inputs_sha256(root: str | Path, stage: str, params: Params) -> str | None:
    """SHA-256 over `stage`'s declared deps (content) and params (values); None when `root` has no dvc.yaml."""
    root = Path(root)
    dvc_file = root / "dvc.yaml"
    if not dvc_file.is_file():
        return None
    stages = (yaml.safe_load(dvc_file.read_text()) or {}).get("stages", {})
    if stage not in stages:
        raise SoupError(f"{dvc_file} has no stage {stage!r}; restore the project's dvc.yaml")
    body = stages[stage].get("do", stages[stage])  # a foreach stage declares its deps under `do`
    values = params.model_dump(mode="json")
    inputs = {"deps": {dep: content_sha256(root / dep) for dep in body.get("deps", [])},
              "params": {key: _value(values, key) for key in body.get("params", []) if isinstance(key, str)}}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
