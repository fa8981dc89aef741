"""soup-pipeline as a plugin in someone else's stack: the wheel installs one package and works outside this
repository, `soup-pipeline init` scaffolds a project that `dvc repro` and `soup-pipeline run` build, and a team's
own Prefect flow calls the souping subflow and gets a registered soup that traces back to its checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml

import doc_pages
from dvc_repo import PROJECT, TINY, sh
from flow_run import FAST
from prefect_server import prefect_server
from soup_pipeline.core.ingredients import file_sha256
from soup_pipeline.workspace.code import DVC_STAGES

TEMPLATES = PROJECT / "soup_pipeline" / "templates"


def test_the_scaffold_templates_are_this_repositorys_pipeline():
    assert (TEMPLATES / "params.yaml").read_text() == (PROJECT / "params.yaml").read_text()
    assert (TEMPLATES / "prefect.yaml").read_text() == (PROJECT / "prefect.yaml").read_text()
    assert (TEMPLATES / "flow_entry.py").read_text() == (PROJECT / "flows" / "pipeline.py").read_text()
    ours = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    scaffold = yaml.safe_load((TEMPLATES / "dvc-stages.yaml").read_text())["stages"]
    assert set(scaffold) == {"code", *ours} and set(ours) == set(DVC_STAGES)
    for name, stage in ours.items():  # the same stages, each depending on its code's digest instead of the files
        body, theirs = stage.get("do", stage), scaffold[name].get("do", scaffold[name])
        expected = [dep for dep in body["deps"] if not dep.startswith("soup_pipeline")]
        assert sorted(theirs["deps"]) == sorted(expected + [f".soup-pipeline/code/{name}.sha256"])
        assert {k: v for k, v in theirs.items() if k != "deps"} == {k: v for k, v in body.items() if k != "deps"}


def test_init_never_overwrites_a_file_and_says_what_it_skipped(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text("# ours\n")
    (project / ".gitignore").write_text("/runs/costs/\nnotes/\n")
    done = subprocess.run([sys.executable, "-m", "soup_pipeline.cli", "init", str(project)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert "skipped: params.yaml (exists)" in done.stdout and "wrote: dvc.yaml" in done.stdout
    assert (project / "params.yaml").read_text() == "# ours\n"
    ignored = (project / ".gitignore").read_text().splitlines()
    assert (ignored[:2] == ["/runs/costs/", "notes/"] and ignored.count("/runs/costs/") == 1
            and "/runs/resume/" in ignored)
    assert (project / ".git").is_dir() and (project / ".dvc").is_dir()
    # `remote list` wraps long paths
    remote = sh(sys.executable, "-m", "dvc", "config", "remote.local.url", cwd=project)
    assert remote.strip() == str(tmp_path / "project-dvc-remote")
    again = subprocess.run([sys.executable, "-m", "soup_pipeline.cli", "init", str(project)], capture_output=True,
                           text=True)
    assert "wrote:" not in again.stdout and "skipped: dvc.yaml (exists)" in again.stdout


def fresh_venv(folder: Path, wheel: Path) -> Path:
    """A new virtual environment with the wheel installed (not editable); the dependencies come from this
    interpreter's site-packages through a .pth line, so nothing is downloaded."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    python = folder / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps.pth").write_text(ours + "\n")
    sh(str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel), cwd=folder)
    return python


