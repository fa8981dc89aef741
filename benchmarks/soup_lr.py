"""Fit and select loss and accuracy of MEHL-Soup+ for several coefficient learning rates (raw directions).

How the default MEHL-Soup+ `lr` (soup.methods.*.lr) was chosen: on held-out data only (test data are not read here). The
coefficients are fitted on the fit role and every rate is scored on both roles, so a rate that
only fits the fit data shows up as such. Run it on a pipeline root whose ingredients exist
(after `dvc repro` or `soup-pipeline run`):

    python benchmarks/soup_lr.py --root . --lrs 0.005 0.01 0.02 0.05 0.1 0.2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from soup_pipeline.config import load_params
from soup_pipeline.evaluation.tables import markdown_table
from soup_pipeline.runtime.devices import resolve_device
from soup_pipeline.soups import run_method
from soup_pipeline.soups.engine.base import model_at, role_metrics
from soup_pipeline.workspace.loading import load_splits, open_store, soup_objective
from soup_pipeline.workspace.paths import StagePaths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--method", default="mehl_soup_plus")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.05, 0.1, 0.2])
    args = parser.parse_args(argv)
    params = load_params(args.params)
    settings = params.soup.method(args.method)
    store = open_store(params, StagePaths(args.root), settings=settings)
    objective = soup_objective(params, store, load_splits(params), settings)
    device = resolve_device(settings.device)
    rows = []
    for lr in [0.0, *args.lrs]:  # lr 0 keeps the uniform soup: the reference point
        result = run_method(args.method, store, objective, settings.model_copy(update={"lr": lr or 1e-12}))
        row = {"lr": lr, **role_metrics(model_at(objective, result.state_dict, device), objective, device)}
        rows.append({**row, "max abs(beta - 1/K)": float((result.beta - 1.0 / len(store)).abs().max()),
                     "seconds": result.seconds})
        print(markdown_table(rows[-1:]), flush=True)
    print(f"fitted on {len(objective.fit)} fit examples, scored on them and on {len(objective.select)} "
          "select examples:")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
