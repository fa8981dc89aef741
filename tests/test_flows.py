"""The Prefect flow end to end on tiny settings: MLflow runs and registry, a clean `dvc status`,
reuse of finished members after an interrupted sweep, fail-fast on a dead tracking server, and
the nightly deployment served against a real Prefect server (sweep on Dask)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import zc.lockfile
from mlflow import MlflowClient
from safetensors.torch import load_file

from dvc_repo import PROJECT, TINY, make_repo, sh, tool_env, write_params
from flow_run import FAST, run_flow
from mlflow_server import free_port
from prefect_server import (
    cli,
    deployment,
    finished_flow_run,
    flow_run_states,
    poll,
    prefect_server,
    serve_deployment,
    spawn,
    worker,
)
from soup_pipeline import tracking
from soup_pipeline.config import load_params
from soup_pipeline.core.ingredients import file_sha256, read_ingredient
from soup_pipeline.core.portable_classifier import classifier_from_spec
from soup_pipeline.prefect.serve import NIGHTLY
from soup_pipeline.runtime.errors import SoupError
from soup_pipeline.runtime.lock import root_lock
from soup_pipeline.stages import soup as soup_stage
from soup_pipeline.workspace.loading import load_splits
from soup_pipeline.workspace.paths import StagePaths

pytestmark = pytest.mark.slow

EXPERIMENT = "soup-pipeline"
MODEL = "soup-pipeline-soup"


SOUPS_WITHOUT_LEARNING = {  # for tests of the orchestration only: the two soups that learn nothing
    "soup": {"methods": {"uniform": {}, "greedy": {}}, "refine": {}}, "tracking": {"register_method": "greedy"}}


def params_root(folder: Path, *more: dict) -> Path:
    """A pipeline root holding the project's params.yaml with TINY, FAST and `more` applied."""
    folder.mkdir(parents=True)
    shutil.copy(PROJECT / "params.yaml", folder / "params.yaml")
    for changes in (TINY, FAST, *more):
        write_params(folder, changes)
    return folder


def stamp(path: Path) -> tuple[int, str]:
    """What changes when a file is rewritten: its mtime (nanoseconds) and its content hash."""
    return path.stat().st_mtime_ns, file_sha256(path)


def children(parent_run_id: str) -> dict[str, list]:
    """The parent's nested runs by name (a retried fine-tune has several)."""
    runs: dict[str, list] = {}
    for run in tracking.child_runs(parent_run_id):
        runs.setdefault(run.info.run_name, []).append(run)
    return runs


def changed_stages(repo: Path) -> dict:
    return json.loads(sh("dvc", "status", "--json", cwd=repo) or "{}")


@pytest.fixture
def tracked(pipeline):
    """The module's pipeline, with MLflow's tracking and registry pointed at its store (a test that points them
    elsewhere leaves no trace in the next one)."""
    mlflow.set_tracking_uri(pipeline.uri)
    mlflow.set_registry_uri(pipeline.uri)
    yield pipeline
    mlflow.set_tracking_uri(pipeline.uri)
    mlflow.set_registry_uri(pipeline.uri)


