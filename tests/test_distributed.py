"""MEHL-Soup(+) and HL-Soup(+) on 2 gloo processes (torchrun on loopback) equal the run alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from soup_pipeline.core.ingredients import IngredientStore
from soup_pipeline.soups import run_method
from soup_ranks import SETTINGS
from toys import params_for, toy_ingredients, toy_objective

pytestmark = pytest.mark.slow
RANKS = Path(__file__).with_name("soup_ranks.py")
K, B = 7, 3  # blocks of 3, 3, 1: the last block leaves rank 1 with no ingredient
CASES = {"mehl_soup_plus": None, "hl_soup_plus": None, "mehl_soup": 0.05}  # method: gradient clipping


def on_two_ranks(out: Path, method: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run tests/soup_ranks.py on 2 processes under torchrun, its ingredients made first."""
    if not (out / "ingredients").exists():
        toy_ingredients(out / "ingredients", K=K)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(RANKS), str(out), method, *extra], capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, Path]:
    """Each case souped once on 2 ranks: its output folder."""
    folders = {}
    for method, clip in CASES.items():
        folders[method] = tmp_path_factory.mktemp(method)
        on_two_ranks(folders[method], method, *(("--grad-clip", str(clip)) if clip else ()))
    return folders


@pytest.mark.parametrize("method", CASES)
def test_two_ranks_equal_one_process(two_ranks, method):
    out = two_ranks[method]
    alone = run_method(method, IngredientStore(sorted((out / "ingredients").glob("*.safetensors"))), toy_objective(),
                       params_for(method, **SETTINGS, grad_clip=CASES[method]))
    ranks = load_file(str(out / "result.safetensors"))
    expected = {"coefficients": alone.info["coefficients"], "beta": alone.beta,
                **{f"soup.{key}": value for key, value in alone.state_dict.items()}}
    assert expected["coefficients"].abs().max() > 1e-3
    assert max(float((expected[key] - ranks[key]).abs().max()) for key in expected) < 1e-10
    records = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    share = -(-(K if method.startswith("hl") else B) // 2)  # ceil(b / 2) ingredients per rank
    for record in records:
        assert record["world"] == 2 and 1 <= record["peak_resident_count"] <= share
        assert record["peak_resident_bytes"] <= share * record["ingredient_bytes"]
    assert records[0]["peak_resident_count"] == share  # rank 0 holds the larger half of each block


def test_a_rank_crashing_in_block_two_fails_the_run_and_a_rerun_resumes_identically(two_ranks, tmp_path):
    crashed = on_two_ranks(tmp_path, "mehl_soup_plus", "--crash-at", "2", check=False)
    assert crashed.returncode != 0 and "simulated crash of rank 1 in block 2" in crashed.stderr
    saved = list((tmp_path / "resume").rglob("*.safetensors"))
    assert len(saved) == 1 and load_file(str(saved[0]))["X"].abs().sum() > 0  # blocks 0 and 1 are kept
    on_two_ranks(tmp_path, "mehl_soup_plus")
    assert json.loads((tmp_path / "rank-0.json").read_text())["blocks_reused"] == 2  # resumed, not recomputed
    plain, resumed = (load_file(str(folder / "result.safetensors"))
                      for folder in (two_ranks["mehl_soup_plus"], tmp_path))
    assert all(plain[key].equal(resumed[key]) for key in plain)  # bit for bit the uninterrupted 2-rank run


def alone(out: Path, method: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    """tests/soup_ranks.py on one process (no torchrun)."""
    done = subprocess.run([sys.executable, str(RANKS), str(out), method, *extra], capture_output=True, text=True,
                          timeout=300)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.mark.parametrize("crashed_on, resumed_on", [(2, 1), (1, 2)])
def test_a_run_killed_inside_a_block_resumes_on_another_number_of_processes(two_ranks, tmp_path, crashed_on,
                                                                            resumed_on):
    run = {1: alone, 2: on_two_ranks}
    toy_ingredients(tmp_path / "ingredients", K=K)
    crashed = run[crashed_on](tmp_path, "mehl_soup_plus", "--crash-at", "2", check=False)
    assert crashed.returncode != 0 and "simulated crash of rank" in crashed.stderr
    run[resumed_on](tmp_path, "mehl_soup_plus")
    record = json.loads((tmp_path / "rank-0.json").read_text())
    assert record["world"] == resumed_on and record["blocks_reused"] == 2  # the saved blocks, not recomputed
    plain, resumed = (load_file(str(folder / "result.safetensors"))
                      for folder in (two_ranks["mehl_soup_plus"], tmp_path))
    assert max(float((plain[key] - resumed[key]).abs().max()) for key in plain) < 1e-10  # the uninterrupted run's
