"""A throwaway git + DVC copy of this project, with tiny params, for pipeline tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parents[1]
TINY = {
    "data": {"pretrain_size": 120, "train_size": 60, "heldout_size": 60, "test_size": 60},
    "pretrain": {"epochs": 2},
    "sweep": {"members": [0, 1, 2], "epochs_range": [1, 2]},
    "soup": {"device": "cpu", "batch_size": 32,
             "methods": {"uniform": {}, "greedy": {}, "learned_soup": {"epochs": 1}, "mehl_soup_plus": {"passes": 0.5}},
             "refine": {"wise_ft_soup": {"soup": "mehl_soup_plus", "search": {"alphas": [0.5, 1.0]}}}},
    "evaluate": {"ingredient_counts": [2], "remove_top": [1]},
    "tracking": {"system_metrics": False, "register_method": "mehl_soup_plus"},
}


def tool_env() -> dict[str, str]:
    """This interpreter's bin folder first on PATH (for `soup-pipeline` and `dvc`), tools offline."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def sh(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run a command (with `env` on top of the tools' environment), failing with its output when it fails."""
    done = subprocess.run(args, cwd=cwd, env={**tool_env(), **(env or {})}, capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def write_params(repo: Path, changes: dict) -> None:
    """Apply nested changes to the repo's params.yaml."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in changes.items():
        params[section] = {**params.get(section, {}), **values}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def make_repo(folder: Path, remote: Path | None = None) -> Path:
    """git init + dvc init a copy of the project's pipeline files and code, with TINY params, committed."""
    repo = folder / "repo"
    repo.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(PROJECT / name, repo / name)
    shutil.copytree(PROJECT / "soup_pipeline", repo / "soup_pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    write_params(repo, TINY)
    sh("git", "init", "-q", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    sh("dvc", "config", "core.analytics", "false", cwd=repo)
    if remote is not None:
        sh("dvc", "remote", "add", "-d", "local", str(remote), cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "pipeline", cwd=repo)
    return repo
