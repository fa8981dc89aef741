"""Stage `ablate`: test accuracy against the number of ingredients (the paper's Fig. 2) and after
removing the best ingredients (its Table 3), for greedy soup and MEHL-Soup+ (and uniform)."""

from __future__ import annotations

from pathlib import Path

from ..config import Params
from ..core.data import DataSplits
from ..core.ingredients import IngredientStore
from ..evaluation.plots import plot_curves
from ..evaluation.scoring import SPLIT_COLUMNS, predictor, split_accuracies
from ..evaluation.tables import markdown_table
from ..runtime.atomic import write_json
from ..runtime.devices import resolve_device
from ..soups import run_method
from ..soups.engine.base import model_at
from ..workspace.loading import load_splits, open_store, soup_objective
from ..workspace.paths import StagePaths

CURVE_METHODS = ("greedy", "mehl_soup_plus")
REMOVAL_METHODS = ("uniform", "greedy", "mehl_soup_plus")
ACCURACY_COLUMNS = list(SPLIT_COLUMNS.values())


def soup_accuracies(params: Params, store: IngredientStore, splits: DataSplits, method: str,
                    built: Path | None = None) -> dict[str, float]:
    """`method` on `store`, measured on every split; `built` is the soup stage's file when it holds exactly this
    soup."""
    settings = params.soup.method(method)
    objective = soup_objective(params, store, splits, settings)
    device = resolve_device(settings.device)
    if built is not None and built.is_file():
        state = IngredientStore([built]).load(0)
    else:
        state = run_method(method, store, objective, settings).state_dict
    return split_accuracies(predictor(model_at(objective, state, device), params.evaluate.batch_size, device), splits)


def run(params: Params, root: str | Path) -> dict:
    """Write runs/ablation/{ablation.json, ablation.md, ingredient_count.png}."""
    paths = StagePaths(Path(root))
    full = open_store(params, paths)
    splits = load_splits(params)
    K = len(full)
    files = [i.path for i in full.ingredients]
    counts = sorted({n for n in params.evaluate.ingredient_counts if 1 <= n < K} | {K})

    def full_soup(method: str, n_used: int) -> Path | None:  # the whole set: the soup stage already built it
        return paths.soup_dir(method) / "soup.safetensors" if n_used == K else None

    curve = [{"ingredients": n, "method": m,
              **soup_accuracies(params, IngredientStore(files[:n]), splits, m, full_soup(m, n))}
             for n in counts for m in CURVE_METHODS]
    by_acc = sorted(range(K), key=lambda k: -(full.ingredients[k].fit_acc or 0.0))
    removal = []
    for n in sorted({0, *(n for n in params.evaluate.remove_top if 0 < n <= K - 2)}):
        kept = sorted(by_acc[n:])
        removal += [{"removed_top": n, "method": m, **soup_accuracies(params, IngredientStore([files[k] for k in kept]),
                                                                        splits, m, full_soup(m, len(kept)))}
                    for m in REMOVAL_METHODS]
    out = paths.ablation_dir
    write_json(out / "ablation.json", {"ingredient_count": curve, "remove_top": removal})
    (out / "ablation.md").write_text("## Test accuracy against the number of ingredients\n\n"
                                     + markdown_table(curve, ["ingredients", "method", *ACCURACY_COLUMNS])
                                     + "\n\n## After removing the top-n ingredients\n\n"
                                     + markdown_table(removal, ["removed_top", "method", *ACCURACY_COLUMNS])
                                     + "\n")
    plot_curves({m: [(r["ingredients"], r["test_acc"]) for r in curve if r["method"] == m] for m in CURVE_METHODS},
                out / "ingredient_count.png", xlabel="number of ingredients", ylabel="test accuracy")
    return {"ingredient_count": curve, "remove_top": removal}
