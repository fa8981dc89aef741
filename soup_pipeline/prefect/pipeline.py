"""The soup pipeline as one Prefect flow, calling the same stage functions as `dvc repro`.

prepare -> pretrain -> import (external checkpoints, when `imports.sources` names any) -> sweep (one task per
member, fanned out on the task runner) -> one soup per method (one after another, so each is timed and measured
alone; with `soup.side_by_side`, those on different GPUs at once) -> evaluate -> ablate ->
`dvc commit` (+ `dvc push`) -> MLflow tables, soup runs and the registered soup.

The task runner is threads by default; SOUP_TASK_RUNNER=dask runs the sweep on Dask, on the
scheduler at SOUP_DASK_ADDRESS or on a local cluster. A rerun with unchanged inputs reuses every
finished fine-tune; a member that still fails after its retry is dropped and the soup goes on
with the rest, as long as two remain.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task, unmapped
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from soup_pipeline.config import Params, load_params
from soup_pipeline.core.ingredients import Ingredient
from soup_pipeline.runtime.errors import SoupError
from soup_pipeline.runtime.kill_points import reached
from soup_pipeline.runtime.lock import file_lock, root_lock
from soup_pipeline.runtime.placement import DeviceSlots, device_slots, placed_device, visible_gpus
from soup_pipeline.soups import SoupResult
from soup_pipeline.soups.engine.base import overfitting_said_once
from soup_pipeline.stages import ablate, evaluate, finetune, importer, prepare, pretrain, soup
from soup_pipeline.tracking import stage_runs as track, tracking_uri
from soup_pipeline.tracking.mlflow_sources import mlflow_sources
from soup_pipeline.tracking.pipeline_registration import recorded_results
from soup_pipeline.workspace.code import CODE_DIGESTS, write_code_digests
from soup_pipeline.workspace.loading import member_ids, with_members
from soup_pipeline.workspace.paths import StagePaths

MIN_MEMBERS = 2  # a soup of fewer ingredients is not a soup
SOUP_SLOTS = DeviceSlots(per_device=1, cpu=True)  # one soup at a time on each device, the CPU included

# Results stay in memory: the files under runs/ are the cache (DVC's and the stages' own reuse).
stage_task = functools.partial(task, persist_result=False)


def runner_kind() -> str:
    """The task runner SOUP_TASK_RUNNER names: "threads" (the default) or "dask"."""
    return os.environ.get("SOUP_TASK_RUNNER", "threads")


def task_runner() -> TaskRunner:
    """Threads by default; SOUP_TASK_RUNNER=dask gives a DaskTaskRunner (SOUP_DASK_ADDRESS: an existing scheduler)."""
    kind = runner_kind()
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=os.cpu_count())  # one fine-tune per core; per GPU: `device_slots`
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=os.environ.get("SOUP_DASK_ADDRESS"))
    raise SoupError(f"SOUP_TASK_RUNNER={kind!r} is not a task runner; use 'threads' or 'dask'")


@stage_task
def prepare_task(params: Params, root: str) -> dict:
    return prepare.run(params, root)


@stage_task(retries=1, retry_delay_seconds=5)  # reads MLflow sources: a retry only for I/O
def import_task(params: Params, root: str) -> list[Ingredient]:
    return importer.run_params(params, root, remote=mlflow_sources(tracking_uri(root)))


@stage_task
def pretrain_task(params: Params, root: str) -> dict:
    return pretrain.run(params, root, reuse=True)


@stage_task(retries=1, retry_delay_seconds=2)
def finetune_task(params: Params, root: str, member: int, tracker: track.Tracker) -> Ingredient:
    """One member on its device, waiting while `sweep.per_device` fine-tunes of this process hold that GPU."""
    device = placed_device(params.sweep.device, member, visible_gpus())
    with device_slots(params.sweep.per_device).hold(device):
        return track.tracked_finetune(tracker, member, StagePaths(Path(root)).ingredient(member),
                                      lambda: finetune.run(params, root, member, reuse=True))


@stage_task
def soup_task(params: Params, root: str, method: str) -> SoupResult:
    """One soup, holding every device it occupies while it builds."""
    with SOUP_SLOTS.hold_all(soup.soup_devices(params, method)):
        return soup.run(params, root, method)


@stage_task
def evaluate_task(params: Params, root: str) -> list[dict]:
    return evaluate.run(params, root)


@stage_task
def ablate_task(params: Params, root: str) -> dict:
    return ablate.run(params, root)


@stage_task
def record_soup_task(tracker: track.Tracker, params: Params, root: str, result: SoupResult, row: dict,
                     register: bool) -> str | None:
    return track.record_soup(tracker, params, root, result, row, register=register)


@stage_task(retries=1, retry_delay_seconds=5)
def dvc_commit_task(root: str, follows_params: bool) -> bool:
    """`dvc commit` the changed stages so `dvc status` is clean, and `dvc push` to a default remote.

    Returns False outside a DVC repo, and (with a warning) when the outputs do not follow
    root/params.yaml with every member: dvc.lock would then record what was not computed.
    Only stages `dvc status` reports are committed: committing an unchanged stage rewrites its outputs.
    """
    if not (Path(root, ".dvc").is_dir() and Path(root, "dvc.yaml").is_file()):
        return False
    if not follows_params:
        get_run_logger().warning("outputs not committed to DVC: members were dropped, overrides were given "
                                 "or the params file is not %s/params.yaml", root)
        return False
    changed = json.loads(_dvc(root, "status", "--json").stdout or "{}")
    if changed:
        _dvc(root, "commit", "--force", "--quiet", *changed)
        reached("dvc-committed")
    if _dvc(root, "config", "core.remote", check=False).stdout.strip():
        _dvc(root, "push", "--quiet")
    return True


def dvc_repo_lock(root: str) -> contextlib.AbstractContextManager[None]:
    """DVC's own repository lock (`.dvc/tmp/lock`, an flock as DVC takes it), so that no `dvc repro` runs beside
    the flow's stages (it would clear their outputs); nothing outside a DVC repo."""
    if not Path(root, ".dvc").is_dir():
        return contextlib.nullcontext()
    return file_lock(Path(root, ".dvc", "tmp", "lock"), "run", f"a DVC command is running in {root}",
                     "Wait for it to finish before `soup-pipeline run`")


