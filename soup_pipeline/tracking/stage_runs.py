"""The MLflow runs of the pipeline's stages, for the Prefect flow and for `soup-pipeline track`: the parent run, a
nested run per fine-tune and per soup, the tables on the parent run, and the registration of the chosen model
(`pipeline_registration`).

A `Tracker` (tracking URI + parent run id) is passed to every task, so nested runs can be opened
from worker threads and Dask processes alike. With `tracking.enabled: false` every function
here does nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

from ..config import Params
from ..core.ingredients import Ingredient, read_ingredient
from ..runtime.errors import SoupError
from ..soups import SoupResult
from ..workspace.loading import member_ids, open_store, read_json, with_members
from ..workspace.paths import StagePaths
from ..workspace.results import ingredient_rows, read_result
from . import orphans
from .pipeline_registration import ROW_METRICS, decision, log_beta, recorded_results, register_pipeline_soup
from .provenance import git_commit, params_hash
from .records import log_params, log_scalars, log_series, log_table
from .runs import connect, nested_run, pipeline_run, tracking_uri

LOGGER = logging.getLogger(__name__)
T = TypeVar("T")
BASIN_METRICS = ("uniform_fit_acc", "best_fit_acc", "gap", "mean_cosine")  # of runs/eval/basin.json, on the parent run


@dataclass(frozen=True)
class Tracker:
    """Where a flow run's MLflow runs go; `parent_run_id` None means tracking is off."""

    uri: str | None = None
    parent_run_id: str | None = None

    @property
    def enabled(self) -> bool:
        return self.parent_run_id is not None


# --- runs -------------------------------------------------------------------------------------


@contextlib.contextmanager
def pipeline(params: Params, root: str | Path, *, run_name: str | None = None,
             tags: Mapping[str, Any] | None = None) -> Iterator[Tracker]:
    """The parent run of one flow run, with the resolved params; fails fast if the tracking server is down.

    Runs of this root that a killed flow left RUNNING are closed as KILLED, tagged with this run
    (the caller holds the root's lock, so no live flow owns them).
    """
    if not params.tracking.enabled:
        yield Tracker()
        return
    uri = tracking_uri(root)
    where = str(Path(root).resolve())
    run_tags = {"params_hash": params_hash(params), "git_commit": git_commit(root), orphans.ROOT_TAG: where,
                "pid": os.getpid(), **(tags or {})}
    with pipeline_run(params.tracking.experiment, uri=uri, run_name=run_name, tags=run_tags,
                      system_metrics=params.tracking.system_metrics) as run_id:
        closed = orphans.close_orphans(where, run_id)
        if closed:
            LOGGER.warning("closed %d MLflow runs a killed pipeline run left RUNNING (now KILLED, tagged %s=%s)",
                           len(closed), orphans.RESUMED_BY_TAG, run_id)
        log_params(params.model_dump(mode="json"))
        yield Tracker(uri, run_id)


@contextlib.contextmanager
def child_run(tracker: Tracker, name: str, *, kind: str) -> Iterator[None]:
    """A run nested under the flow's parent run, from any thread or process; nothing when tracking is off."""
    if not tracker.enabled:
        yield
        return
    connect(tracker.uri)  # a Dask worker process starts with MLflow unconfigured
    with nested_run(name, kind=kind, parent_run_id=tracker.parent_run_id):
        yield


# --- logging that outlives the tracking server -------------------------------------------------

MISSED: dict[str, list[str]] = {}  # per parent run (in this process): what was not logged since MLflow failed


def missed(tracker: Tracker) -> list[str]:
    """What this process could not log for the tracker's run (empty while MLflow answers)."""
    return list(MISSED.get(tracker.parent_run_id or "", []))


def attempt(tracker: Tracker, what: str, log: Callable[[], T]) -> T | None:
    """Run `log` (MLflow calls only: the computation is done and on disk); None when tracking is off.

    When the tracking server fails, `what` is noted as missed, one warning says how to replay it,
    and every later attempt of the run is skipped at once rather than waiting on a server that is
    gone: the run finishes, and `soup-pipeline track` logs it all from the files afterwards.
    """
    if not tracker.enabled:
        return None
    lost = MISSED.setdefault(tracker.parent_run_id, [])
    if lost:
        lost.append(what)
        return None
    try:
        return log()
    except SoupError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever MLflow or the network raises when the server is gone
        lost.append(what)
        LOGGER.warning("MLflow (%s) failed while logging %s (%s); the run goes on untracked: run `soup-pipeline track` "
                       "once the server is back to log it from the files", tracker.uri, what, exc)
        return None


# --- what each step logs ----------------------------------------------------------------------


def tracked_finetune(tracker: Tracker, member: int, path: Path, fine_tune: Callable[[], Ingredient]) -> Ingredient:
    """Run `fine_tune` (member `member`, written to `path`; a finished one whose stage inputs are unchanged is reused)
    in its own nested run, which ends FAILED if the fine-tune fails; MLflow failing does not stop it (`attempt`)."""
    before = path.stat().st_mtime_ns if path.is_file() else None
    what = f"fine-tune {member}"
    with contextlib.ExitStack() as run:
        opened = attempt(tracker, what, lambda: run.enter_context(child_run(tracker, f"finetune-{member}",
                                                                           kind="finetune")) or True)
        start = time.perf_counter()
        ingredient = fine_tune()
        seconds = time.perf_counter() - start
        if opened:
            attempt(tracker, what, lambda: log_finetune(ingredient, member, reused=before == path.stat().st_mtime_ns,
                                                        seconds=seconds, pid=os.getpid()))
            attempt(tracker, what, run.close)  # ends the run here, so a lost server cannot fail the fine-tune
    return ingredient


