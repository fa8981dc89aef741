"""MLflow glue for the Prefect flow: the parent run, a nested run per fine-tune and per soup, the
tables on the parent run, and the registration of the final soup with its provenance.

A `Tracker` (tracking URI + parent run id) is passed to every task, so nested runs can be opened
from worker threads and Dask processes alike. With `tracking.enabled: false` every function
here does nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import torch

from .. import tracking
from . import orphans
from ..config import AUTO, Params
from ..runtime.errors import SoupError
from ..core.ingredients import Ingredient, file_sha256, read_ingredient
from ..runtime.kill_points import reached
from ..core import portable_classifier
from ..stages.paths import StagePaths, load_splits, member_ids, open_store, preprocess_config, read_json, with_members
from ..soups import SoupResult
from ..evaluation.selection import FALLBACK_REFERENCE as BEST_INDIVIDUAL  # the fittest fine-tune's row; `auto` may register it
from ..soups.base import best_individual
from ..stages.results import ingredient_rows, read_result, served_spec  # served_spec: shared with the export

LOGGER = logging.getLogger(__name__)
T = TypeVar("T")
LINEAGE = "lineage"  # the soup run's table of its ingredients' sources and hashes
BASIN_METRICS = ("uniform_fit_acc", "best_fit_acc", "gap", "mean_cosine")  # of runs/eval/basin.json, on the parent run
# from the evaluation row, logged on the soup's run and tagged on its registered version
ROW_METRICS = (*tracking.METRIC_TAGS, "shifted_test_vs_greedy", "shifted_test_ci_low", "shifted_test_ci_high",
               "shifted_test_mcnemar_p")


@dataclass(frozen=True)
class Tracker:
    """Where a flow run's MLflow runs go; `parent_run_id` None means tracking is off."""

    uri: str | None = None
    parent_run_id: str | None = None

    @property
    def enabled(self) -> bool:
        return self.parent_run_id is not None


# --- provenance -------------------------------------------------------------------------------


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
    uri = tracking.tracking_uri(root)
    where = str(Path(root).resolve())
    run_tags = {"params_hash": params_hash(params), "git_commit": git_commit(root), orphans.ROOT_TAG: where,
                "pid": os.getpid(), **(tags or {})}
    with tracking.pipeline_run(params.tracking.experiment, uri=uri, run_name=run_name, tags=run_tags,
                               system_metrics=params.tracking.system_metrics) as run_id:
        closed = orphans.close_orphans(where, run_id)
        if closed:
            LOGGER.warning("closed %d MLflow runs a killed pipeline run left RUNNING (now KILLED, tagged %s=%s)",
                           len(closed), orphans.RESUMED_BY_TAG, run_id)
        tracking.log_params(params.model_dump(mode="json"))
        yield Tracker(uri, run_id)


@contextlib.contextmanager
def child_run(tracker: Tracker, name: str, *, kind: str) -> Iterator[None]:
    """A run nested under the flow's parent run, from any thread or process; nothing when tracking is off."""
    if not tracker.enabled:
        yield
        return
    tracking.connect(tracker.uri)  # a Dask worker process starts with MLflow unconfigured
    with tracking.nested_run(name, kind=kind, parent_run_id=tracker.parent_run_id):
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
    tracking.log_params({"member": member, "hparams": meta["hparams"], "base_model": meta["base_model"],
                         "sha256": meta["sha256"], "reused": reused, **({"pid": pid} if pid is not None else {})})
    tracking.log_scalars({"fit_acc": ingredient.fit_acc, "select_acc": meta.get("select_acc"), "finetune_s": seconds})
    tracking.log_series({"train_loss": meta.get("train_loss", [])})