def test_flow_tracks_a_parent_run_with_nested_fine_tunes_and_soups(tracked):
    summary = tracked.summary
    assert summary["K"] == 3 and summary["members"] == [0, 1, 2]
    assert ({"zero_shot", "best_individual", "uniform", "mehl_soup_plus", "ensemble"}
            <= {r["method"] for r in summary["rows"]})
    client = MlflowClient()
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["K"] == 3
    assert parent.data.params["sweep.members"] == "[0, 1, 2]"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "tables")} >= {
        "tables/ingredients.json", "tables/evaluation.json"}
    runs = children(parent.info.run_id)
    assert set(runs) == {"finetune-0", "finetune-1", "finetune-2", "uniform", "greedy", "mehl_soup_plus",
                         "mehl_soup_auto", "wise_ft_soup"}
    for k in range(3):
        (run,) = runs[f"finetune-{k}"]
        assert 0 <= run.data.metrics["fit_acc"] <= 1 and run.data.params["hparams.epochs"] == "1"
        assert run.data.params["reused"] == "False" and run.data.tags["kind"] == "finetune"
    (soup,) = runs["mehl_soup_plus"]
    assert {"fit_acc", "select_acc", "test_acc", "shifted_test_acc", "test_vs_greedy", "test_mcnemar_p",
            "construction_s", "peak_cpu_rss_bytes"} <= set(soup.data.metrics)
    assert len(client.get_metric_history(soup.info.run_id, "fit_loss")) >= 1
    assert tracking.load_mixing_weights(soup.info.run_id).beta.shape[0] == 3
    (auto,) = runs["mehl_soup_auto"]  # the grouping chosen on select data, with the whole candidate table
    assert auto.data.params["chosen.grouping"] in {"tensor", "block", "model"}
    assert "tables/search-mehl_soup_auto.json" in {a.path for a in client.list_artifacts(auto.info.run_id, "tables")}
    (refined,) = runs["wise_ft_soup"]  # built after the soup it refines, with its alpha chosen on select data
    assert refined.data.params["chosen.alpha"] in {"0.5", "1.0"} and "test_acc" in refined.data.metrics


def test_auto_registers_the_model_the_evaluation_chose_on_select_data_once_with_its_evidence(tracked, tmp_path,
                                                                                            monkeypatch):
    from soup_pipeline.tracking.stage_runs import replay

    repo = tmp_path / "repo"
    shutil.copytree(tracked.repo, repo, symlinks=True)
    write_params(repo, {"tracking": {"register_method": "auto"}})
    store = f"sqlite:///{tmp_path / 'auto.db'}"  # a store of its own: the flow's registry is left as it was
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    params = load_params(repo / "params.yaml")
    decision = json.loads((repo / "runs/eval/registration.json").read_text())  # the evaluate stage's, on select data
    assert decision["reference"] == "greedy" and {row["method"] for row in decision["candidates"]} == {
        "best_individual", "uniform", "greedy", "mehl_soup_plus", "mehl_soup_auto", "wise_ft_soup"}
    first, second = replay(params, repo), replay(params, repo)
    assert first["registered_version"] == second["registered_version"] == "1"  # idempotent
    version = client.get_model_version(MODEL, "1")
    assert version.tags["method"] == decision["method"] and version.tags["registered_by"] == "auto"
    assert version.tags["registration_reason"] == decision["reason"]
    assert (f"Registered by `register_method: auto` (the model select data prefer): {decision['reason']}"
            in version.description)
    assert "Basin: the uniform soup's fit accuracy is" in version.description
    assert str(client.get_registered_model(MODEL).aliases["champion"]) == "1"
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.data.params["registration"] == decision["method"] and "basin_gap" in parent.data.metrics
    made_by = [client.get_run(row["run_id"]) for row in mlflow.artifacts.load_dict(version.tags["lineage"])]
    assert [(run.info.run_name, run.data.tags["mlflow.parentRunId"]) for run in made_by] == [
        (f"finetune-{k}", first["mlflow_run_id"]) for k in (0, 1, 2)]  # the replay's own fine-tune runs

    # where the evaluation's decision file names the best individual (when only that member beats greedy soup on
    # select data), the member's own weights are registered, described as that fine-tune
    best = next(row for row in json.loads((repo / "runs/eval/methods.json").read_text())
                if row["method"] == "best_individual")
    (repo / "runs/eval/registration.json").write_text(json.dumps({**decision, "method": "best_individual"}))
    assert replay(params, repo)["registered_version"] == "2"
    version = client.get_model_version(MODEL, "2")
    member = repo / "runs/ingredients" / f"{best['member']}.safetensors"
    assert (version.tags["method"] == "best_individual"
            and version.tags["soup_sha256"] == read_ingredient(member).meta["sha256"])
    assert version.description.startswith(f"## best_individual: {best['member']}, the fine-tune with the highest fit")


