"""Runs a killed pipeline left RUNNING: found by their pipeline root and closed as KILLED by the next run.

A flow holds its root's lock for its whole length, so when a new flow starts on a root, no live
process can own a RUNNING parent run tagged with that root: any such run (and any RUNNING run
nested under it) was left by a process that died without closing it (SIGKILL, OOM killer, a lost
machine). The next run marks them KILLED and tags each with the run that resumed it, so the
MLflow UI never shows a run as live that is not.
"""

from __future__ import annotations

ROOT_TAG = "pipeline_root"  # the resolved pipeline root, on every parent run
RESUMED_BY_TAG = "resumed_by"  # on a closed orphan: the parent run that found it


def close_orphans(root: str, resumed_by: str) -> list[str]:
    """Mark KILLED every RUNNING parent run of `root` in the experiment of run `resumed_by` (but that run),
    and every RUNNING run nested under one; tag each with `resumed_by`. Returns the ids closed."""
    from mlflow import MlflowClient  # imported on use, as everywhere in this package

    client = MlflowClient()
    experiment_id = client.get_run(resumed_by).info.experiment_id
    orphans = [run.info.run_id for run in client.search_runs(
        [experiment_id], filter_string=f"tags.{ROOT_TAG} = '{root}' and attributes.status = 'RUNNING'")
        if run.info.run_id != resumed_by]
    for parent in list(orphans):
        orphans += [run.info.run_id for run in client.search_runs(
            [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'RUNNING'")]
    for run_id in orphans:
        client.set_tag(run_id, RESUMED_BY_TAG, resumed_by)
        client.set_terminated(run_id, status="KILLED")
    return orphans
