"""The evaluation table over several sweep seeds: mean, spread, and paired differences against greedy soup,
then the same against the best merge method (task arithmetic, TIES, DARE, Model Stock, WiSE-FT: the one
with the highest mean select accuracy over the seeds; test data choose nothing), then against always
registering `mehl_soup_auto`. The row `auto` is the model `register_method: auto` registers in each seed
(runs/eval/registration.json), so its differences measure the registration rule against both fixed choices.

Each seed is a full pipeline (sweep of K fine-tunes from one shared pre-trained base, every soup
method, evaluation) in its own root; finished members are reused. Example (the tables of docs/results.md):

    python benchmarks/seeds.py --seeds 0 1 2 3 4 --workdir /tmp/soup-seeds
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml

from soup_pipeline.config import load_params
from soup_pipeline.evaluation.selection import REFERENCE, registration_file
from soup_pipeline.evaluation.statistics import mean_interval
from soup_pipeline.evaluation.tables import markdown_table
from soup_pipeline.soups import SPECS
from soup_pipeline.stages import evaluate, finetune, prepare, pretrain, soup
from soup_pipeline.workspace.loading import member_ids
from soup_pipeline.workspace.paths import StagePaths
from soup_pipeline.workspace.results import with_costs

COLUMNS = ("fit_acc", "select_acc", "test_acc", "shifted_test_acc", "seconds", "peak_cpu_mib")
PAIRED = (("test_acc", "wins/seeds"), ("shifted_test_acc", "shifted wins/seeds"))  # (accuracy, header of its wins)


def paired_columns(reference: str) -> list[tuple[str, str, str]]:
    """(accuracy compared with the reference's of the same seed, header of the difference, header of the wins)."""
    return [(column, f"{column} - {reference}", wins) for column, wins in PAIRED]


def summary_columns(reference: str) -> list[str]:
    return ["method", *COLUMNS, *(header for _, *headers in paired_columns(reference) for header in headers)]


SUMMARY_COLUMNS = summary_columns(REFERENCE)


def parse_settings(settings: list[str]) -> dict[str, dict]:
    """`SECTION.KEY=VALUE` strings (VALUE in YAML) as nested overrides of params.yaml, {section: {key: value}}."""
    out: dict[str, dict] = {}
    for setting in settings:
        name, _, value = setting.partition("=")
        section, _, key = name.partition(".")
        if not key or not value:
            raise SystemExit(f"--set {setting!r}: write SECTION.KEY=VALUE, e.g. sweep.lr_range=[0.001,0.003]")
        out.setdefault(section, {})[key] = yaml.safe_load(value)
    return out


def run_seed(params_path: str, root: Path, seed: int, base: Path | None,
             settings: dict[str, dict] | None = None) -> list[dict]:
    """One full pipeline with sweep and soup seeds = `seed` (on top of `settings`), from `base` when given (else
    pre-trained here)."""
    overrides = {section: dict(values) for section, values in (settings or {}).items()}
    overrides.setdefault("sweep", {})["seed"] = seed
    overrides.setdefault("soup", {})["seed"] = seed
    if base is not None:
        overrides.setdefault("model", {})["pretrained"] = str(base)
    params = load_params(params_path, overrides)
    prepare.run(params, root)
    pretrain.run(params, root)
    for member in member_ids(params):
        finetune.run(params, root, member, reuse=True)
    for method in params.soup.built:
        soup.run(params, root, method)
    return evaluate.run(params, root)


def _spread_cell(values: list[float]) -> str | None:
    """"mean ± standard deviation" across seeds (the mean alone for one seed)."""
    if not values:
        return None
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _interval_cell(differences: list[float]) -> str | None:
    """"mean [low, high]" with the 95% Student-t interval across seeds (the mean alone for one seed)."""
    if not differences:
        return None
    mean, low, high = mean_interval(differences)
    if len(differences) == 1:
        return f"{mean:+.4f}"
    return f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]"