def test_flow_registers_the_soup_with_its_provenance_and_promotes_it(tracked):
    assert tracked.summary["registered_version"] == "1"
    version = MlflowClient().get_model_version(MODEL, "1")
    row = next(r for r in tracked.summary["rows"] if r["method"] == "mehl_soup_auto")
    assert version.tags["method"] == "mehl_soup_auto" and version.tags["K"] == "3" and version.tags["b"] == "2"
    assert float(version.tags["select_acc"]) == pytest.approx(row["select_acc"])
    assert float(version.tags["test_vs_greedy"]) == pytest.approx(row["test_vs_greedy"])
    assert version.tags["chosen_grouping"] in {"tensor", "block", "model"}
    assert "| mehl_soup_auto |" in version.description and "mixing_weights/beta.png" in version.description
    search = json.loads((tracked.repo / "runs" / "soups" / "mehl_soup_auto" / "search.json").read_text())
    grid = FAST["soup"]["methods"]["mehl_soup_auto"]["search"]
    assert [(r["grouping"], r["lr"]) for r in search] == [(g, lr) for g in grid["groupings"] for lr in grid["lrs"]]
    assert sum(r["chosen"] for r in search) == 1
    assert float(version.tags["test_acc"]) == pytest.approx(row["test_acc"])
    assert version.tags["git_commit"] == sh("git", "rev-parse", "HEAD", cwd=tracked.repo).strip()
    assert version.tags["dvc_lock_hash"] == file_sha256(tracked.repo / "dvc.lock")
    assert len(version.tags["params_hash"]) == 64
    assert str(MlflowClient().get_registered_model(MODEL).aliases["champion"]) == "1"
    lineage = json.loads(Path(mlflow.artifacts.download_artifacts(version.tags["lineage"])).read_text())
    assert [(row["source_uri"], row["sha256"]) for row in lineage] == [  # traced back to the stages that made them
        (f"finetune@{k}", file_sha256(tracked.repo / "runs" / "ingredients" / f"member-{k}.safetensors"))
        for k in (0, 1, 2)]


def test_lineage_leads_from_the_champion_to_each_members_fine_tune_run_and_learning_rate(tracked):
    client = MlflowClient()  # the calls of docs/pipeline.md ("From the registered soup to its runs")
    version = client.get_model_version_by_alias("soup-pipeline-soup", "champion")
    lineage = mlflow.artifacts.load_dict(version.tags["lineage"])
    learning_rates = {row["ingredient"]: client.get_run(row["run_id"]).data.params["hparams.lr"] for row in lineage}

    sidecars = {name: read_ingredient(tracked.repo / "runs/ingredients" / f"{name}.safetensors").meta
                for name in learning_rates}
    assert {name: float(lr) for name, lr in learning_rates.items()} == {
        f"member-{k}": sidecars[f"member-{k}"]["hparams"]["lr"] for k in (0, 1, 2)}
    assert not any("run_id" in meta for meta in sidecars.values())  # run ids live in MLflow, not in the DVC outputs
    parent = client.get_run(version.run_id).data.tags["mlflow.parentRunId"]  # the pipeline run the soup's run is in
    assert parent == tracked.summary["mlflow_run_id"]
    made_by = {row["ingredient"]: client.get_run(row["run_id"]) for row in lineage}
    assert {name: (run.info.run_name, run.data.tags["mlflow.parentRunId"], run.data.params["sha256"])
            for name, run in made_by.items()} == {
        name: (f"finetune-{meta['member']}", parent, meta["sha256"]) for name, meta in sidecars.items()}


def test_the_registered_soup_loads_through_pyfunc_as_the_torch_soup_with_nothing_pickled(tracked):
    loaded = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    splits = load_splits(load_params(tracked.repo / "params.yaml"))
    images = splits.test.tensors[0][:16]
    soup_file = tracked.repo / "runs/soups/mehl_soup_auto/soup.safetensors"
    torch_soup = classifier_from_spec(read_ingredient(soup_file).meta["classifier_spec"])
    torch_soup.load_state_dict(load_file(str(soup_file)))
    with torch.no_grad():
        expected = torch.softmax(torch_soup.eval()(images), -1).numpy()
    answer = loaded.predict(images.numpy())  # preprocessed float arrays are taken as they are
    assert np.allclose(answer[[f"p_{name}" for name in splits.classnames]].to_numpy(), expected, atol=1e-5)
    source = MlflowClient().get_model_version(MODEL, "1").source
    files = [path for path in Path(mlflow.artifacts.download_artifacts(source)).rglob("*") if path.is_file()]
    assert not [path for path in files if path.suffix in (".pkl", ".pickle", ".pt", ".pth", ".joblib")]
    assert {path.suffix for path in files} >= {".safetensors", ".py"}  # weights as safetensors, the model as code


