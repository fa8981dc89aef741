"""Faults during a run: what a killed run leaves behind is closed or reused by the next one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from prefect.settings import PREFECT_API_URL

from dvc_repo import make_repo, sh, tool_env, write_params
from flow_run import fast_repo, lock_file
from mlflow_server import free_port, serve_mlflow
from prefect_server import prefect_server, spawn
from soup_pipeline.config import Params
from soup_pipeline.core.ingredients import file_sha256
from soup_pipeline.runtime.kill_points import KILL_AT_ENV
from soup_pipeline.tracking import stage_runs as track
from soup_pipeline.tracking.orphans import RESUMED_BY_TAG, ROOT_TAG
from soup_pipeline.workspace.paths import StagePaths


def test_the_next_run_closes_what_a_killed_run_left_running(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    root, elsewhere = tmp_path / "root", tmp_path / "other-root"
    root.mkdir()
    params = Params.model_validate({"tracking": {"experiment": "faults", "system_metrics": False}})
    with track.pipeline(params, root) as first:  # a finished run of this root stays as it is
        pass
    client = MlflowClient()
    experiment = client.get_run(first.parent_run_id).info.experiment_id
    killed = client.create_run(experiment, tags={ROOT_TAG: str(root.resolve())}).info.run_id  # as a SIGKILL leaves it
    child = client.create_run(experiment, tags={"mlflow.parentRunId": killed}).info.run_id
    done_child = client.create_run(experiment, tags={"mlflow.parentRunId": killed}).info.run_id
    client.set_terminated(done_child, "FINISHED")
    other = client.create_run(experiment, tags={ROOT_TAG: str(elsewhere.resolve())}).info.run_id  # another root's
    with track.pipeline(params, root) as tracker:
        for run_id in (killed, child):
            run = client.get_run(run_id)
            assert run.info.status == "KILLED" and run.data.tags[RESUMED_BY_TAG] == tracker.parent_run_id
        assert client.get_run(tracker.parent_run_id).info.status == "RUNNING"
    assert (client.get_run(done_child).info.status == "FINISHED"
            and RESUMED_BY_TAG not in client.get_run(done_child).data.tags)
    assert client.get_run(other).info.status == "RUNNING"
    assert client.get_run(first.parent_run_id).info.status == "FINISHED"


KILL = {  # on top of TINY: a short run (the tracking-server and Dask-worker tests)
    "data": {"pretrain_size": 60, "train_size": 40, "heldout_size": 40, "test_size": 40},
    "pretrain": {"epochs": 1},
    "sweep": {"epochs_range": [1, 1]},
    "soup": {"device": "cpu", "batch_size": 16, "methods": {"greedy": {}, "mehl_soup_auto": {"passes": 1.0}},
             "refine": {}},
    "evaluate": {"ingredient_counts": [], "remove_top": [], "bootstrap_resamples": 200},
    "tracking": {"system_metrics": False, "register_method": "mehl_soup_auto"},
}


def start(command: list[str], repo: Path, point: str | None = None) -> subprocess.Popen:
    """`command` in its own process group (what a kill point kills), SOUP_KILL_AT=point when given; flows
    report to the session's Prefect server (the `harness` fixture) rather than each starting one."""
    env = {**tool_env(), "PREFECT_API_URL": PREFECT_API_URL.value(), **({KILL_AT_ENV: point} if point else {})}
    return subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def killed_at(command: list[str], repo: Path, point: str) -> None:
    """Run `command` until it dies at kill point `point`."""
    process = start(command, repo, point)
    log = process.communicate(timeout=600)[0]
    assert process.returncode == -signal.SIGKILL, f"not killed at {point}:\n{log[-5000:]}"


def finished(command: list[str], repo: Path) -> None:
    process = start(command, repo)
    log = process.communicate(timeout=600)[0]
    assert process.returncode == 0, log[-5000:]


def members_written(repo: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (repo / "runs" / "ingredients").glob("member-*.safetensors"))


def files_under(folder: Path) -> list[str]:
    """The names of the files in `folder` (hidden ones too): a file left behind is named when a test fails."""
    return sorted(path.name for path in folder.iterdir() if path.is_file())


def assert_nothing_half_written(repo: Path) -> None:
    assert not [p for p in repo.rglob("*.tmp") if ".git" not in p.parts], "a temporary file was left"


def blocks_reused(repo: Path, method: str) -> int:
    return json.loads(StagePaths(repo).soup_cost(method).read_text())["blocks_reused"]


