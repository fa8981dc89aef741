"""Which model a pipeline run registers and how: the model `tracking.register_method` names (with `auto`, the one
the evaluation chose on select data, `soup_pipeline.evaluation.selection`), its model card, its ingredients' lineage
and provenance as tags, registered from the active run and promoted if best; and a soup built outside a pipeline
root (`soup_pipeline.prefect.soup_subflow`) registered the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..config import AUTO, Params
from ..core import portable_classifier
from ..core.ingredients import Ingredient, read_ingredient
from ..evaluation.selection import BEST_INDIVIDUAL, registration_file
from ..runtime.kill_points import reached
from ..soups import SoupResult
from ..soups.engine.base import best_individual
from ..workspace.loading import load_splits, open_store, preprocess_config, read_json
from ..workspace.paths import StagePaths
from ..workspace.results import served_spec  # shared with the export
from .provenance import dvc_lock_hash, git_commit, params_hash
from .records import MIXING_DIR, TABLES_DIR, MixingWeights, log_mixing_weights, log_scalars, log_table
from .registry import CHAMPION, METRIC_TAGS, find_version, image_frame, promote_if_better, register_soup
from .runs import active_parent_run_id, active_run_id, child_runs, pipeline_run, tracking_uri

LINEAGE = "lineage"  # the soup run's table of its ingredients' sources and hashes
# from the evaluation row, logged on the soup's run and tagged on its registered version
ROW_METRICS = (*METRIC_TAGS, "shifted_test_vs_greedy", "shifted_test_ci_low", "shifted_test_ci_high",
               "shifted_test_mcnemar_p")


def decision(paths: StagePaths) -> dict:
    """The model the evaluation chose on select data, with the reference, the reason and each candidate's evidence
    (runs/eval/registration.json)."""
    return read_json(registration_file(paths.eval_dir))


def log_beta(result: SoupResult) -> None:
    """Log the result's mixing weights (beta, ingredients x layers) to the active run."""
    log_mixing_weights(MixingWeights(result.beta.double().cpu().numpy(), result.ingredient_names, result.layer_names))


def registered_method(params: Params, root: str | Path) -> str:
    """The model a run registers: `tracking.register_method`, or with `auto` the one the evaluation chose on select
    data (`decision`), a soup or the best individual."""
    if params.tracking.register_method != AUTO:
        return params.tracking.register_method
    return decision(StagePaths(Path(root)))["method"]


def best_individual_result(params: Params, root: str | Path) -> SoupResult:
    """The best individual fine-tune (highest fit accuracy) as a one-member result, to record and register."""
    store = open_store(params, StagePaths(Path(root)))
    best = best_individual(store)
    beta = torch.zeros(len(store), 1, dtype=torch.float64)
    beta[best] = 1.0
    return SoupResult(method=BEST_INDIVIDUAL, state_dict=store.load(best), beta=beta, layer_names=["model"],
                      ingredient_names=[i.name for i in store.ingredients],
                      info={"members": [store.ingredients[best].name], "path": str(store.ingredients[best].path)})


def recorded_results(params: Params, root: str | Path,
                     soups: Mapping[str, SoupResult]) -> tuple[dict[str, SoupResult], str]:
    """The results a run records (its soups, and the best individual when it is the model registered) and the
    method registered."""
    chosen = registered_method(params, root)
    extra = {BEST_INDIVIDUAL: best_individual_result(params, root)} if chosen == BEST_INDIVIDUAL else {}
    return {**soups, **extra}, chosen


def registration_lines(paths: StagePaths) -> list[str]:
    """Why `auto` registered this model: the rule's sentence and the select evidence of the top candidates."""
    if not registration_file(paths.eval_dir).is_file():
        return []
    chosen = decision(paths)
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
             if result.method == BEST_INDIVIDUAL
             else f"## {result.method}: a soup of {len(result.ingredient_names)} fine-tunes")
    lines = [
        title,
        "",
        f"Fitted on the fit data; select accuracy {row.get('select_acc', float('nan')):.4f} (what promotes a version), "
        f"test accuracy {row.get('test_acc', float('nan')):.4f} (reported, never used to decide).",
    ]
    if chosen:
        lines.append(f"Setting chosen on select data: {', '.join(f'{k} {v}' for k, v in chosen.items())}.")
    lines += [f"Mixing weights (beta, {len(result.ingredient_names)} x {len(result.layer_names)}): "
              f"`{MIXING_DIR}/beta.png` (heatmap) and `beta.json` of this version's run."]
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
        "Input: encoded images (PNG, JPEG, ...) as base64 strings in the column `image` of a DataFrame, "
        "one row per image;"
        f" the model resizes and centre-crops them to {size} pixels and normalises them with mean "
        f"{list(preprocess['mean'])} and std {list(preprocess['std'])}, as the evaluation did. Or preprocessed float32 "
        f"images N x 3 x {size.replace('x', ' x ')} (`inputs` over HTTP).",
        f"Output per image: `label` (one of {', '.join(classes)}), `probability` (its probability) and "
        f"`{portable_classifier.CLASS_PREFIX}<class>` for every class.", "",
        "```bash",
        f'mlflow models serve -m "models:/{name}@{CHAMPION}" --env-manager local --host 127.0.0.1 --port 5001',
        'curl -s http://127.0.0.1:5001/invocations -H "Content-Type: application/json" \\',
        '  --data "{\\"dataframe_split\\": {\\"columns\\": [\\"image\\"], \\"data\\": '
        '[[\\"$(base64 -w0 image.png)\\"]]}}"',
        "```", "",
        "### What it must not be used for", "",
        f"- Images of classes outside its label set ({len(classes)} classes): it always answers one of them, "
        "and a high probability does not mean the image belongs to any.",
    ]
    shifted, test = row.get("shifted_test_acc"), row.get("test_acc")
    if shifted is not None and test is not None:
        lines.append(f"- Data unlike its fit data: on the shifted test set (the same classes, stronger distortion) its "
                     f"accuracy was {shifted:.4f}, against {test:.4f} on the test set; "
                     "check it on your own data first.")
    else:
        lines.append("- Data unlike its fit data: no shifted test set was measured; check it on your own data first.")
    return "\n".join(lines) + "\n"


