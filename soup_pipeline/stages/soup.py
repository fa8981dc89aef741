"""Stage `soup@METHOD`: build one soup from the sweep's ingredients and write it with its mixing weights."""

from __future__ import annotations

from pathlib import Path

import torch

from ..atomic import write_json
from ..config import Params
from ..ingredients import save_ingredient
from ..soups import SoupResult, get_spec, run_method
from ..soups.base import Objective, model_at, resolve_device, role_metrics
from ..layout import Layout, load_splits, open_store, soup_objective

MIB = 2**20


def soup_metrics(result: SoupResult, objective: Objective, device) -> dict:
    """The numbers a soup is judged by before test data is touched: loss and accuracy on the fit and
    select roles, and K x L against the fit size."""
    return {
        "method": result.method,
        "K": len(result.ingredient_names),
        "L": len(result.layer_names),
        "coefficients": result.beta.numel(),
        "fit_size": len(objective.fit),
        "select_size": len(objective.select),
        **role_metrics(model_at(objective, result.state_dict, device), objective, device),
        "seconds": result.seconds,
        "peak_cpu_mib": result.peak_bytes.get("cpu_rss", 0) / MIB,
        "peak_cuda_mib": result.peak_bytes["cuda"] / MIB if "cuda" in result.peak_bytes else None,
        **{k: v for k, v in result.info.items() if k in ("b", "model_epochs", "steps_per_block", "steps", "members", "chosen")},
    }


def run(params: Params, root: str | Path, method: str) -> SoupResult:
    """Run `method` and write runs/soups/METHOD/{soup.safetensors, soup.json, beta.json, metrics.json, history.json}
    (and search.json, the candidate table, when the grouping was chosen on select data)."""
    layout = Layout(Path(root))
    settings = params.soup.method(method)
    store = open_store(params, layout, settings=settings)
    objective = soup_objective(params, store, load_splits(params), settings)
    options = {"resume_dir": layout.runs / "resume" / method} if get_spec(method).resumable else {}
    result = run_method(method, store, objective, settings, **options)
    out = layout.soup_dir(method)
    device = resolve_device(settings.device)
    metrics = soup_metrics(result, objective, device)
    save_ingredient(result.state_dict, out / "soup.safetensors",
                    meta={"method": method, "classifier_spec": store.ingredients[0].meta.get("classifier_spec"),
                          "base_model": store.ingredients[0].meta.get("base_model"), "fit_acc": metrics["fit_acc"],
                          "ingredients": result.ingredient_names})
    write_json(out / "beta.json", {"ingredients": result.ingredient_names, "layers": result.layer_names,
                                   "beta": result.beta.to(torch.float64).tolist()})
    write_json(out / "history.json", [{"step": i, "heldout_loss": v} for i, v in enumerate(result.history)])
    write_json(out / "metrics.json", metrics)
    if "search" in result.info:
        write_json(out / "search.json", result.info["search"])
    return result
