"""The Prefect flow on the least work that runs every stage (FAST on top of TINY), run once per session in a
git + DVC repo: the reference the flow tests read and the crash-recovery tests compare their reruns with."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from dvc_repo import make_repo, sh, write_params

FAST = {  # on top of TINY: the least work that still runs every stage
    "data": {"pretrain_size": 60, "train_size": 40, "heldout_size": 40, "test_size": 40},
    "pretrain": {"epochs": 1},
    "sweep": {"epochs_range": [1, 1]},
    "soup": {"device": "cpu", "batch_size": 32,
             "methods": {"uniform": {}, "greedy": {}, "mehl_soup_plus": {"passes": 0.5, "nproc": 2},
                         "mehl_soup_auto": {"passes": 0.5, "search": {  # two candidates
                             "groupings": ["tensor", "model"], "lrs": [0.05]}}},
             "refine": {"wise_ft_soup": {"soup": "mehl_soup_auto", "search": {"alphas": [0.5, 1.0]}}}},
    "evaluate": {"ingredient_counts": [], "remove_top": [], "bootstrap_resamples": 200},
    "tracking": {"system_metrics": False, "register_method": "mehl_soup_auto"},
}


def fast_repo(folder: Path, remote: Path | None = None) -> Path:
    """A git + DVC repo of the project with TINY and FAST params, committed."""
    repo = make_repo(folder, remote)
    write_params(repo, FAST)
    sh("git", "commit", "-qam", "fast params", cwd=repo)
    return repo


def lock_file(repo: Path) -> dict:
    """dvc.lock: each stage's deps, params and outputs with their hashes (equal lock files: bit-identical outputs)."""
    return yaml.safe_load((repo / "dvc.lock").read_text())


def run_flow(root: Path) -> dict:
    # Prefect is imported by the tests that run the flow only
    from soup_pipeline.prefect.pipeline import soup_pipeline_flow

    return soup_pipeline_flow(params_path=str(root / "params.yaml"), root=str(root))


@pytest.fixture(scope="session")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def pipeline(harness, tmp_path_factory):
    """The flow run in a fresh git + DVC repo with a local remote, tracked in a SQLite store beside it;
    `lock` is its dvc.lock as the run left it."""
    folder = tmp_path_factory.mktemp("flow")
    repo = fast_repo(folder, remote=folder / "remote")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        summary = run_flow(repo)
    return SimpleNamespace(repo=repo, uri=uri, summary=summary, lock=lock_file(repo))