def log_finetune(ingredient: Ingredient, member: int, *, reused: bool, seconds: float | None,
                 pid: int | None = None) -> None:
    """Into the active nested run: hyperparameters, base model, content hash, whether the fine-tune was
    reused, fit and select accuracy, the seconds taken and the process it ran in (when known), and the
    training loss per epoch."""
    meta = ingredient.meta
    log_params({"member": member, "hparams": meta["hparams"], "base_model": meta["base_model"],
                "sha256": meta["sha256"], "reused": reused, **({"pid": pid} if pid is not None else {})})
    log_scalars({"fit_acc": ingredient.fit_acc, "select_acc": meta.get("select_acc"), "finetune_s": seconds})
    log_series({"train_loss": meta.get("train_loss", [])})


def log_tables(tracker: Tracker, params: Params, root: str | Path, rows: list[dict]) -> None:
    """On the parent run (call from the flow's own thread): K used, the basin diagnostic (metrics `basin_*`, and
    the warning as the param `basin_warning` when the members sit apart), the model the evaluation chose on select
    data (param `registration`), the ingredient table and the evaluation table."""

    def log() -> None:
        paths = StagePaths(Path(root))
        basin = read_json(paths.eval_dir / "basin.json")
        log_scalars({"K": len(member_ids(params)), **{f"basin_{key}": basin[key] for key in BASIN_METRICS}})
        log_params({"registration": decision(paths)["method"],
                    **({"basin_warning": basin["warning"]} if basin["warning"] else {})})
        log_table(ingredient_rows(open_store(params, paths)), "ingredients")
        log_table(rows, "evaluation")

    attempt(tracker, "the tables", log)


def record_soup(tracker: Tracker, params: Params, root: str | Path, result: SoupResult, row: Mapping[str, Any], *,
                register: bool = False) -> str | None:
    """The soup's nested run: params, fit loss per step, accuracies on every split, the paired comparison
    with greedy soup, seconds, peak memory, beta, and the candidate table of a grouping chosen on select data.

    With `register`, the soup is also registered from this run (once: a soup already registered keeps its
    version); returns the version (else None).
    """
    return attempt(tracker, f"soup {result.method}", lambda: log_soup(tracker, params, root, result, row, register))


def log_soup(tracker: Tracker, params: Params, root: str | Path, result: SoupResult, row: Mapping[str, Any],
             register: bool) -> str | None:
    """What `record_soup` logs, with MLflow up."""
    with child_run(tracker, result.method, kind="soup"):
        settings = (params.soup.method(result.method).model_dump(mode="json") if result.method in params.soup.built
                    else {})
        log_params({"method": result.method, "K": len(result.ingredient_names),
                    "ingredients": result.ingredient_names, "soup": settings})
        if result.history:
            log_series({"fit_loss": result.history})
        log_scalars({
            **{key: row.get(key) for key in ROW_METRICS}, "construction_s": result.seconds,
            "peak_cpu_rss_bytes": result.peak_bytes.get("cpu_rss"), "peak_cuda_bytes": result.peak_bytes.get("cuda"),
        })
        if "search" in result.info:
            log_params({f"chosen.{key}": value for key, value in result.info["chosen"].items()})
            log_table(result.info["search"], f"search-{result.method}")
        log_beta(result)
        return register_pipeline_soup(params, root, result, row) if register else None


def replay_finetune(tracker: Tracker, member: int, ingredient: Ingredient) -> None:
    """A finished fine-tune's nested run, from its sidecar (nothing recomputed, so `reused`)."""
    with child_run(tracker, f"finetune-{member}", kind="finetune"):
        log_finetune(ingredient, member, reused=True, seconds=None)


def replay(params: Params, root: str | Path) -> dict:
    """Log a finished pipeline from its files, recomputing nothing: a new parent run (which closes the run a
    lost tracking server left open), a nested run per fine-tune and per soup, the tables, and the
    registration (a soup registered before keeps its version). Returns the run id, the registered
    version and what could not be logged."""
    paths = StagePaths(Path(root))
    rows = read_json(paths.eval_dir / "methods.json")
    members = [member for member in member_ids(params) if paths.ingredient(member).is_file()]
    params = with_members(params, members)
    by_method = {row["method"]: row for row in rows}
    with pipeline(params, root, run_name="replay", tags={"replayed_from_files": True}) as tracker:
        for member in members:
            ingredient = read_ingredient(paths.ingredient(member))
            attempt(tracker, f"fine-tune {member}", lambda: replay_finetune(tracker, member, ingredient))  # noqa: B023
        log_tables(tracker, params, root, rows)
        results, chosen = recorded_results(params, root, {method: read_result(paths, method)
                                                          for method in params.soup.built})
        versions = [record_soup(tracker, params, root, result, by_method[method], register=method == chosen)
                    for method, result in results.items()]
    return {"mlflow_run_id": tracker.parent_run_id, "registered_version": next(filter(None, versions), None),
            "missed": missed(tracker)}
