"""Stage `evaluate`: one table over every method (fit, select, test and shifted-test accuracy, the paired
comparison against greedy soup on the test sets, time, memory).

Test data are read here only, once per method, after every soup is built; they decide nothing.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import Params
from ..core.data import DataSplits
from ..core.ingredients import IngredientStore
from ..evaluation.plots import plot_methods, plot_mixing_weights
from ..evaluation.scoring import predictor, split_outcomes
from ..evaluation.selection import BEST_INDIVIDUAL, choose_on_select, compared_rows, registration_file
from ..evaluation.tables import markdown_table
from ..runtime.atomic import write_json
from ..runtime.errors import SoupError
from ..runtime.kill_points import reached
from ..runtime.placement import device_for, on_devices
from ..soups.comparators.basin import diagnose
from ..soups.comparators.ensemble import ensemble_logits
from ..soups.engine.base import best_individual, model_at
from ..workspace.loading import load_splits, open_anchor, open_store, read_json, soup_objective
from ..workspace.paths import StagePaths
from ..workspace.results import ingredient_rows, with_costs

RESULT_COLUMNS = ["method", "fit_acc", "select_acc", "test_acc", "shifted_test_acc", "test_vs_greedy", "test_ci_low",
                  "test_ci_high", "test_mcnemar_p"]
COST_COLUMNS = ["seconds", "peak_cpu_mib", "peak_cuda_mib"]  # kept apart, under runs/costs/: they vary between runs
TABLE_COLUMNS = RESULT_COLUMNS + COST_COLUMNS


def evaluate_rows(params: Params, paths: StagePaths, store: IngredientStore,
                  splits: DataSplits) -> tuple[list[dict], dict[str, dict], dict[str, torch.Tensor]]:
    """Rows: zero-shot, best individual, each soup built (`soup.methods`, then `soup.refine`), and the ensemble, each
    with its accuracies and, where greedy soup is built, its paired comparison against it on the test sets; each model's
    per-example correctness (method -> split -> booleans) and cross-entropy on the select data (method -> losses),
    for `register_method: auto`."""
    objective = soup_objective(params, store, splits)
    best = best_individual(store)
    rows = [{"method": "zero_shot", **read_json(paths.base_info)["zero_shot"]}]
    states = {BEST_INDIVIDUAL: lambda: store.load(best),
              **{method: (lambda method=method: IngredientStore([paths.soup_dir(method) / "soup.safetensors"]).load(0))
                 for method in params.soup.built}}
    extra = {BEST_INDIVIDUAL: {"member": store.ingredients[best].name},
             **{method: read_json(paths.soup_dir(method) / "metrics.json") for method in params.soup.built}}
    with tqdm(total=len(states), desc="evaluate", unit="model", disable=None) as progress:

        def outcomes(state, device: torch.device) -> tuple[dict, dict]:
            predict = predictor(model_at(objective, state(), device), params.evaluate.batch_size, device,
                                workers=params.evaluate.workers, precision=params.evaluate.precision)
            scored = split_outcomes(predict, splits)
            progress.update()
            reached("evaluate-method")
            return scored

        # model i dealt over the GPUs as the soups are (runtime.placement): several GPUs score side by side
        devices = [device_for(params.soup.device, slot, "soup.device") for slot in range(len(states))]
        scored = on_devices([functools.partial(outcomes, state) for state in states.values()], devices)
    correct = {method: outcome[0] for method, outcome in zip(states, scored)}
    select_losses = {method: outcome[1]["select"] for method, outcome in zip(states, scored)}
    device = devices[0]
    correct["ensemble"] = split_outcomes(lambda ds: ensemble_logits(store, objective, device, ds,
                                                                    workers=params.evaluate.workers,
                                                                    precision=params.evaluate.precision), splits)[0]
    rows += compared_rows(correct, seed=params.evaluate.bootstrap_seed, resamples=params.evaluate.bootstrap_resamples,
                          extra=extra)
    return rows, correct, select_losses


def anchor_if_known(paths: StagePaths, store: IngredientStore) -> dict[str, torch.Tensor] | None:
    """theta_0 for the basin diagnostic's cosine, or None (said in a warning) where the ingredients name another
    base or the base has none: the diagnostic is advice, and the evaluation goes on without it."""
    try:
        return open_anchor(paths, store)
    except SoupError as exc:
        warnings.warn(f"the basin diagnostic leaves out the task-vector cosine: {exc}", stacklevel=2)
        return None


def run(params: Params, root: str | Path) -> list[dict]:
    """Write runs/eval/{metrics.json, methods.json, table.md, ingredients.json, registration.json (the model select
    data prefer, `soup_pipeline.evaluation.selection`), basin.json (`soup_pipeline.soups.comparators.basin`, warned
    when the members sit apart)} and runs/eval/plots/*.png (the same bytes for the same inputs), and
    runs/costs/evaluation.md; return
    the rows with each soup's cost."""
    paths = StagePaths(Path(root))
    store = open_store(params, paths)
    splits = load_splits(params)
    rows, correct, select_losses = evaluate_rows(params, paths, store, splits)
    out = paths.eval_dir
    chosen = choose_on_select(select_losses, {method: values["select"] for method, values in correct.items()},
                              splits.sources["select"] if splits.sources else None,
                              seed=params.evaluate.bootstrap_seed, resamples=params.evaluate.bootstrap_resamples)
    write_json(registration_file(out), chosen.as_dict())
    basin = diagnose(store, soup_objective(params, store, splits), anchor_if_known(paths, store),
                     gap_limit=params.evaluate.basin_gap, device=device_for(params.soup.device, 0, "soup.device"))
    write_json(out / "basin.json", basin.as_dict())
    if basin.warning:
        warnings.warn(basin.warning, stacklevel=2)
    header = basin.summary + (f"\n\n**Warning: {basin.warning}.**" if basin.warning else "") + "\n\n"
    write_json(out / "metrics.json", {row["method"]: {k: v for k, v in row.items() if k != "method"} for row in rows})
    write_json(out / "methods.json", rows)
    write_json(out / "ingredients.json", ingredient_rows(store))
    (out / "table.md").write_text(header + markdown_table(rows, RESULT_COLUMNS) + "\n")
    shown = with_costs(rows, paths)
    paths.costs_dir.mkdir(parents=True, exist_ok=True)
    (paths.costs_dir / "evaluation.md").write_text(markdown_table(shown, TABLE_COLUMNS) + "\n")
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    plot_methods(rows, plots / "methods.png")
    for method in params.soup.built:
        beta = read_json(paths.soup_dir(method) / "beta.json")
        if len(beta["layers"]) > 1:
            plot_mixing_weights(torch.tensor(beta["beta"]).numpy(), beta["ingredients"], beta["layers"],
                                plots / f"beta_{method}.png")
    return shown
