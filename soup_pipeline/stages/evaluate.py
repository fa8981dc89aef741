"""Stage `evaluate`: one table over every method (held-out, test and shifted-test accuracy, time, memory).

Test data are read here only, once per method, after every soup is built from held-out data.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..atomic import write_json
from ..config import Params
from ..data import DataSplits
from ..evaluate import accuracy, dataset_targets, model_logits
from ..ingredients import IngredientStore
from ..plots import plot_methods, plot_mixing_weights
from ..soups.base import model_at, resolve_device
from ..soups.ensemble import ensemble_logits
from ..tracking import markdown_table
from .layout import Layout, load_splits, open_store, read_json, soup_objective

SPLIT_COLUMNS = {"heldout": "heldout_acc", "test": "test_acc", "test_shift": "test_shift_acc"}
TABLE_COLUMNS = ["method", "heldout_acc", "test_acc", "test_shift_acc", "seconds", "peak_cpu_mib", "peak_cuda_mib"]


def split_accuracies(predict, splits: DataSplits) -> dict[str, float]:
    """Accuracy of `predict(dataset) -> logits` on every split present."""
    out = {}
    for split, column in SPLIT_COLUMNS.items():
        dataset = getattr(splits, split)
        if dataset is not None:
            out[column] = accuracy(predict(dataset), dataset_targets(dataset))
    return out


def predictor(model: torch.nn.Module, batch_size: int, device: torch.device):
    """`predict(dataset) -> logits` of a model."""
    return lambda dataset: model_logits(model, dataset, batch_size, device)


def evaluate_rows(params: Params, layout: Layout, store: IngredientStore, splits: DataSplits) -> list[dict]:
    """Rows: zero-shot, best individual, each soup of `evaluate.methods`, and the ensemble."""
    objective = soup_objective(params, store, splits)
    device = resolve_device(params.soup.device)
    batch = params.evaluate.batch_size
    zero_shot = read_json(layout.base_info)["zero_shot"]
    rows = [{"method": "zero_shot", **zero_shot}]
    best = max(range(len(store)), key=lambda k: store.ingredients[k].val_acc or 0.0)  # first best on ties
    rows.append({"method": "best_individual", "member": store.ingredients[best].name,
                 **split_accuracies(predictor(model_at(objective, store.load(best), device), batch, device), splits)})
    for method in params.evaluate.methods:
        folder = layout.soup_dir(method)
        state = IngredientStore([folder / "soup.safetensors"]).load(0)
        rows.append({**read_json(folder / "metrics.json"), "method": method,
                     **split_accuracies(predictor(model_at(objective, state, device), batch, device), splits)})
    rows.append({"method": "ensemble", **split_accuracies(lambda ds: ensemble_logits(store, objective, device, ds), splits)})
    return rows


def ingredient_rows(store: IngredientStore) -> list[dict]:
    """One row per ingredient: its hyperparameters and held-out accuracy."""
    return [{"ingredient": i.name, "val_acc": i.val_acc, **i.meta.get("hparams", {})} for i in store.ingredients]


def run(params: Params, root: str | Path) -> list[dict]:
    """Write runs/eval/{metrics.json, methods.json, table.md, ingredients.json} and runs/eval/plots/*.png."""
    layout = Layout(Path(root))
    store = open_store(params, layout)
    splits = load_splits(params)
    rows = evaluate_rows(params, layout, store, splits)
    out = layout.eval_dir
    write_json(out / "metrics.json", {row["method"]: {k: v for k, v in row.items() if k != "method"} for row in rows})
    write_json(out / "methods.json", rows)
    write_json(out / "ingredients.json", ingredient_rows(store))
    (out / "table.md").write_text(markdown_table(rows, TABLE_COLUMNS) + "\n")
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    plot_methods(rows, plots / "methods.png")
    for method in params.evaluate.methods:
        beta = read_json(layout.soup_dir(method) / "beta.json")
        if len(beta["layers"]) > 1:
            plot_mixing_weights(torch.tensor(beta["beta"]).numpy(), beta["ingredients"], beta["layers"],
                                plots / f"beta_{method}.png")
    return rows
