"""Shared test settings: keep every tool off the network and out of the user's home."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="soup-prefect-home-"))
for _name in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
    os.environ.setdefault(_name, "soup-pipeline tests")
for _name in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
    os.environ.setdefault(_name, "tests@soup-pipeline.invalid")

# Session fixtures shared by several modules: registered here once, so they are built once.
from flow_run import harness, pipeline  # noqa: E402,F401
from helpers_clip import pretrained_base, tiny_splits  # noqa: E402,F401