def finetune_runs(parent_run_id: str | None) -> dict[str, str]:
    """The fine-tune runs nested under a pipeline run, by the SHA-256 of the ingredient each made (its param `sha256`;
    a rerun of the same fine-tune: the newest); empty outside a pipeline run (`parent_run_id` None)."""
    if parent_run_id is None:
        return {}
    return {run.data.params["sha256"]: run.info.run_id for run in child_runs(parent_run_id)
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


def register_with_lineage(result: SoupResult, spec: Mapping[str, Any], tags: Mapping[str, Any],
                          ingredients: Sequence[Ingredient], *, name: str, example, description: str) -> str:
    """Register the soup from the active run, with its ingredients' lineage as the run's artifact
    `tables/lineage.*` and the version tag `lineage` pointing to it (each row names the run that made its ingredient:
    a fine-tune run of the pipeline run the active run is nested in, or the run it was imported from); idempotent by
    method and soup SHA-256; promote it if its select accuracy is the best."""
    registered = find_version(name, {"method": result.method, "soup_sha256": tags["soup_sha256"]})
    if registered is None:  # registered before: a run killed after it, or a replay
        log_table(lineage(ingredients, finetune_runs(active_parent_run_id())), LINEAGE)
        pointer = f"runs:/{active_run_id()}/{TABLES_DIR}/{LINEAGE}.json"
        registered = register_soup(
            result.state_dict, {"builder": portable_classifier.BUILTIN_BUILDER, **spec}, name=name,
            method=result.method,
            tags={**{key: value for key, value in tags.items() if value is not None}, "lineage": pointer},
            input_example=example, description=description)
    reached("registered")
    promote_if_better(name, registered)  # again for a known version: a killed run may not have promoted it
    return registered


def register_pipeline_soup(params: Params, root: str | Path, result: SoupResult, row: Mapping[str, Any]) -> str:
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
        "registration_reason": decision(paths)["reason"] if params.tracking.register_method == AUTO else None,
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
    return image_frame([png])


def model_file(paths: StagePaths, result: SoupResult) -> Path:
    """The file holding the model `result` records: its soup's, or the best individual's ingredient."""
    return Path(result.info["path"]) if "path" in result.info else paths.soup_dir(result.method) / "soup.safetensors"


def register_external_soup(result: SoupResult, row: Mapping[str, Any], spec: Mapping[str, Any], soup_file: Path,
                           ingredient_files: Sequence[Path], *, name: str, experiment: str, example: torch.Tensor,
                           classnames: Sequence[str], preprocess: Mapping[str, Any]) -> str:
    """Register a soup built outside a pipeline root (`soup_pipeline.prefect.soup_subflow`) from a run of its own
    in `experiment` (MLFLOW_TRACKING_URI, else ./mlflow.db), with the same tags and lineage as the pipeline's;
    `example` is one preprocessed image, `preprocess` how the data's images became tensors."""
    uri = tracking_uri(Path.cwd())
    ingredients = [read_ingredient(path) for path in ingredient_files]
    tags = {"K": len(ingredients), "b": result.info.get("b"), **{key: row.get(key) for key in ROW_METRICS},
            "soup_sha256": read_ingredient(soup_file).meta["sha256"]}
    with pipeline_run(experiment, uri=uri, run_name=f"soup-{result.method}", tags={"kind": "soup"},
                      system_metrics=False):
        log_scalars({key: row.get(key) for key in ROW_METRICS})
        log_beta(result)
        spec = served_spec(ingredients[0], classnames, preprocess)
        card = (f"## {result.method}: a soup of {len(ingredients)} checkpoints\n\nselect accuracy "
                f"{row.get('select_acc', float('nan')):.4f}, test accuracy {row.get('test_acc', float('nan')):.4f}.\n"
                + usage_card(name, spec, row))
        return register_with_lineage(result, spec, tags, ingredients, name=name,
                                     example=image_example(example, preprocess), description=card)