def log_tables(tracker: Tracker, params: Params, root: str | Path, rows: list[dict]) -> None:
    """On the parent run (call from the flow's own thread): K used, the basin diagnostic (metrics `basin_*`, and
    the warning as the param `basin_warning` when the members sit apart), the model the evaluation chose on select
    data (param `registration`), the ingredient table and the evaluation table."""

    def log() -> None:
        paths = StagePaths(Path(root))
        basin = read_json(paths.eval_dir / "basin.json")
        tracking.log_scalars({"K": len(member_ids(params)), **{f"basin_{key}": basin[key] for key in BASIN_METRICS}})
        tracking.log_params({"registration": read_json(paths.eval_dir / "registration.json")["method"],
                             **({"basin_warning": basin["warning"]} if basin["warning"] else {})})
        tracking.log_table(ingredient_rows(open_store(params, paths)), "ingredients")
        tracking.log_table(rows, "evaluation")

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
        settings = params.soup.method(result.method).model_dump(mode="json") if result.method in params.soup.built else {}
        tracking.log_params({"method": result.method, "K": len(result.ingredient_names),
                             "ingredients": result.ingredient_names, "soup": settings})
        if result.history:
            tracking.log_series({"fit_loss": result.history})
        tracking.log_scalars({
            **{key: row.get(key) for key in ROW_METRICS}, "construction_s": result.seconds,
            "peak_cpu_rss_bytes": result.peak_bytes.get("cpu_rss"), "peak_cuda_bytes": result.peak_bytes.get("cuda"),
        })
        if "search" in result.info:
            tracking.log_params({f"chosen.{key}": value for key, value in result.info["chosen"].items()})
            tracking.log_table(result.info["search"], f"search-{result.method}")
        tracking.log_mixing_weights(tracking.MixingWeights(result.beta.double().cpu().numpy(),
                                                           result.ingredient_names, result.layer_names))
        return register_soup(params, root, result, row) if register else None


def registered_method(params: Params, root: str | Path) -> str:
    """The model a run registers: `tracking.register_method`, or with `auto` the one the evaluation chose on select
    data (runs/eval/registration.json; `soup_pipeline.evaluation.selection`), a soup or the best individual."""
    if params.tracking.register_method != AUTO:
        return params.tracking.register_method
    return read_json(StagePaths(Path(root)).eval_dir / "registration.json")["method"]


def best_individual_result(params: Params, root: str | Path) -> SoupResult:
    """The best individual fine-tune (highest fit accuracy) as a one-member result, to record and register."""
    store = open_store(params, StagePaths(Path(root)))
    best = best_individual(store)
    beta = torch.zeros(len(store), 1, dtype=torch.float64)
    beta[best] = 1.0
    return SoupResult(method=BEST_INDIVIDUAL, state_dict=store.load(best), beta=beta, layer_names=["model"],
                      ingredient_names=[i.name for i in store.ingredients],
                      info={"members": [store.ingredients[best].name], "path": str(store.ingredients[best].path)})


def recorded_results(params: Params, root: str | Path, soups: Mapping[str, SoupResult]) -> tuple[dict[str, SoupResult], str]:
    """The results a run records (its soups, and the best individual when it is the model registered) and the
    method registered."""
    chosen = registered_method(params, root)
    extra = {BEST_INDIVIDUAL: best_individual_result(params, root)} if chosen == BEST_INDIVIDUAL else {}
    return {**soups, **extra}, chosen


def registration_lines(paths: StagePaths) -> list[str]:
    """Why `auto` registered this model: the rule's sentence and the select evidence of the top candidates."""
    path = paths.eval_dir / "registration.json"
    if not path.is_file():
        return []
    chosen = read_json(path)
    top = sorted(chosen["candidates"], key=lambda row: row["select_loss"])[:5]
    lines = ["", f"Registered by `register_method: auto` (the model select data prefer): {chosen['reason']}.", "",
             f"| candidate | select loss | select loss - {chosen['reference']}'s | 95% interval (by source image) "
             "| select acc |", "|---|---|---|---|---|"]
    lines += [f"| {row['method']} | {row['select_loss']:.4f} | {row['loss_vs_reference']:+.4f} | "
              f"[{row['ci_low']:+.4f}, {row['ci_high']:+.4f}] | {row['select_acc']:.4f} |" for row in top]
    return lines


def model_card(result: SoupResult, row: Mapping[str, Any], paths: StagePaths, *, auto: bool = False) -> str:
    """The registered version's description: what the model is, how it was chosen, and the run's evaluation table."""
    chosen = result.info.get("chosen")
    title = (f"## {result.method}: {result.info['members'][0]}, the fine-tune with the highest fit accuracy"
             if result.method == BEST_INDIVIDUAL else f"## {result.method}: a soup of {len(result.ingredient_names)} fine-tunes")
    lines = [
        title,
        "",
        f"Fitted on the fit data; select accuracy {row.get('select_acc', float('nan')):.4f} (what promotes a version), "
        f"test accuracy {row.get('test_acc', float('nan')):.4f} (reported, never used to decide).",
    ]
    if chosen:
        lines.append(f"Setting chosen on select data: {', '.join(f'{k} {v}' for k, v in chosen.items())}.")
    lines += [f"Mixing weights (beta, {len(result.ingredient_names)} x {len(result.layer_names)}): "
              f"`{tracking.MIXING_DIR}/beta.png` (heatmap) and `beta.json` of this version's run."]
    lines += (registration_lines(paths) if auto else []) + [""]
    table = paths.eval_dir / "table.md"
    if table.is_file():  # its header is the basin diagnostic, with the warning when the members sit apart
        lines += ["### Evaluation of every method in this pipeline run", "", table.read_text()]
    return "\n".join(lines)


