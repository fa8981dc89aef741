"""`dvc repro` end to end on tiny settings: reruns only what changed, push / clone / pull round trip."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml
from safetensors.torch import load_file, save_file

from dvc_repo import make_repo, sh, write_params
from soup_pipeline.workspace.paths import StagePaths

pytestmark = pytest.mark.slow


def changed_stages(repo) -> set[str]:
    return set(json.loads(sh("dvc", "status", "--json", cwd=repo) or "{}"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One tiny pipeline, reproduced, committed and pushed to a local remote."""
    folder = tmp_path_factory.mktemp("dvc")
    repo = make_repo(folder, remote=folder / "remote")
    sh("dvc", "repro", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "repro", cwd=repo)
    sh("dvc", "push", cwd=repo)
    return repo


@pytest.fixture
def repo(built, tmp_path):
    """A test's own copy of the built pipeline, to change at will: its git history, its DVC cache (.dvc/cache, copied
    along) and its outputs; the remote in .dvc/config is an absolute path, still the built repo's. Nothing a test does
    here reaches `built` or the next test, so no test has to restore anything."""
    copy = tmp_path / "repo"
    shutil.copytree(built, copy, symlinks=True)
    yield copy
    shutil.rmtree(copy, ignore_errors=True)  # about 120 MB each: not kept in the temporary folders pytest retains


def test_repro_builds_every_stage_and_a_second_repro_runs_nothing(built):
    metrics = json.loads((built / "runs/eval/metrics.json").read_text())
    assert {"zero_shot", "best_individual", "uniform", "greedy", "mehl_soup_plus", "ensemble"} <= set(metrics)
    assert all(0.0 <= row["test_acc"] <= 1.0 for row in metrics.values())
    assert (built / "runs/eval/plots/methods.png").stat().st_size > 1000
    assert (built / "runs/ablation/ingredient_count.png").is_file()
    assert changed_stages(built) == set()
    assert "up to date" in sh("dvc", "repro", cwd=built)
    assert "metrics.json" in sh("dvc", "metrics", "show", cwd=built)


def test_rerunning_a_stage_on_the_same_inputs_leaves_dvc_lock_unchanged(repo):
    for stage in ("soup@greedy", "soup@mehl_soup_plus", "evaluate"):  # timings and memory live outside the outputs
        assert f"Running stage '{stage}'" in sh("dvc", "repro", "--force", "--single-item", stage, cwd=repo)
    assert sh("git", "status", "--porcelain", "dvc.lock", cwd=repo) == ""
    assert json.loads((repo / "runs" / "costs" / "soup-greedy.json").read_text())["seconds"] > 0


def test_a_shared_soup_key_reruns_every_soup_and_evaluation(repo):
    write_params(repo, {"soup": {"batch_size": 16}})
    assert changed_stages(repo) == {"soup@uniform", "soup@greedy", "soup@learned_soup", "soup@mehl_soup_plus",
                                    "refine@wise_ft_soup", "evaluate", "ablate"}


def test_a_new_member_reruns_only_that_member_and_what_depends_on_it(repo):
    write_params(repo, {"sweep": {"members": [0, 1, 2, 3]}})
    stale = changed_stages(repo)
    assert "finetune@3" in stale
    assert not {"prepare", "pretrain", "finetune@0", "finetune@1", "finetune@2"} & stale
    assert {"soup@mehl_soup_plus", "evaluate"} <= stale


def test_soup_stage_on_two_processes_equals_the_committed_one_process_soup(repo):
    soup = yaml.safe_load((repo / "params.yaml").read_text())["soup"]
    write_params(repo, {"soup": {**soup, "nproc": 2}})
    before = load_file(str(repo / "runs/soups/mehl_soup_plus/soup.safetensors"))
    assert changed_stages(repo) == set()  # the number of processes is not an input of the result
    log = sh("dvc", "repro", "--force", "--single-item", "soup@mehl_soup_plus", cwd=repo)
    assert "Running stage 'soup@mehl_soup_plus'" in log
    assert json.loads(StagePaths(repo).soup_cost("mehl_soup_plus").read_text())["processes"] == 2  # torchrun ran
    after = load_file(str(repo / "runs/soups/mehl_soup_plus/soup.safetensors"))
    assert max(float((before[key] - after[key]).abs().max()) for key in before) < 1e-5