def test_the_flow_souped_on_two_processes_as_one_process_would(tracked, tmp_path):
    pipeline = tracked
    root = tmp_path / "alone"  # the flow's inputs, souped again here in this one process
    for folder in ("data", "ingredients"):
        shutil.copytree(pipeline.repo / "runs" / folder, root / "runs" / folder)
    params = load_params(pipeline.repo / "params.yaml")
    assert params.soup.method("mehl_soup_plus").nproc == 2
    alone = soup_stage.run(params.model_copy(update={"soup": params.soup.model_copy(update={"nproc": 1})}), root,
                           "mehl_soup_plus")
    flow = load_file(str(pipeline.repo / "runs/soups/mehl_soup_plus/soup.safetensors"))
    assert max(float((alone.state_dict[key] - flow[key]).abs().max()) for key in flow) < 1e-5
    (run,) = children(pipeline.summary["mlflow_run_id"])["mehl_soup_plus"]  # tracked from the files rank 0 wrote
    assert run.data.params["soup.nproc"] == "2" and run.data.metrics["construction_s"] > 0
    assert json.loads(StagePaths(pipeline.repo).soup_cost("mehl_soup_plus").read_text())["processes"] == 2  # torchrun


def test_side_by_side_soups_on_different_gpus_build_at_once_and_a_refinement_waits_for_its_soup(tracked, tmp_path,
                                                                                                monkeypatch):
    """The flow's soups with `soup.side_by_side`, placed by a given device list (two GPU names; the soups compute on
    the CPU): uniform and greedy, on two GPUs, meet while both build; wise_ft_soup, on uniform's GPU, starts after
    greedy, the soup it refines, is written; the files are the bytes the sequential flow wrote."""
    from prefect import flow
    from prefect.task_runners import ThreadPoolTaskRunner

    from soup_pipeline.prefect.pipeline import build_soups

    pipeline = tracked
    root = tmp_path / "side"
    for folder in ("data", "ingredients", "base"):
        shutil.copytree(pipeline.repo / "runs" / folder, root / "runs" / folder)
    params = load_params(pipeline.repo / "params.yaml", {
        "soup": {"side_by_side": True, "methods": {"uniform": {}, "greedy": {}},
                 "refine": {"wise_ft_soup": {"soup": "greedy", "search": {"alphas": [0.5, 1.0]}}}},
        "tracking": {"register_method": "greedy"}})
    placed = {"uniform": ["cuda:0"], "greedy": ["cuda:1"], "wise_ft_soup": ["cuda:0"]}
    monkeypatch.setattr(soup_stage, "soup_devices", lambda params, method: placed[method])
    build, meeting, spans = soup_stage.run, threading.Barrier(2, timeout=120), {}

    def timed(params, root, method):
        start = time.monotonic()
        if method in ("uniform", "greedy"):
            meeting.wait()  # broken, failing the flow, unless the other one builds at the same time
        result = build(params, root, method)
        spans[method] = (start, time.monotonic())
        return result

    monkeypatch.setattr(soup_stage, "run", timed)

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=3), validate_parameters=False)
    def soups_only(params, root: str) -> dict:
        return build_soups(params, root)

    results = soups_only(params, str(root))
    assert list(results) == ["uniform", "greedy", "wise_ft_soup"]
    assert spans["wise_ft_soup"][0] >= spans["greedy"][1]
    for method in ("uniform", "greedy"):
        built = f"runs/soups/{method}/soup.safetensors"
        assert file_sha256(root / built) == file_sha256(pipeline.repo / built), method
    assert (root / "runs/soups/wise_ft_soup/soup.safetensors").is_file()