def usage_card(name: str, spec: Mapping[str, Any], row: Mapping[str, Any]) -> str:
    """The model card's part for whoever deploys the model: how to call it (input, output, a curl example) and
    what it must not be used for (classes outside its label set; shifted data, with the measured accuracy)."""
    preprocess, classes = spec["preprocess"], portable_classifier.class_names(spec)
    size = "x".join(map(str, portable_classifier.size_of(preprocess)))
    lines = [
        "", "### How to call it", "",
        "Input: encoded images (PNG, JPEG, ...) as base64 strings in the column `image` of a DataFrame, one row per image;"
        f" the model resizes and centre-crops them to {size} pixels and normalises them with mean "
        f"{list(preprocess['mean'])} and std {list(preprocess['std'])}, as the evaluation did. Or preprocessed float32 "
        f"images N x 3 x {size.replace('x', ' x ')} (`inputs` over HTTP).",
        f"Output per image: `label` (one of {', '.join(classes)}), `probability` (its probability) and "
        f"`{portable_classifier.CLASS_PREFIX}<class>` for every class.", "",
        "```bash",
        f'mlflow models serve -m "models:/{name}@{tracking.CHAMPION}" --env-manager local --host 127.0.0.1 --port 5001',
        'curl -s http://127.0.0.1:5001/invocations -H "Content-Type: application/json" \\',
        '  --data "{\\"dataframe_split\\": {\\"columns\\": [\\"image\\"], \\"data\\": '
        '[[\\"$(base64 -w0 image.png)\\"]]}}"',
        "```", "",
        "### What it must not be used for", "",
        f"- Images of classes outside its label set ({len(classes)} classes): it always answers one of them, and a high "
        "probability does not mean the image belongs to any.",
    ]
    shifted, test = row.get("shifted_test_acc"), row.get("test_acc")
    if shifted is not None and test is not None:
        lines.append(f"- Data unlike its fit data: on the shifted test set (the same classes, stronger distortion) its "
                     f"accuracy was {shifted:.4f}, against {test:.4f} on the test set; check it on your own data first.")
    else:
        lines.append("- Data unlike its fit data: no shifted test set was measured; check it on your own data first.")
    return "\n".join(lines) + "\n"


def finetune_runs(parent_run_id: str | None) -> dict[str, str]:
    """The fine-tune runs nested under a pipeline run, by the SHA-256 of the ingredient each made (its param `sha256`;
    a rerun of the same fine-tune: the newest); empty outside a pipeline run (`parent_run_id` None)."""
    if parent_run_id is None:
        return {}
    return {run.data.params["sha256"]: run.info.run_id for run in tracking.child_runs(parent_run_id)
            if run.data.tags.get("kind") == "finetune" and "sha256" in run.data.params}


def lineage(ingredients: Sequence[Ingredient], made_by: Mapping[str, str] | None = None) -> list[dict]:
    """Where each ingredient came from: its source URI (an imported checkpoint's, or the `finetune@K` stage that made
    it), the MLflow run id where there is one (the run it was imported from, else the fine-tune run that `made_by`,
    `finetune_runs`, names for its SHA-256), the source file's SHA-256 and the ingredient's."""
    made_by = made_by or {}
    return [{"ingredient": i.name, "source_uri": i.meta.get("source_uri") or f"finetune@{i.meta.get('member')}",
             "run_id": i.meta.get("run_id") or made_by.get(i.meta.get("sha256")),
             "source_sha256": i.meta.get("source_sha256"), "sha256": i.meta.get("sha256")}
            for i in ingredients]


def register_with_lineage(result: SoupResult, spec: Mapping[str, Any], tags: Mapping[str, Any], ingredients: Sequence[Ingredient],
                          *, name: str, example, description: str) -> str:
    """Register the soup from the active run, with its ingredients' lineage as the run's artifact
    `tables/lineage.*` and the version tag `lineage` pointing to it (each row names the run that made its ingredient:
    a fine-tune run of the pipeline run the active run is nested in, or the run it was imported from); idempotent by
    method and soup SHA-256; promote it if its select accuracy is the best."""
    registered = tracking.find_version(name, {"method": result.method, "soup_sha256": tags["soup_sha256"]})
    if registered is None:  # registered before: a run killed after it, or a replay
        tracking.log_table(lineage(ingredients, finetune_runs(tracking.active_parent_run_id())), LINEAGE)
        pointer = f"runs:/{tracking.active_run_id()}/{tracking.TABLES_DIR}/{LINEAGE}.json"
        registered = tracking.register_soup(
            result.state_dict, {"builder": portable_classifier.BUILTIN_BUILDER, **spec}, name=name, method=result.method,
            tags={**{key: value for key, value in tags.items() if value is not None}, "lineage": pointer},
            input_example=example, description=description)
    reached("registered")
    tracking.promote_if_better(name, registered)  # again for a known version: a killed run may not have promoted it
    return registered


