"""Where a run's results came from, as its tags and its registered version's: the resolved params' hash, the git
commit and the hash of dvc.lock."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from ..config import Params
from ..core.ingredients import file_sha256


def params_hash(params: Params) -> str:
    """SHA-256 of the resolved params as sorted JSON."""
    return hashlib.sha256(json.dumps(params.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def git_commit(root: str | Path) -> str:
    """`git rev-parse HEAD` in `root`, or "unknown" outside a repository (or before its first commit)."""
    try:
        process = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return process.stdout.strip() if process.returncode == 0 else "unknown"


def dvc_lock_hash(root: str | Path) -> str:
    """SHA-256 of `root`/dvc.lock, or "none" when there is none."""
    lock = Path(root) / "dvc.lock"
    return file_sha256(lock) if lock.is_file() else "none"
