"""MLflow tracking and model registry for the pipeline, split by job:

- `runs.py`: where runs go (the tracking URI, the experiment) and how they open: one parent run per pipeline
  execution (`pipeline_run`), one nested run per fine-tune and per soup method (`nested_run`);
- `records.py`: what a run records: params flattened (`soup.batch_size`), step series in batches, scalar metrics,
  the mixing weights beta (K x L) as JSON plus a heatmap, tables as JSON, CSV and Markdown;
- `registry.py`: soups registered as pyfunc models (`pyfunc_model.py`), the `champion` alias (moved only by select
  accuracy) and the comparison of versions;
- `stage_runs.py`: the MLflow runs of the pipeline's stages (Prefect flow, `soup-pipeline track`), with
  `pipeline_registration.py` (which model a run registers, its model card and lineage) and `provenance.py`;
- `orphans.py`, `mlflow_sources.py`, `export.py`: runs a killed pipeline left open, checkpoints named by MLflow
  URIs, a registered soup read back for export.

MLflow is imported in `tracking/` only, by `runs.py`, `records.py` and `registry.py` (lazily: importing this package
does not import it), `orphans.py` and `mlflow_sources.py` (lazily too), and `pyfunc_model.py` (the registered
model's code). This module only re-exports the API of `runs.py`, `records.py` and `registry.py`.
"""

from .records import (
    MIXING_DIR,
    TABLES_DIR,
    MixingWeights,
    flatten_params,
    load_mixing_weights,
    log_mixing_weights,
    log_params,
    log_scalars,
    log_series,
    log_table,
)
from .registry import (
    CHAMPION,
    COMPARE_COLUMNS,
    METRIC_TAGS,
    MODEL_NAME,
    PYFUNC_MODEL,
    REQUIREMENTS,
    compare_versions,
    find_version,
    format_comparison,
    image_frame,
    promote_if_better,
    register_soup,
    registry_compare_main,
)
from .runs import (
    active_parent_run_id,
    active_run_id,
    artifact_location,
    check_reachable,
    child_runs,
    connect,
    nested_run,
    pipeline_run,
    tracking_uri,
    use_experiment,
)

__all__ = [
    "CHAMPION",
    "COMPARE_COLUMNS",
    "METRIC_TAGS",
    "MIXING_DIR",
    "MODEL_NAME",
    "PYFUNC_MODEL",
    "REQUIREMENTS",
    "TABLES_DIR",
    "MixingWeights",
    "active_parent_run_id",
    "active_run_id",
    "artifact_location",
    "check_reachable",
    "child_runs",
    "compare_versions",
    "connect",
    "find_version",
    "flatten_params",
    "format_comparison",
    "image_frame",
    "load_mixing_weights",
    "log_mixing_weights",
    "log_params",
    "log_scalars",
    "log_series",
    "log_table",
    "nested_run",
    "pipeline_run",
    "promote_if_better",
    "register_soup",
    "registry_compare_main",
    "tracking_uri",
    "use_experiment",
]