def register_soup(params: Params, root: str | Path, result: SoupResult, row: Mapping[str, Any]) -> str:
    """Register the pipeline's soup from the active run, tagged with its accuracies and provenance (params, git
    commit, dvc.lock, its ingredients' lineage); promote it if best."""
    paths = StagePaths(Path(root))
    store = open_store(params, paths)
    k = len(result.ingredient_names)
    tags = {
        "K": k, "b": result.info.get("b"), **{key: row.get(key) for key in ROW_METRICS},
        **{f"chosen_{key}": value for key, value in result.info.get("chosen", {}).items()},
        "params_hash": params_hash(params), "git_commit": git_commit(root), "dvc_lock_hash": dvc_lock_hash(root),
        "soup_sha256": read_ingredient(model_file(paths, result)).meta["sha256"],
        "registered_by": "auto" if params.tracking.register_method == AUTO else "register_method",
        "registration_reason": (read_json(paths.eval_dir / "registration.json")["reason"]
                                if params.tracking.register_method == AUTO else None),
    }
    splits, preprocess = load_splits(params), preprocess_config(params)
    spec, name = served_spec(store.ingredients[0], splits.classnames, preprocess), params.tracking.registered_model
    card = model_card(result, row, paths, auto=params.tracking.register_method == AUTO) + usage_card(name, spec, row)
    return register_with_lineage(result, spec, tags, store.ingredients, name=name,
                                 example=image_example(splits.select[0][0], preprocess), description=card)


def image_example(image: torch.Tensor, preprocess: Mapping[str, Any]):
    """The registered model's input example, as a client sends it: one image (preprocessed, so back to PNG bytes
    first) base64-encoded in the column `image` of a DataFrame."""
    png = portable_classifier.png_bytes(image, preprocess["mean"], preprocess["std"])
    return tracking.image_frame([png])


def model_file(paths: StagePaths, result: SoupResult) -> Path:
    """The file holding the model `result` records: its soup's, or the best individual's ingredient."""
    return Path(result.info["path"]) if "path" in result.info else paths.soup_dir(result.method) / "soup.safetensors"


def register_external_soup(result: SoupResult, row: Mapping[str, Any], spec: Mapping[str, Any], soup_file: Path,
                           ingredient_files: Sequence[Path], *, name: str, experiment: str, example: torch.Tensor,
                           classnames: Sequence[str], preprocess: Mapping[str, Any]) -> str:
    """Register a soup built outside a pipeline root (`soup_pipeline.prefect.soup_subflow`) from a run of its own
    in `experiment` (MLFLOW_TRACKING_URI, else ./mlflow.db), with the same tags and lineage as the pipeline's;
    `example` is one preprocessed image, `preprocess` how the data's images became tensors."""
    uri = tracking.tracking_uri(Path.cwd())
    ingredients = [read_ingredient(path) for path in ingredient_files]
    tags = {"K": len(ingredients), "b": result.info.get("b"), **{key: row.get(key) for key in ROW_METRICS},
            "soup_sha256": read_ingredient(soup_file).meta["sha256"]}
    with tracking.pipeline_run(experiment, uri=uri, run_name=f"soup-{result.method}", tags={"kind": "soup"},
                               system_metrics=False):
        tracking.log_scalars({key: row.get(key) for key in ROW_METRICS})
        tracking.log_mixing_weights(tracking.MixingWeights(result.beta.double().cpu().numpy(),
                                                           result.ingredient_names, result.layer_names))
        spec = served_spec(ingredients[0], classnames, preprocess)
        card = (f"## {result.method}: a soup of {len(ingredients)} checkpoints\n\nselect accuracy "
                f"{row.get('select_acc', float('nan')):.4f}, test accuracy {row.get('test_acc', float('nan')):.4f}.\n"
                + usage_card(name, spec, row))
        return register_with_lineage(result, spec, tags, ingredients, name=name,
                                     example=image_example(example, preprocess), description=card)


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