RUN = [str(Path(sys.executable).with_name("soup-pipeline")), "run"]
REPRO = [str(Path(sys.executable).with_name("dvc")), "repro"]
KILLED_METHOD = "mehl_soup_plus"  # the first hyperplane soup of FAST: on two processes, so both ranks die in a block


@pytest.mark.slow
def test_a_run_killed_at_every_stage_in_turn_ends_as_the_uninterrupted_flow_and_loses_nothing(tmp_path, pipeline):
    repo = fast_repo(tmp_path, tmp_path / "remote")
    killed_at(RUN, repo, "pretrain-epoch")
    assert not StagePaths(repo).base_weights.exists()
    killed_at(RUN, repo, "finetune-saved")
    saved = members_written(repo)
    assert saved  # the member written before the kill
    killed_at(RUN, repo, "mehl-block")
    killed_at(RUN, repo, "evaluate-method")
    assert blocks_reused(repo, KILLED_METHOD) > 0  # MEHL resumed after its saved block, not redone
    killed_at(RUN, repo, "dvc-committed")
    killed_at(RUN, repo, "registered")
    finished(RUN, repo)

    assert files_under(repo / "runs" / "ingredients") == files_under(pipeline.repo / "runs" / "ingredients")
    assert lock_file(repo) == pipeline.lock  # every output bit-identical to the uninterrupted flow's
    assert_nothing_half_written(repo)
    assert json.loads(sh("dvc", "status", "--json", cwd=repo) or "{}") == {}
    assert json.loads(sh("dvc", "status", "--cloud", "--json", cwd=repo) or "{}") == {}  # pushed after all
    store = f"sqlite:///{repo / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    assert [str(v.version) for v in client.search_model_versions("name='soup-pipeline-soup'")] == ["1"]  # not two
    assert ({k: str(v) for k, v in client.get_registered_model("soup-pipeline-soup").aliases.items()}
            == {"champion": "1"})
    runs = client.search_runs([client.get_experiment_by_name("soup-pipeline").experiment_id],
                              order_by=["start_time ASC"])
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert [run.info.status for run in parents] == ["KILLED"] * 6 + ["FINISHED"]
    assert all(run.info.status != "RUNNING" for run in runs)
    assert all(RESUMED_BY_TAG in run.data.tags for run in runs if run.info.status == "KILLED")
    after_sweep_kill = parents[2]  # the run after the one killed mid-sweep: its finished members were reused
    reused = {run.data.tags["mlflow.runName"]: run.data.params.get("reused") for run in runs
              if run.data.tags.get("mlflow.parentRunId") == after_sweep_kill.info.run_id
              and run.data.tags.get("kind") == "finetune"}
    assert all(reused[f"finetune-{member}"] == "True" for member in saved), reused
    tunes = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parents[-1].info.run_id
             and run.data.tags.get("kind") == "finetune"]
    assert len(tunes) == 3 and all(run.data.params["reused"] == "True" for run in tunes)


@pytest.mark.slow
def test_dvc_repro_killed_at_every_stage_in_turn_ends_as_the_uninterrupted_flow(tmp_path, pipeline):
    repo = fast_repo(tmp_path)
    killed_at(REPRO, repo, "pretrain-epoch")
    killed_at(REPRO, repo, "finetune-saved:1")  # DVC has committed member 0; member 1 is written, not committed
    saved = {0: StagePaths(repo).ingredient(0).stat().st_mtime_ns}
    killed_at(REPRO, repo, "mehl-block")
    killed_at(REPRO, repo, "evaluate-method")
    assert blocks_reused(repo, KILLED_METHOD) > 0
    finished(REPRO, repo)

    assert lock_file(repo) == pipeline.lock  # DVC's outputs after four kills are the flow's, bit for bit
    assert {0: StagePaths(repo).ingredient(0).stat().st_mtime_ns} == saved  # a committed member is never redone
    assert_nothing_half_written(repo)
    assert json.loads(sh("dvc", "status", "--json", cwd=repo) or "{}") == {}


WRITE_UNDER_LIMIT = """
import resource, sys, torch
from soup_pipeline.core.ingredients import save_ingredient
from soup_pipeline.soups.engine.resume import save_state
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # as a full disk would: writes past 200 kB fail
if sys.argv[1] == "ingredient":
    save_ingredient({"w": torch.ones(100_000)}, sys.argv[2], meta={"member": 1})
else:
    save_state(__import__("pathlib").Path(sys.argv[2]), next_block=3, X=torch.ones(100_000, 1), norms=torch.ones(1, 1),
               soup={}, stream={}, history=[])
"""


