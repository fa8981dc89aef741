"""What a run records: params (flattened, `soup.batch_size`), step series in batches, scalar metrics (accuracies,
seconds, peak memory), the mixing weights beta (K x L) as JSON plus a heatmap, and tables as JSON, CSV and Markdown.
Everything goes to the active run (`runs.pipeline_run`, `runs.nested_run`).
"""

from __future__ import annotations

import csv
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..evaluation.plots import plot_mixing_weights
from ..evaluation.tables import columns_of, markdown_table
from ..runtime.errors import SoupError
from .runs import active_run_id, load_mlflow, mlflow_client

MIXING_DIR = "mixing_weights"  # artifact folder of beta.json and beta.png
TABLES_DIR = "tables"  # artifact folder of logged tables


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> {"soup.batch_size": "128", ...}; lists become JSON strings."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


def log_params(params: Mapping[str, Any]) -> None:
    """Log resolved params to the active run, flattened with dotted keys."""
    load_mlflow().log_params(flatten_params(params))


def log_series(series: Mapping[str, Sequence[float]], *, start_step: int = 0) -> None:
    """Log per-step series ({"loss": [...]}) to the active run in batched calls, step = index + start_step."""
    from mlflow.entities import Metric

    timestamp = int(time.time() * 1000)
    metrics = [
        Metric(key, float(value), timestamp, start_step + step)
        for key, values in series.items()
        for step, value in enumerate(values)
    ]
    mlflow_client().log_batch(active_run_id(), metrics=metrics)


def log_scalars(metrics: Mapping[str, float | None]) -> None:
    """Log scalar metrics (accuracies, seconds, peak bytes) to the active run; None values are skipped."""
    load_mlflow().log_metrics({key: float(value) for key, value in metrics.items() if value is not None})


@dataclass(frozen=True)
class MixingWeights:
    """beta (K ingredients x L layers) with its row and column names."""

    beta: np.ndarray
    ingredients: list[str]
    layers: list[str]

    def __post_init__(self) -> None:
        expected = (len(self.ingredients), len(self.layers))
        if np.shape(self.beta) != expected:
            raise SoupError(f"beta has shape {np.shape(self.beta)}, expected {expected} (ingredients x layers)")


def log_mixing_weights(weights: MixingWeights) -> None:
    """Log beta as `mixing_weights/beta.json` and an ingredients x layers heatmap `beta.png`."""
    with tempfile.TemporaryDirectory() as tmp:
        beta = np.asarray(weights.beta).tolist()
        payload = {"ingredients": list(weights.ingredients), "layers": list(weights.layers), "beta": beta}
        (Path(tmp) / "beta.json").write_text(json.dumps(payload) + "\n")
        plot_mixing_weights(weights.beta, weights.ingredients, weights.layers, Path(tmp) / "beta.png")
        load_mlflow().log_artifacts(tmp, artifact_path=MIXING_DIR)


def load_mixing_weights(run_id: str) -> MixingWeights:
    """Download a run's `mixing_weights/beta.json` and rebuild the matrix."""
    with tempfile.TemporaryDirectory() as tmp:
        path = load_mlflow().artifacts.download_artifacts(
            run_id=run_id, artifact_path=f"{MIXING_DIR}/beta.json", dst_path=tmp
        )
        payload = json.loads(Path(path).read_text())
    return MixingWeights(np.asarray(payload["beta"], dtype=np.float64), payload["ingredients"], payload["layers"])


def log_table(rows: Sequence[Mapping[str, Any]], name: str) -> None:
    """Log rows as `tables/<name>.json`, `.csv` and `.md` (ingredient hyperparameters, evaluation)."""
    columns = columns_of(rows)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / f"{name}.json").write_text(json.dumps(list(map(dict, rows)), indent=2, default=str) + "\n")
        with open(base / f"{name}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        (base / f"{name}.md").write_text(markdown_table(rows, columns))
        load_mlflow().log_artifacts(tmp, artifact_path=TABLES_DIR)
