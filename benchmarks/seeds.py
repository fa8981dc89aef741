"""The evaluation table over several sweep seeds: mean, spread, and paired differences against greedy soup.

Each seed is a full pipeline (sweep of K fine-tunes from one shared pre-trained base, every soup
method, evaluation) in its own root; finished members are reused. Example (the README's table):

    python benchmarks/seeds.py --seeds 0 1 2 --workdir /tmp/soup-seeds
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from soup_pipeline.config import load_params
from soup_pipeline.stages import evaluate, finetune, prepare, pretrain, soup
from soup_pipeline.stages.layout import Layout, member_ids
from soup_pipeline.tracking import markdown_table

COLUMNS = ("heldout_acc", "test_acc", "test_shift_acc", "seconds")


def run_seed(params_path: str, root: Path, seed: int, base: Path | None) -> list[dict]:
    """One full pipeline with sweep and soup seeds = `seed`, from `base` when given (else pre-trained here)."""
    overrides = {"sweep": {"seed": seed}, "soup": {"seed": seed}}
    if base is not None:
        overrides["model"] = {"pretrained": str(base)}
    params = load_params(params_path, overrides)
    prepare.run(params, root)
    pretrain.run(params, root)
    for member in member_ids(params):
        finetune.run(params, root, member, reuse=True)
    for method in params.evaluate.methods:
        soup.run(params, root, method)
    return evaluate.run(params, root)


def summarise(per_seed: list[list[dict]]) -> list[dict]:
    """Mean +- standard deviation per method, and the paired difference in test accuracy against greedy."""
    methods = [row["method"] for row in per_seed[0]]
    table = []
    for method in methods:
        rows = [next(r for r in seed_rows if r["method"] == method) for seed_rows in per_seed]
        greedy = [next(r for r in seed_rows if r["method"] == "greedy") for seed_rows in per_seed]
        out = {"method": method}
        for column in COLUMNS:
            values = [r[column] for r in rows if r.get(column) is not None]
            if values:
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                out[column] = f"{statistics.mean(values):.4f} ± {spread:.4f}"
        diffs = [r["test_acc"] - g["test_acc"] for r, g in zip(rows, greedy)]
        out["test_acc - greedy"] = f"{statistics.mean(diffs):+.4f} ± {statistics.stdev(diffs) if len(diffs) > 1 else 0:.4f}"
        table.append(out)
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--base", type=Path, default=None, help="pre-trained weights shared by all seeds "
                        "(default: pre-train in the first seed's root)")
    parser.add_argument("--collect", action="store_true", help="only read each seed's finished evaluation")
    args = parser.parse_args(argv)
    per_seed, base = [], args.base
    for seed in args.seeds:
        root = args.workdir / f"seed-{seed}"
        if args.collect:
            per_seed.append(json.loads((Layout(root).eval_dir / "methods.json").read_text()))
        else:
            per_seed.append(run_seed(args.params, root, seed, base))
        base = base or Layout(root).base_weights
        print(f"seed {seed}:\n{markdown_table(per_seed[-1], evaluate.TABLE_COLUMNS)}\n", flush=True)
    print(f"over seeds {args.seeds} (mean ± standard deviation):")
    print(markdown_table(summarise(per_seed), ["method", *COLUMNS, "test_acc - greedy"]))


if __name__ == "__main__":
    main()