def test_dvc_status_is_clean_and_pushed_after_a_flow_run(pipeline):
    assert pipeline.summary["dvc_committed"]
    assert changed_stages(pipeline.repo) == {}
    assert json.loads(sh("dvc", "status", "--cloud", "--json", cwd=pipeline.repo) or "{}") == {}


def test_interrupted_sweep_fails_then_rerun_reuses_finished_members_and_drops_a_broken_one(harness, tmp_path,
                                                                                          monkeypatch):
    root = make_repo(tmp_path / "dvc")  # a DVC repo: the flow could commit, and must not for a partial sweep
    write_params(root, FAST)
    sh("git", "commit", "-qam", "fast params", cwd=root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    paths = StagePaths(root)
    for k in (1, 2):  # a folder where the ingredient file goes: saving it fails, also on retry
        paths.ingredient(k).mkdir(parents=True)
    with pytest.raises(SoupError, match=r"only members \[0\] of \[0, 1, 2\] finished"):
        run_flow(root)
    before = stamp(paths.ingredient(0))
    failed_runs = MlflowClient().search_runs([mlflow.get_experiment_by_name(EXPERIMENT).experiment_id],
                                             filter_string="attributes.status = 'FAILED'")
    (failed,) = [run for run in failed_runs if "mlflow.parentRunId" not in run.data.tags]
    assert len(children(failed.info.run_id)["finetune-1"]) == 2  # the retry ran

    paths.ingredient(1).rmdir()
    summary = run_flow(root)
    assert summary["K"] == 2 and summary["members"] == [0, 1] and not summary["dvc_committed"]
    assert not (root / "dvc.lock").exists()  # nothing recorded as current for a sweep that lost a member
    assert stamp(paths.ingredient(0)) == before
    runs = children(summary["mlflow_run_id"])
    assert runs["finetune-0"][0].data.params["reused"] == "True"
    assert runs["finetune-1"][0].data.params["reused"] == "False"
    assert runs["mehl_soup_plus"][0].data.params["K"] == "2"
    assert MlflowClient().get_model_version(MODEL, summary["registered_version"]).tags["K"] == "2"


def test_unreachable_tracking_server_fails_before_any_work(harness, tmp_path, monkeypatch):
    root = params_root(tmp_path / "root")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(SoupError, match="not reachable"):
        run_flow(root)
    assert [path.name for path in (root / "runs").iterdir()] == [".lock"]  # the root's lock file, nothing computed


def test_while_the_flow_computes_dvc_repro_is_refused_by_dvcs_own_lock(harness, tmp_path):
    from prefect.settings import PREFECT_API_URL

    repo = make_repo(tmp_path)  # TINY: a minute or more of work, stopped once DVC has been refused
    write_params(repo, {"tracking": {"enabled": False}})
    sh("git", "commit", "-qam", "no tracking", cwd=repo)
    dvc = [sys.executable, "-m", "dvc"]
    computing = StagePaths(repo).data_manifest  # prepare's output: the flow holds DVC's lock from before it
    env = {**tool_env(), "PREFECT_API_URL": PREFECT_API_URL.value()}  # the session's Prefect server
    with spawn([str(Path(sys.executable).with_name("soup-pipeline")), "run"], tmp_path / "flow.log", env, repo) as flow:
        deadline = time.monotonic() + 120
        while not computing.is_file():
            assert flow.poll() is None, (tmp_path / "flow.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the flow prepared no data in 120 s"
            time.sleep(0.1)
        done = subprocess.run([*dvc, "repro"], cwd=repo, capture_output=True, text=True, env=tool_env(), timeout=300)
        assert flow.poll() is None, "the flow ended before DVC gave up"  # it was computing all along
        assert done.returncode != 0 and "Unable to acquire lock" in done.stderr, done.stderr[-3000:]
    assert flow.returncode is not None  # stopped (SIGTERM to its process group) on leaving the block
    assert not (repo / "dvc.lock").exists()  # DVC ran no stage, the stopped flow committed none
    assert subprocess.run([*dvc, "status"], cwd=repo, env=tool_env()).returncode == 0  # the lock went with the flow


def test_a_run_beside_a_dvc_command_is_refused_before_any_work_or_mlflow_run(harness, tmp_path, monkeypatch):
    repo = make_repo(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    dvc_lock = zc.lockfile.LockFile(str(repo / ".dvc" / "tmp" / "lock"))  # what a running `dvc repro` holds
    try:
        with pytest.raises(SoupError, match="a DVC command is running"):
            run_flow(repo)
    finally:
        dvc_lock.close()
    assert [path.name for path in (repo / "runs").iterdir()] == [".lock"]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is None or not client.search_runs([experiment.experiment_id])


def test_a_run_on_a_root_another_process_writes_is_refused_before_any_work(harness, tmp_path):
    root = params_root(tmp_path / "root")
    with root_lock(root, "soup"), pytest.raises(SoupError, match="is in use"):
        run_flow(root)
    assert [path.name for path in (root / "runs").iterdir()] == [".lock"]


def test_nightly_deployment_runs_on_a_real_prefect_server_with_the_sweep_on_dask(tmp_path):
    root = params_root(tmp_path / "root", SOUPS_WITHOUT_LEARNING)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri, "SOUP_TASK_RUNNER": "dask"}
    with prefect_server(tmp_path / "prefect") as api, serve_deployment(
        api, tmp_path, name="nightly-test", params=root / "params.yaml", root=root, env=env
    ) as serve:
        assert deployment(api, "nightly-test")["schedules"][0]["schedule"]["cron"] == NIGHTLY
        output = cli(api, "deployment", "run", "soup-pipeline/nightly-test")
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", output).group(1)
        run = poll(lambda: finished_flow_run(api, flow_run_id), timeout_s=300, process=serve,
                   log=tmp_path / "serve-nightly-test.log")
    assert run["state"]["type"] == "COMPLETED", (tmp_path / "serve-nightly-test.log").read_text()[-3000:]
    client = MlflowClient(uri)
    (parent,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id],
                                   filter_string=f"tags.prefect_flow_run_id = '{flow_run_id}'")
    assert parent.info.status == "FINISHED" and parent.data.metrics["K"] == 3
    tunes = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = "
                               f"'{parent.info.run_id}' and tags.kind = 'finetune'")
    # on Dask workers
    assert len(tunes) == 3 and all(run.data.params["pid"] != parent.data.tags["pid"] for run in tunes)