def _dvc(root: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    process = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)
    if check and process.returncode != 0:
        raise SoupError(f"`dvc {' '.join(args)}` failed in {root}:\n{process.stderr.strip()[-2000:]}")
    return process


def gpu_resource(params: Params) -> contextlib.AbstractContextManager:
    """On Dask with `sweep.device` cuda: each fine-tune asks for one `GPU` worker resource (start the workers with
    `--resources GPU=<per_device>` per GPU); elsewhere nothing (the thread runner's fine-tunes share `device_slots`)."""
    if runner_kind() != "dask" or not params.sweep.device.startswith("cuda"):
        return contextlib.nullcontext()
    import dask

    return dask.annotate(resources={"GPU": 1})


def build_soups(params: Params, root: str) -> dict[str, SoupResult]:
    """Every soup of the build order: one after another, or with `soup.side_by_side` each as a task on the thread
    runner, holding its devices (`SOUP_SLOTS`: soups on different GPUs build at the same time, those on one device,
    the CPU included, in turn; a refinement waits for the soup it refines)."""
    on_dask = runner_kind() == "dask"
    if params.soup.side_by_side and on_dask:
        get_run_logger().warning("soup.side_by_side holds the GPUs of this process's threads; on Dask the soups are "
                                 "built here one after another")
    if not params.soup.side_by_side or on_dask:
        return {method: soup_task(params, root, method) for method in params.soup.built}
    futures: dict[str, PrefectFuture] = {}
    for method in params.soup.built:
        refined = [futures[params.soup.method(method).soup]] if method in params.soup.refine else []
        futures[method] = soup_task.submit(params, root, method, wait_for=refined)
    return {method: future.result() for method, future in futures.items()}


def run_sweep(params: Params, root: str, tracker: track.Tracker) -> list[int]:
    """Fine-tune every member on the task runner; return those that finished (a failed one is dropped)."""
    members = member_ids(params)
    with gpu_resource(params):
        futures = finetune_task.map(unmapped(params), unmapped(root), members, unmapped(tracker))
    kept = []
    for member, future in zip(members, futures):
        future.wait()
        if future.state.is_completed():
            kept.append(member)
        else:
            get_run_logger().warning("sweep member %d failed after its retry (%s); souping without it",
                                     member, future.state.message)
    if len(kept) < MIN_MEMBERS:
        raise SoupError(f"only members {kept} of {members} finished; a soup needs at least {MIN_MEMBERS}. "
                        "Fix the failures logged above and rerun: finished members are reused, not recomputed")
    return kept


@flow(name="soup-pipeline", task_runner=task_runner())
def soup_pipeline_flow(params_path: str = "params.yaml", root: str = ".", overrides: dict | None = None) -> dict:
    """Run the whole pipeline under `root` (outputs in root/runs/); return K, the members used, the
    evaluation rows, the registered version, the MLflow parent run id, whether DVC was committed and
    what could not be logged because MLflow failed mid-run (`soup-pipeline track` logs it later)."""
    root = str(Path(root).resolve())
    params_file = Path(params_path).resolve()
    params = load_params(params_file, overrides)
    with root_lock(root, "run"), contextlib.ExitStack() as dvc_locked:
        dvc_locked.enter_context(dvc_repo_lock(root))  # before the MLflow run: a refused run leaves none behind
        if Path(root, CODE_DIGESTS).is_dir():  # a scaffolded project: its stages depend on the installed code's digests
            write_code_digests(root)
        with track.pipeline(params, root, run_name=flow_run.name,
                            tags={"prefect_flow_run_id": flow_run.id}) as tracker:
            prepare_task(params, root)
            pretrain_task(params, root)
            import_task(params, root)
            kept = run_sweep(params, root, tracker)
            complete = kept == member_ids(params)
            params = with_members(params, kept)
            with overfitting_said_once():  # one warning names every soup whose coefficients outnumber the fit data
                results = build_soups(params, root)
                rows = evaluate_task(params, root)
                ablate_task(params, root)
            dvc_locked.close()  # DVC's lock is released for the flow's own `dvc commit` and `dvc push`
            committed = dvc_commit_task(root, complete and not overrides and params_file == Path(root, "params.yaml"))
            track.log_tables(tracker, params, root, rows)
            by_method = {row["method"]: row for row in rows}
            recorded, chosen = recorded_results(params, root, results)
            versions = [record_soup_task(tracker, params, root, result, by_method[method], register=method == chosen)
                        for method, result in recorded.items()]
    return {"K": len(kept), "members": kept, "rows": rows, "registered_version": next(filter(None, versions), None),
            "mlflow_run_id": tracker.parent_run_id, "dvc_committed": committed,
            "tracking_missed": track.missed(tracker)}
