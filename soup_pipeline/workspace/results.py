"""What the stages write and the evaluation, tracking and benchmarks read back: a soup's files (its weights,
mixing weights, metrics and loss history under runs/soups/METHOD/, its cost under runs/costs/) and the
ingredient rows."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..core.ingredients import Ingredient, IngredientStore, save_ingredient
from ..runtime.atomic import write_json
from ..runtime.errors import SoupError
from ..soups import SoupResult
from .loading import read_json
from .paths import StagePaths

MIB = 2**20
# of result.info, in metrics.json
INFO_KEYS = ("b", "model_epochs", "steps_per_block", "steps", "members", "chosen", "soup")


def soup_cost(result: SoupResult, processes: int) -> dict:
    """What the soup cost: seconds and peak memory (CPU RSS, CUDA allocator; rank 0's) of its construction, the
    blocks taken from a resume state rather than computed, and the processes it ran on."""
    return {"seconds": result.seconds, "peak_cpu_mib": result.peak_bytes.get("cpu_rss", 0) / MIB,
            "peak_cuda_mib": result.peak_bytes["cuda"] / MIB if "cuda" in result.peak_bytes else None,
            "blocks_reused": result.info.get("blocks_reused", 0), "processes": processes}


def write_result(result: SoupResult, paths: StagePaths, metrics: dict, ingredient_meta: dict, *,
                 processes: int) -> None:
    """The soup stage's files for `result` (see `run`)."""
    out = paths.soup_dir(result.method)
    save_ingredient(result.state_dict, out / "soup.safetensors",
                    meta={"method": result.method, "classifier_spec": ingredient_meta.get("classifier_spec"),
                          "base_model": ingredient_meta.get("base_model"), "fit_acc": metrics["fit_acc"],
                          "ingredients": result.ingredient_names})
    write_json(out / "beta.json", {"ingredients": result.ingredient_names, "layers": result.layer_names,
                                   "beta": result.beta.to(torch.float64).tolist()})
    write_json(out / "history.json", [{"step": i, "fit_loss": v} for i, v in enumerate(result.history)])
    write_json(out / "metrics.json", metrics)
    if "search" in result.info:
        write_json(out / "search.json", result.info["search"])
    write_json(paths.soup_cost(result.method), soup_cost(result, processes))


def read_result(paths: StagePaths, method: str) -> SoupResult:
    """The soup stage's files of `method` as a SoupResult (as `run` returned it, less the in-memory extras)."""
    out = paths.soup_dir(method)
    if not (out / "soup.safetensors").is_file():
        raise SoupError(f"the soup {method} is not built (no {out / 'soup.safetensors'}); build it first: "
                        f"soup-pipeline soup --method {method}")
    beta, metrics = read_json(out / "beta.json"), read_json(out / "metrics.json")
    info = {key: metrics[key] for key in ("K", "L", *INFO_KEYS) if key in metrics}
    if (out / "search.json").is_file():
        info["search"] = read_json(out / "search.json")
    cost = read_json(paths.soup_cost(method)) if paths.soup_cost(method).is_file() else {}
    peaks = {"cpu_rss": cost.get("peak_cpu_mib"), "cuda": cost.get("peak_cuda_mib")}
    return SoupResult(method=method, state_dict=IngredientStore([out / "soup.safetensors"]).load(0),
                      beta=torch.tensor(beta["beta"], dtype=torch.float64), layer_names=beta["layers"],
                      ingredient_names=beta["ingredients"], seconds=cost.get("seconds", 0.0),
                      peak_bytes={key: round(mib * MIB) for key, mib in peaks.items() if mib is not None},
                      history=[row["fit_loss"] for row in read_json(out / "history.json")], info=info)


def served_spec(ingredient: Ingredient, classnames: Sequence[str], preprocess: Mapping[str, Any]) -> dict:
    """What the registered (or exported) model is rebuilt from: the ingredients' classifier spec, the class names it
    answers with, the preprocessing that turns a client's image into its input, and the base model its tower came
    from (`ingredient`: a fine-tune or a soup, whose sidecars record the spec and the base alike)."""
    return {**ingredient.meta["classifier_spec"], "classnames": list(classnames), "preprocess": dict(preprocess),
            "base_model": ingredient.meta.get("base_model")}


def ingredient_rows(store: IngredientStore) -> list[dict]:
    """One row per ingredient: its hyperparameters and its fit and select accuracy."""
    return [{"ingredient": i.name, "fit_acc": i.fit_acc, "select_acc": i.meta.get("select_acc"),
             **i.meta.get("hparams", {})} for i in store.ingredients]


def with_costs(rows: list[dict], paths: StagePaths) -> list[dict]:
    """The evaluation rows with each soup's seconds and peak memory (from runs/costs/, where a soup stage left them)."""
    return [{**row, **(read_json(paths.soup_cost(row["method"])) if paths.soup_cost(row["method"]).is_file() else {})}
            for row in rows]
