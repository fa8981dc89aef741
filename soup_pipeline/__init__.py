"""soup-pipeline: learn a model soup from a fine-tuning sweep, inside Prefect, DVC and MLflow."""

__version__ = "0.2.0"  # as pyproject.toml
