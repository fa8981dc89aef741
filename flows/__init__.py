"""This repository's Prefect entry point (not installed): `prefect.yaml` names `flows/pipeline.py`."""
