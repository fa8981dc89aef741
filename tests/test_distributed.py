"""MEHL-Soup(+) and HL-Soup(+) on 2 gloo processes (torchrun on loopback) equal the run alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from toys import toy_ingredients

pytestmark = pytest.mark.slow
RANKS = Path(__file__).with_name("soup_ranks.py")
K, B = 7, 3  # blocks of 3, 3, 1: the last block leaves rank 1 with no ingredient


def souped(out: Path, method: str, world: int, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run tests/soup_ranks.py on `world` processes (or alone, without torchrun, for world 0)."""
    if not (out / "ingredients").exists():
        toy_ingredients(out / "ingredients", K=K)
    launcher = [] if world == 0 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    done = subprocess.run([sys.executable, *launcher, str(RANKS), str(out), method, *extra], capture_output=True,
                          text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.mark.parametrize("method, extra", [("mehl_soup_plus", ()), ("hl_soup_plus", ()),
                                           ("mehl_soup", ("--grad-clip", "0.05"))])
def test_two_ranks_equal_one_process(tmp_path, method, extra):
    souped(tmp_path / "alone", method, 0, *extra)
    souped(tmp_path / "ranks", method, 2, *extra)
    alone, ranks = (load_file(str(tmp_path / run / "result.safetensors")) for run in ("alone", "ranks"))
    assert alone["coefficients"].abs().max() > 1e-3
    assert max(float((alone[key] - ranks[key]).abs().max()) for key in alone) < 1e-10
    records = [json.loads((tmp_path / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    share = -(-(K if method.startswith("hl") else B) // 2)  # ceil(b / 2) ingredients per rank
    for record in records:
        assert record["world"] == 2 and 1 <= record["peak_resident_count"] <= share
        assert record["peak_resident_bytes"] <= share * record["ingredient_bytes"]
    assert records[0]["peak_resident_count"] == share  # rank 0 holds the larger half of each block


def test_a_rank_crashing_in_block_two_fails_the_run_and_a_rerun_resumes_identically(tmp_path):
    souped(tmp_path / "plain", "mehl_soup_plus", 2)
    crashed = souped(tmp_path / "run", "mehl_soup_plus", 2, "--crash-at", "2", check=False)
    assert crashed.returncode != 0 and "simulated crash of rank 1 in block 2" in crashed.stderr
    saved = list((tmp_path / "run" / "resume").rglob("*.safetensors"))
    assert len(saved) == 1 and load_file(str(saved[0]))["X"].abs().sum() > 0  # blocks 0 and 1 are kept
    souped(tmp_path / "run", "mehl_soup_plus", 2)
    plain, resumed = (load_file(str(tmp_path / run / "result.safetensors")) for run in ("plain", "run"))
    assert all(plain[key].equal(resumed[key]) for key in plain)