def _paired_differences(per_seed_by_method: list[dict[str, dict]], method: str, column: str,
                        reference: str) -> list[float]:
    """`column` of `method` minus that of `reference`, for every seed where both rows have it."""
    return [seed_rows[method][column] - seed_rows[reference][column] for seed_rows in per_seed_by_method
            if seed_rows.get(method, {}).get(column) is not None
            and seed_rows.get(reference, {}).get(column) is not None]


AUTO_ROW = "auto"
FIXED_CHOICE = "mehl_soup_auto"  # the registered soup before `auto` became the default


def with_registered(rows: list[dict], root: Path) -> list[dict]:
    """The seed's rows plus the row `auto`: the row of the model `register_method: auto` registered there."""
    path = registration_file(StagePaths(root).eval_dir)
    if not path.is_file():
        return rows
    chosen = json.loads(path.read_text())["method"]
    return rows + [{**next(row for row in rows if row["method"] == chosen), "method": AUTO_ROW, "registered": chosen}]


def best_merge(per_seed: list[list[dict]]) -> str | None:
    """The merge method with the highest mean select accuracy over the seeds (None when no seed has one); a
    refinement of a built soup (wise_ft_soup) is that soup's variant, not a merge method of its own."""
    scores: dict[str, list[float]] = {}
    for seed_rows in per_seed:
        for row in seed_rows:
            spec = SPECS.get(row["method"])
            if spec is not None and spec.anchored and not spec.refines and row.get("select_acc") is not None:
                scores.setdefault(row["method"], []).append(row["select_acc"])
    return max(scores, key=lambda method: statistics.mean(scores[method]), default=None)


def summarise(per_seed: list[list[dict]], reference: str = REFERENCE) -> list[dict]:
    """One row per method: mean ± standard deviation of each of COLUMNS across seeds, and for each paired column
    the mean paired difference against `reference` of the same seed, its 95% t interval and wins/seeds.

    Missing (None or absent) values are left out: a seed counts for a difference only where both rows have it.
    """
    per_seed_by_method = [{row["method"]: row for row in seed_rows} for seed_rows in per_seed]
    methods = list(dict.fromkeys(method for seed_rows in per_seed_by_method for method in seed_rows))
    table = []
    for method in methods:
        rows = [seed_rows[method] for seed_rows in per_seed_by_method if method in seed_rows]
        summary = {"method": method}
        for column in COLUMNS:
            summary[column] = _spread_cell([row[column] for row in rows if row.get(column) is not None])
        for column, difference_header, wins_header in paired_columns(reference):
            differences = _paired_differences(per_seed_by_method, method, column, reference)
            summary[difference_header] = _interval_cell(differences)
            summary[wins_header] = f"{sum(d > 0 for d in differences)}/{len(differences)}" if differences else None
        table.append(summary)
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--base", type=Path, default=None, help="pre-trained weights shared by all seeds "
                        "(default: pre-train in the first seed's root)")
    parser.add_argument("--collect", action="store_true", help="only read each seed's finished evaluation")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a params key for every seed (VALUE in YAML); repeat for more")
    args = parser.parse_args(argv)
    per_seed, base = [], args.base
    for seed in args.seeds:
        root = args.workdir / f"seed-{seed}"
        if args.collect:
            paths = StagePaths(root)
            rows = with_costs(json.loads((paths.eval_dir / "methods.json").read_text()), paths)
        else:
            rows = run_seed(args.params, root, seed, base, parse_settings(args.set))
        per_seed.append(with_registered(rows, root))
        print(f"seed {seed}: auto registered {per_seed[-1][-1].get('registered')}", flush=True)
        base = base or StagePaths(root).base_weights
        print(f"seed {seed}:\n{markdown_table(per_seed[-1], evaluate.TABLE_COLUMNS)}\n", flush=True)
    for reference in dict.fromkeys([REFERENCE, best_merge(per_seed) or REFERENCE, FIXED_CHOICE]):
        print(f"over seeds {args.seeds}: mean ± standard deviation; differences against {reference} of the same seed: "
              "mean [95% t interval across seeds]")
        print(markdown_table(summarise(per_seed, reference), summary_columns(reference)) + "\n")


if __name__ == "__main__":
    main()
