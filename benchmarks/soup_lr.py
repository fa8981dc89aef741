"""Held-out loss and accuracy of MEHL-Soup+ for several coefficient learning rates (raw directions).

How the default `soup.lr` was chosen: on held-out data only (test data are not read here). The
coefficients are fitted on part of the held-out set and scored both on that part and on the rest
(`--check-fraction`), so a rate that only fits the fitting data shows up as such.
Run it on a pipeline root whose ingredients exist (after `dvc repro` or `soup-pipeline run`):

    python benchmarks/soup_lr.py --root . --lrs 0.005 0.01 0.02 0.05 0.1 0.2
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from torch.utils.data import Subset

from soup_pipeline.config import load_params
from soup_pipeline.soups import run_method
from soup_pipeline.soups.base import heldout_metrics, model_at, resolve_device
from soup_pipeline.stages.layout import Layout, load_splits, open_store, soup_objective
from soup_pipeline.tracking import markdown_table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--method", default="mehl_soup_plus")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.05, 0.1, 0.2])
    parser.add_argument("--check-fraction", type=float, default=0.5,
                        help="share of the held-out set left out of the fit, to score each rate (default 0.5)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    store = open_store(params, Layout(args.root))
    objective = soup_objective(params, store, load_splits(params))
    order = torch.randperm(len(objective.heldout), generator=torch.Generator().manual_seed(params.soup.seed)).tolist()
    n_check = round(args.check_fraction * len(order))
    if not 0 < n_check < len(order):
        parser.error(f"--check-fraction {args.check_fraction} leaves {n_check} of {len(order)} held-out images "
                     "to check; both the fit and the check need some")
    fit = dataclasses.replace(objective, heldout=Subset(objective.heldout, order[n_check:]))
    check = dataclasses.replace(objective, heldout=Subset(objective.heldout, order[:n_check]))
    device = resolve_device(params.soup.device)
    rows = []
    for lr in [0.0, *args.lrs]:  # lr 0 keeps the uniform soup: the reference point
        result = run_method(args.method, store, fit, params.soup.model_copy(update={"lr": lr or 1e-12}))
        model = model_at(objective, result.state_dict, device)
        row = {"lr": lr}
        for name, part in (("fit", fit), ("check", check)):
            row[f"{name}_loss"], row[f"{name}_acc"] = heldout_metrics(model, part, device)
        rows.append({**row, "max |beta - 1/K|": float((result.beta - 1.0 / len(store)).abs().max()),
                     "seconds": result.seconds})
        print(markdown_table(rows[-1:]), flush=True)
    print(f"fitted on {len(order) - n_check} held-out images, checked on the other {n_check}:")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
