"""Every module below the tracking layer (the stages and the workspace included) imports without the tracking package,
Prefect, MLflow or DVC; the CLI names bad params and bad methods clearly."""

from __future__ import annotations

import subprocess
import sys

import pytest

from package_layers import below_tracking
from soup_pipeline.config import load_params
from soup_pipeline.runtime.errors import SoupError

CORE = below_tracking()  # the stages layer and every layer under it, each module by name

BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("prefect", "mlflow", "dvc") or name.startswith("soup_pipeline.tracking"):
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
    for module in ("mlflow", "soup_pipeline.tracking"):
        done = subprocess.run([sys.executable, "-c", BLOCKER, module], capture_output=True, text=True)
        assert done.returncode != 0 and f"blocked: {module}" in done.stderr


def test_bad_params_give_one_clear_error(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("soup:\n  batch_size: -1\n  model_batchs: 2\n")
    done = subprocess.run([sys.executable, "-m", "soup_pipeline.cli", "--params", str(bad), "prepare"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "soup.batch_size: Input should be greater than 0 (got -1)" in done.stderr
    assert "soup.model_batchs: Extra inputs are not permitted" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("methods, message", [
    ("{learned_soup: {lrr: 0.1}}", "methods.learned_soup.lrr: Extra inputs are not permitted (got 0.1)"),
    ("{mehl_soup_plus: {model_batch: 0}}",
     "methods.mehl_soup_plus.model_batch: Input should be greater than 0 (got 0)"),
    ("{learned_soup_plus: {grouping: auto}}", "methods.learned_soup_plus.grouping: Input should be 'tensor', "
                                              "'block' or 'model'; Input should be a valid list (got 'auto')"),
    ("{ensemble: {}}", "unknown soup methods ['ensemble']"),
])
def test_a_bad_method_section_names_the_method_and_key(tmp_path, methods, message):
    bad = tmp_path / "params.yaml"
    bad.write_text(f"soup:\n  methods: {methods}\ntracking:\n  enabled: false\n")
    done = subprocess.run([sys.executable, "-m", "soup_pipeline.cli", "--params", str(bad), "prepare"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("soup, message", [
    ("methods: {greedy: {}, wise_ft_soup: {}}", "methods: unknown soup methods ['wise_ft_soup']; choose from "),
    ("methods: {greedy: {}}\n  refine: {ties: {}}", "['ties'] belong under soup.methods"),
    ("methods: {greedy: {}}\n  refine: {wise_ft_soup: {}}", "refine.wise_ft_soup.soup: 'mehl_soup_auto' is not built; "
                                                           "name one of soup.methods ['greedy']"),
    ("methods: {greedy: {}}\n  refine: {wise_ft_soup: {soup: greedy, alpha: 2}}",
     "refine.wise_ft_soup.alpha: Input should be less than or equal to 1 (got 2)"),
])
def test_a_refinement_is_listed_under_refine_and_names_a_soup_that_is_built(tmp_path, soup, message):
    bad = tmp_path / "params.yaml"
    bad.write_text(f"soup:\n  {soup}\ntracking:\n  register_method: greedy\n")
    with pytest.raises(SoupError) as error:
        load_params(bad)
    assert message in str(error.value)
    bad.write_text("soup:\n  methods: {greedy: {}}\n  refine: {wise_ft_soup: {soup: greedy}}\n"
                   "tracking:\n  register_method: wise_ft_soup\n")
    assert load_params(bad).soup.built == ["greedy", "wise_ft_soup"]  # a refinement can be the registered soup


def test_a_method_that_is_not_a_soup_is_refused_before_any_work(tmp_path):
    done = subprocess.run([sys.executable, "-m", "soup_pipeline.cli", "soup", "--method", "ensemble"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and "invalid choice: 'ensemble'" in done.stderr
    bad = tmp_path / "params.yaml"
    bad.write_text("soup:\n  methods: {greedy: {}, mehl_soup_pluss: {}}\n")
    done = subprocess.run([sys.executable, "-m", "soup_pipeline.cli", "--params", str(bad), "prepare"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "unknown soup methods ['mehl_soup_pluss']" in done.stderr
    bad.write_text("soup:\n  methods: {greedy: {}}\ntracking:\n  register_method: mehl_soup_auto\n")
    done = subprocess.run([sys.executable, "-m", "soup_pipeline.cli", "--params", str(bad), "prepare"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "tracking.register_method: 'mehl_soup_auto' is not built" in done.stderr


def test_a_params_file_that_is_not_yaml_is_one_clear_error(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("soup:\n  lr: [0.05\n  passes: 5\n")
    done = subprocess.run([sys.executable, "-m", "soup_pipeline.cli", "--params", str(bad), "prepare"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and f"params file {bad} is not valid YAML" in done.stderr and "line 3" in done.stderr
    assert "Traceback" not in done.stderr