@pytest.mark.parametrize("kind, name", [("ingredient", "member-1.safetensors"), ("state", "mehl_state.safetensors")])
def test_a_write_that_runs_out_of_room_keeps_the_previous_file_and_names_the_path(tmp_path, kind, name):
    from soup_pipeline.core.ingredients import save_ingredient

    target = tmp_path / name
    save_ingredient({"w": torch.zeros(10)}, target, meta={"member": 1})  # the previous, complete file
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    done = subprocess.run([sys.executable, "-c", WRITE_UNDER_LIMIT, kind, str(target)], capture_output=True, text=True)
    assert done.returncode == 1
    (last,) = done.stderr.strip().splitlines()[-1:]
    assert (last.startswith("soup_pipeline.runtime.errors.SoupError: could not write " + str(target))
            and "File too large" in last)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before  # intact, no partial file


@pytest.mark.slow
def test_a_tracking_server_lost_mid_run_does_not_stop_it_and_track_replays_it_from_the_files(tmp_path):
    repo = make_repo(tmp_path / "lost")
    write_params(repo, {**KILL, "soup": {**KILL["soup"], "methods": {"greedy": {}, "mehl_soup_plus": {"passes": 1.0}}},
                        "tracking": {**KILL["tracking"], "register_method": "mehl_soup_plus"}})
    sh("git", "commit", "-qam", "params", cwd=repo)
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}  # a lost server fails fast
    with contextlib.ExitStack() as server:
        uri = server.enter_context(serve_mlflow(tmp_path / "mlflow"))
        # files: no pipe fills
        with open(tmp_path / "flow.out", "w") as out, open(tmp_path / "flow.err", "w") as errors:
            flow = subprocess.Popen([str(Path(sys.executable).with_name("soup-pipeline")), "run"], cwd=repo, text=True,
                                    env={**tool_env(), **quick, "MLFLOW_TRACKING_URI": uri}, stdout=out, stderr=errors)
        marker = repo / "runs" / "soups" / "greedy" / "metrics.json"  # the sweep is logged; the soups are not yet
        deadline = time.monotonic() + 300
        while not marker.is_file() and flow.poll() is None:
            assert time.monotonic() < deadline, "the flow built no greedy soup in 300 s"
            time.sleep(0.1)
    flow.wait(timeout=600)  # the server stopped with the block above
    err = (tmp_path / "flow.err").read_text()
    assert flow.returncode == 0, err[-3000:]
    assert ("MLflow failed mid-run; not logged: " in err and "soup mehl_soup_plus" in err
            and "`soup-pipeline track`" in err)
    files = {path: (path.stat().st_mtime_ns, file_sha256(path)) for path in (repo / "runs").rglob("*")
             if path.is_file() and path.suffix in (".safetensors", ".json")}

    with serve_mlflow(tmp_path / "mlflow") as uri:  # the same store, back up on another port
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        for _ in range(2):  # a second replay logs again but registers nothing new
            done = subprocess.run([str(Path(sys.executable).with_name("soup-pipeline")), "track"], cwd=repo, text=True,
                                  env={**tool_env(), **quick, "MLFLOW_TRACKING_URI": uri}, capture_output=True)
            assert done.returncode == 0, done.stderr
        runs = client.search_runs([client.get_experiment_by_name("soup-pipeline").experiment_id])
        replays = sorted((run for run in runs if run.info.run_name == "replay"), key=lambda run: run.info.start_time)
        assert len(replays) == 2 and {run.info.status for run in replays} == {"FINISHED"}
        (lost,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags and run.info.run_name != "replay"]
        assert lost.info.status == "KILLED" and lost.data.tags[RESUMED_BY_TAG] == replays[0].info.run_id
        children = {run.info.run_name for run in runs
                    if run.data.tags.get("mlflow.parentRunId") == replays[0].info.run_id}
        assert children == {"finetune-0", "finetune-1", "finetune-2", "greedy", "mehl_soup_plus"}
        (version,) = client.search_model_versions("name='soup-pipeline-soup'")
        assert version.tags["soup_sha256"] == file_sha256(repo / "runs/soups/mehl_soup_plus/soup.safetensors")
    assert {path: (path.stat().st_mtime_ns, file_sha256(path)) for path in files} == files  # nothing recomputed