def test_prefect_yaml_deployment_runs_on_a_worker_and_runs_never_overlap(tmp_path):
    root = params_root(tmp_path / "root", SOUPS_WITHOUT_LEARNING)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with prefect_server(tmp_path / "prefect") as api:
        cli(api, "work-pool", "create", "soup-pipeline", "--type", "process")
        cli(api, "--no-prompt", "deploy", "--all", cwd=PROJECT)  # reads the project's prefect.yaml
        nightly = deployment(api, "nightly")
        assert nightly["schedules"][0]["schedule"]["cron"] == NIGHTLY and nightly["work_pool_name"] == "soup-pipeline"
        assert nightly["global_concurrency_limit"]["limit"] == 1
        overrides = ["--param", f"root={root}", "--param", f"params_path={root / 'params.yaml'}"]
        ids = [re.search(r"UUID: ([0-9a-f-]{36})",
                         cli(api, "deployment", "run", "soup-pipeline/nightly", *overrides)).group(1)
               for _ in range(2)]
        with worker(api, tmp_path, pool="soup-pipeline", env={"MLFLOW_TRACKING_URI": uri}) as process:
            runs = [poll(lambda: finished_flow_run(api, run_id), timeout_s=400, process=process,
                         log=tmp_path / "worker-soup-pipeline.log") for run_id in ids]
        states = {run_id: flow_run_states(api, run_id) for run_id in ids}
    assert [run["state"]["type"] for run in runs] == ["COMPLETED", "COMPLETED"], states
    first, second = sorted(runs, key=lambda run: run["start_time"])
    assert second["start_time"] >= first["end_time"]  # the concurrency slot kept them apart
    assert "AwaitingConcurrencySlot" in states[second["id"]]  # the second run waited for it