@pytest.mark.slow
def test_the_wheel_installs_one_package_and_init_repro_run_import_and_the_subflow_work_outside_the_repository(tmp_path):
    sh(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
       str(PROJECT), cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("soup_pipeline-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"soup_pipeline", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    assert any(name.startswith("soup_pipeline/templates/dvc-stages.yaml") for name in zipfile.ZipFile(wheel).namelist())
    python = fresh_venv(tmp_path / "venv", wheel)
    bin_dir = python.parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": "",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    where = subprocess.run([str(python), "-c", "import soup_pipeline; print(soup_pipeline.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(tmp_path / "venv"))

    project = tmp_path / "project"
    sh(str(bin_dir / "soup-pipeline"), "init", str(project), cwd=tmp_path, env=env)
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, changes in {**TINY, **FAST}.items():
        params[section] = {**params[section], **changes}
    params["sweep"]["members"] = [0, 1]
    params["soup"]["methods"] = {"greedy": {}, "mehl_soup_plus": {"passes": 0.5}}
    params["soup"]["refine"] = {}
    params["tracking"]["register_method"] = "mehl_soup_plus"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-qm", "scaffolded soup pipeline", cwd=project)
    ran = sh(str(python), "-m", "dvc", "repro", cwd=project, env=env)
    assert "Running stage 'soup@mehl_soup_plus'" in ran and (project / "runs" / "eval" / "metrics.json").is_file()
    table = sh(str(bin_dir / "soup-pipeline"), "run", cwd=project, env=env)
    assert "| mehl_soup_plus |" in table
    status = json.loads(sh(str(python), "-m", "dvc", "status", "--json", cwd=project, env=env) or "{}")
    assert set(status) <= {"code"}  # the code stage always runs; its digests unchanged, nothing else is stale

    imported = sh(str(bin_dir / "soup-pipeline"), "import", "--source", str(project / "runs" / "ingredients"),
                  "--member", "50", cwd=project, env=env).splitlines()  # a folder of checkpoints, from the wheel's CLI
    assert [line.split(" <- ")[0] for line in imported] == ["member 50", "member 51"]
    own = sh(str(python), str(PROJECT / "examples" / "own_flow.py"), str(tmp_path / "own"), cwd=tmp_path, env=env)
    assert json.loads(own.strip().splitlines()[-1])["registered_version"] == "1"  # the subflow, from the wheel


@pytest.mark.slow
def test_a_teams_own_flow_calls_the_soup_subflow_on_a_real_prefect_server(tmp_path):
    example = PROJECT / "examples" / "own_flow.py"
    assert example.read_text() in doc_pages.section("In your own Prefect flow")  # the docs show exactly what is tested
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with prefect_server(tmp_path / "prefect") as api:
        done = subprocess.run([sys.executable, str(example), str(tmp_path / "out")], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600,
                              env={**os.environ, "PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": uri})
        assert done.returncode == 0, done.stderr[-3000:]
        request = urllib.request.Request(f"{api}/flow_runs/filter", data=b"{}",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            runs = json.loads(response.read())
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert [row["method"] for row in summary["rows"]] == ["best_individual", "uniform", "greedy", "mehl_soup", "ties"]
    assert summary["registered_version"] == "1" and Path(summary["soups"]["mehl_soup"]).is_file()
    by_parent = {run["parent_task_run_id"] is not None: run for run in runs}
    assert len(runs) == 2 and all(run["state_type"] == "COMPLETED" for run in runs)  # the user's flow and the subflow
    assert by_parent[True]["name"] != by_parent[False]["name"]

    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version("my-team-soup", "1")
    assert version.tags["method"] == "mehl_soup" and version.tags["lineage"].endswith("tables/lineage.json")
    lineage = json.loads(Path(mlflow.artifacts.download_artifacts(version.tags["lineage"], tracking_uri=uri,
                                                                  dst_path=str(tmp_path / "lineage"))).read_text())
    checkpoints = sorted((tmp_path / "out").glob("lr-*.safetensors"))
    assert sorted(row["source_uri"] for row in lineage) == [str(path) for path in checkpoints]
    assert {row["source_uri"]: row["source_sha256"] for row in lineage} == {str(p): file_sha256(p) for p in checkpoints}
    assert all(len(row["sha256"]) == 64 for row in lineage)  # each ingredient as souped


def test_the_subflows_ingredient_task_refuses_a_checkpoint_that_does_not_fit_and_writes_nothing(tmp_path):
    from safetensors.torch import save_file

    from soup_pipeline.core.models import classifier_spec
    from soup_pipeline.core.portable_classifier import classifier_from_spec
    from soup_pipeline.prefect import ingredient_task
    from soup_pipeline.runtime.errors import IngredientError

    spec = classifier_spec("soup-tiny-vit", 10)
    state = classifier_from_spec(classifier_spec("soup-tiny-vit", 7)).state_dict()  # a head for 7 classes, not 10
    save_file(state, str(tmp_path / "seven.safetensors"))
    with pytest.raises(IngredientError,
                       match=r"head\.weight' has shape \[7, .*soup-tiny-vit with 10 classes needs \[10, "):
        ingredient_task.fn(str(tmp_path / "seven.safetensors"), 0, spec, None, None, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
