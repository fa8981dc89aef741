"""The core never imports Prefect, MLflow or DVC (DESIGN.md s.4); the CLI names bad params clearly."""

from __future__ import annotations

import subprocess
import sys

CORE = ["soup_pipeline.config", "soup_pipeline.ingredients", "soup_pipeline.soups", "soup_pipeline.models",
        "soup_pipeline.data", "soup_pipeline.pretrain", "soup_pipeline.finetune", "soup_pipeline.sweep",
        "soup_pipeline.evaluate", "soup_pipeline.meters", "soup_pipeline.plots", "soup_pipeline.stages.evaluate",
        "soup_pipeline.stages.soup", "soup_pipeline.tracking"]

BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("prefect", "mlflow", "dvc"):
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
import importlib
for module in sys.argv[1:]:
    importlib.import_module(module)
print("ok")
"""


def test_core_imports_with_prefect_mlflow_and_dvc_blocked():
    done = subprocess.run([sys.executable, "-c", BLOCKER, *CORE], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_blocker_really_blocks():
    done = subprocess.run([sys.executable, "-c", BLOCKER, "mlflow"], capture_output=True, text=True)
    assert done.returncode != 0 and "blocked: mlflow" in done.stderr


def test_bad_params_give_one_clear_error(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("soup:\n  lr: -1\n  model_batchs: 2\n")
    done = subprocess.run([sys.executable, "-m", "soup_pipeline.cli", "--params", str(bad), "prepare"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "soup.lr: Input should be greater than 0 (got -1)" in done.stderr
    assert "soup.model_batchs: Extra inputs are not permitted" in done.stderr
    assert "Traceback" not in done.stderr