@pytest.mark.slow
def test_a_dask_worker_lost_mid_sweep_leaves_its_member_to_the_other_worker(tmp_path):
    from distributed import Client

    repo = make_repo(tmp_path / "dask")
    write_params(repo, {**KILL, "soup": {**KILL["soup"], "methods": {"greedy": {}}}, "tracking": {"enabled": False}})
    sh("git", "commit", "-qam", "params", cwd=repo)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    with prefect_server(tmp_path / "prefect") as api, contextlib.ExitStack() as cluster:
        env = {**tool_env(), "PREFECT_API_URL": api}
        module = [sys.executable, "-m"]
        cluster.enter_context(spawn([*module, "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port",
                                     str(port), "--no-dashboard"], tmp_path / "scheduler.log", env, tmp_path))
        workers = {name: cluster.enter_context(spawn(
            [*module, "distributed.cli.dask_worker", address, "--name", name, "--nthreads", "1", "--no-dashboard",
             "--memory-limit", "0"], tmp_path / f"{name}.log", env, tmp_path, sig=signal.SIGKILL))
            for name in ("doomed", "survivor")}
        client = cluster.enter_context(Client(address, timeout=60))
        client.wait_for_workers(2, timeout=60)
        client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.get_task_stream_index())  # records from now on
        with open(tmp_path / "flow.log", "w") as log:  # a file, not an unread pipe that could fill and stall the flow
            flow = subprocess.Popen([str(Path(sys.executable).with_name("soup-pipeline")), "run"], cwd=repo, text=True,
                                    env={**env, "SOUP_TASK_RUNNER": "dask", "SOUP_DASK_ADDRESS": address},
                                    stdout=log, stderr=subprocess.STDOUT)
        doomed = next(w for w, info in client.scheduler_info()["workers"].items() if info["name"] == "doomed")
        deadline = time.monotonic() + 240
        while not client.processing().get(doomed) and flow.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        lost = set(client.processing().get(doomed, ()))  # the fine-tunes it holds as it dies
        assert lost, "the doomed worker never got a fine-tune"
        os.killpg(workers["doomed"].pid, signal.SIGKILL)  # mid fine-tune
        flow.wait(timeout=600)
        assert flow.returncode == 0, (tmp_path / "flow.log").read_text()[-3000:]
        survivor = next(w for w, info in client.scheduler_info()["workers"].items() if info["name"] == "survivor")
        (removed,) = [event for event in client.run_on_scheduler(lambda dask_scheduler: [
            dict(event) for _, event in dask_scheduler.get_events(doomed)]) if event["action"] == "remove-worker"]
        assert not removed["expected"] and lost <= removed["processing-tasks"]  # the scheduler's record: unfinished
        story = client.run_on_scheduler(lambda dask_scheduler: [(t.key, t.start, t.finish, t.stimulus_id, t.timestamp)
                                                                for t in dask_scheduler.story(*lost)])
        removed_at = min(t for *_, stimulus, t in story if stimulus == removed["stimulus_id"])
        finished_on = {}  # each lost key: where the scheduler saw it finish, when its computation there began
        for key, worker, status, steps in client.run_on_scheduler(lambda dask_scheduler: [
                (r["key"], r["worker"], r["status"], list(r["startstops"])) for r in dask_scheduler.get_task_stream()]):
            if key in lost:
                start = min(step["start"] for step in steps if step["action"] == "compute")
                finished_on.setdefault(key, []).append((worker, status, start > removed_at))
        assert finished_on == {key: [(survivor, "OK", True)] for key in lost}  # redone there after the loss, once
        for key in lost:  # and the scheduler took the survivor's result as the task's: processing -> memory
            after = [(start, finish) for k, start, finish, _, t in story if k == key and t > removed_at]
            assert ("processing", "memory") in after, after
    made = {k: file_sha256(StagePaths(repo).ingredient(k)) for k in (0, 1, 2)}
    greedy = json.loads((repo / "runs" / "soups" / "greedy" / "beta.json").read_text())
    assert greedy["ingredients"] == ["member-0", "member-1", "member-2"]  # the soup was offered every member

    alone = tmp_path / "alone"  # the same members, fine-tuned undisturbed, one thread each as on a Dask worker
    for folder in ("data", "base"):
        shutil.copytree(repo / "runs" / folder, alone / "runs" / folder)
    for k in (0, 1, 2):
        sh(str(Path(sys.executable).with_name("soup-pipeline")), "--params", str(repo / "params.yaml"), "--root",
           str(alone), "finetune", "--member", str(k), cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert {k: file_sha256(StagePaths(alone).ingredient(k)) for k in (0, 1, 2)} == made