def test_push_clone_pull_gives_identical_checkpoints(built, tmp_path):
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(built), str(clone), cwd=tmp_path)
    sh("dvc", "pull", cwd=clone)
    assert changed_stages(clone) == set()
    for name in ("member-0.safetensors", "member-2.safetensors"):
        assert (clone / "runs/ingredients" / name).read_bytes() == (built / "runs/ingredients" / name).read_bytes()
    assert (clone / "runs/soups/mehl_soup_plus/soup.safetensors").read_bytes() == \
        (built / "runs/soups/mehl_soup_plus/soup.safetensors").read_bytes()


def test_one_methods_parameter_reruns_only_that_soup_and_what_reads_the_soups(repo):
    soup = yaml.safe_load((repo / "params.yaml").read_text())["soup"]
    soup["methods"]["learned_soup"]["lr"] = 0.02
    write_params(repo, {"soup": soup})
    assert changed_stages(repo) == {"soup@learned_soup", "evaluate", "ablate"}  # the other soups are not stale
    log = sh("dvc", "repro", cwd=repo)
    ran = set(re.findall(r"Running stage '([^']+)'", log))
    assert ran == {"soup@learned_soup", "evaluate", "ablate"}, log
    assert ({"soup@uniform", "soup@greedy", "soup@mehl_soup_plus"}
            <= set(re.findall(r"Stage '([^']+)' didn't change", log)))


def test_imported_checkpoints_are_souped_beside_the_fine_tunes_without_touching_them(repo, tmp_path):
    external = tmp_path / "sweep-elsewhere"  # a sweep that ran elsewhere: two checkpoints in a folder
    external.mkdir()
    for member, name in ((0, "a.safetensors"), (2, "b.safetensors")):
        state = load_file(str(repo / f"runs/ingredients/member-{member}.safetensors"))
        save_file({key: value * 1.01 if value.is_floating_point() else value for key, value in state.items()},
                  str(external / name))
    fine_tunes = {path.name: path.read_bytes() for path in (repo / "runs/ingredients").iterdir()}
    write_params(repo, {"imports": {"sources": [str(external)], "first_member": 100}})
    assert changed_stages(repo) == {"import"}  # the soups are stale only once the import changed its output
    log = sh("dvc", "repro", "soup@uniform", cwd=repo)  # the import and one soup of it, to keep the test short
    assert set(re.findall(r"Running stage '([^']+)'", log)) == {"import", "soup@uniform"}, log
    assert {path.name: path.read_bytes() for path in (repo / "runs/ingredients").iterdir()} == fine_tunes
    assert changed_stages(repo) == {"soup@greedy", "soup@learned_soup", "soup@mehl_soup_plus", "refine@wise_ft_soup",
                                    "evaluate", "ablate"}
    lineage = json.loads((repo / "runs/imported/lineage.json").read_text())
    assert [(row["member"], row["source_uri"]) for row in lineage] == [(100, str(external / "a.safetensors")),
                                                                        (101, str(external / "b.safetensors"))]
    beta = json.loads((repo / "runs/soups/uniform/beta.json").read_text())
    assert beta["ingredients"] == ["member-0", "member-1", "member-2", "member-100", "member-101"]


def test_a_refinement_reruns_after_the_soup_it_refines_and_alone_when_its_own_section_changes(repo):
    soup = yaml.safe_load((repo / "params.yaml").read_text())["soup"]
    soup["refine"]["wise_ft_soup"]["search"]["alphas"] = [0.7]
    write_params(repo, {"soup": soup})
    assert changed_stages(repo) == {"refine@wise_ft_soup", "evaluate"}  # the ablation reads no refinement
    sh("git", "checkout", "params.yaml", cwd=repo)  # back to the committed params: the next change alone
    soup = yaml.safe_load((repo / "params.yaml").read_text())["soup"]
    soup["methods"]["mehl_soup_plus"]["passes"] = 0.25
    write_params(repo, {"soup": soup})
    log = sh("dvc", "repro", cwd=repo)
    ran = re.findall(r"Running stage '([^']+)'", log)
    assert set(ran) == {"soup@mehl_soup_plus", "refine@wise_ft_soup", "evaluate", "ablate"}, log
    assert ran.index("soup@mehl_soup_plus") < ran.index("refine@wise_ft_soup")  # the refined soup first
    refined = json.loads((repo / "runs/soups/wise_ft_soup/metrics.json").read_text())
    assert refined["soup"] == "mehl_soup_plus" and refined["chosen"]["alpha"] in (0.5, 1.0)
