"""Prefect flows and deployments of the soup pipeline; they call `soup_pipeline.stages` and nothing else."""
