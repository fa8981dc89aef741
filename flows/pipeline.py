"""The Prefect entry point `prefect.yaml` names (`flows/pipeline.py:soup_pipeline_flow`); the flow itself
lives in the installed package, `soup_pipeline.prefect.pipeline`."""

from soup_pipeline.prefect.pipeline import soup_pipeline_flow

__all__ = ["soup_pipeline_flow"]
