"""dvc.yaml declares exactly what each stage runs and reads: its code deps are the stage's import closure inside
the package, its params the keys it reads while it runs. Then DVC and the flow's reuse, which both read these
declarations, rerun exactly what a change affects."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from dvc_repo import PROJECT, TINY, sh, write_params
from flow_run import lock_file, run_flow
from params_reads import recording
from soup_pipeline.cli import MODULES_RECORD_ENV
from soup_pipeline.config import load_params
from soup_pipeline.core.models import classifier_spec
from soup_pipeline.core.portable_classifier import classifier_from_spec
from soup_pipeline.workspace.code import DVC_STAGES, imported_files, stage_code

STAGES = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
# how a stage runs, not what it computes (documented in core.settings; the reading tests show the same bytes)
EXECUTION_ONLY = {"soup.nproc", "soup.nnodes", "soup.rdzv_endpoint", "soup.join_timeout", "sweep.workers",
                  "evaluate.workers"}
# a soup stage reads the build order, the names under soup.methods and soup.refine, to deal its soup over the GPUs
# (runtime.placement: soup i on GPU i mod count); the soup does not depend on it, so no other soup's change reruns it
PLACEMENT_ONLY = {"soup.methods", "soup.refine"}
CONDITIONAL = {  # declared keys a stage reads only for some settings (the test's: digits, open_clip)
    "prepare": {"model.family": "image folders and torchvision sources use the model family's eval transform",
                "model.arch": "the same", "model.kwargs": "timm's transform reads the model's own data config"},
    "import": {"model.kwargs": "a timm, torchvision or own model's constructor arguments shape what checkpoints fit"},
}


def body(stage: str) -> dict:
    return STAGES[stage].get("do", STAGES[stage])


def code_deps(stage: str) -> list[str]:
    return sorted(dep for dep in body(stage)["deps"] if dep.startswith("soup_pipeline"))


@pytest.mark.parametrize("stage", [name for name in STAGES])
def test_each_stage_depends_on_exactly_the_code_it_runs(stage):
    assert code_deps(stage) == stage_code(stage), "regenerate the stage's deps from soup_pipeline.workspace.code"


def test_the_closure_follows_function_level_imports_and_only_the_stage_the_cli_dispatches():
    prepare, finetune = set(stage_code("prepare")), set(stage_code("finetune"))
    assert "soup_pipeline/training/augment.py" in finetune and "soup_pipeline/training/augment.py" not in prepare
    assert "soup_pipeline/stages/finetune.py" not in prepare  # the CLI imports the dispatched stage only
    assert "soup_pipeline/core/configs" in prepare  # package data read by models.py
    config = Path(__file__).resolve().parents[1] / "soup_pipeline" / "config.py"
    assert any(path.name == "__init__.py" and path.parent.name == "soups" for path in imported_files(config))
    assert set(DVC_STAGES) == set(STAGES)


ITEMS = {"finetune": "0", "soup": "uniform", "refine": "wise_ft_soup"}  # the one item of each foreach stage run below
ENTRY = {"import": "importer", "refine": "soup"}  # the stage module a command dispatches to, where its name differs


@pytest.fixture(scope="module")
def stage_modules(tmp_path_factory) -> dict[str, list[str]]:
    """Each DVC stage run once for real, as dvc.yaml's `cmd` (`soup-pipeline <stage>`, a process of its own), on the
    least work that runs them all: one fine-tune beside one imported checkpoint, one soup and its refinement. Returns,
    per stage, the package modules its process had loaded when it exited (written at exit by the CLI, asked to by
    MODULES_RECORD_ENV)."""
    root, record = tmp_path_factory.mktemp("stage-modules"), tmp_path_factory.mktemp("loaded")
    external = root / "external"  # the imported checkpoint: the fine-tune's, scaled once it exists
    shutil.copy(PROJECT / "params.yaml", root / "params.yaml")
    write_params(root, {**TINY, "data": {"pretrain_size": 60, "train_size": 40, "heldout_size": 40, "test_size": 40},
                        "pretrain": {"epochs": 1}, "sweep": {"members": [0], "epochs_range": [1, 1]},
                        "imports": {"sources": [str(external)], "first_member": 100},
                        "soup": {**TINY["soup"], "methods": {"uniform": {}}, "refine": {
                            "wise_ft_soup": {"soup": "uniform", "search": {"alphas": [0.5]}}}},
                        "evaluate": {"ingredient_counts": [], "remove_top": [], "bootstrap_resamples": 100},
                        "tracking": {"system_metrics": False, "register_method": "uniform"}})
    # as DVC orders them
    for stage in ("prepare", "pretrain", "finetune", "import", "soup", "refine", "evaluate", "ablate"):
        if stage == "import":
            external.mkdir()
            state = load_file(str(root / "runs/ingredients/member-0.safetensors"))
            save_file({key: value * 1.01 if value.is_floating_point() else value for key, value in state.items()},
                      str(external / "other.safetensors"))
        command = body(stage)["cmd"].replace("${item}", ITEMS.get(stage, "")).replace("${key}", ITEMS.get(stage, ""))
        sh(*shlex.split(command), cwd=root, env={MODULES_RECORD_ENV: str(record)})
    loaded: dict[str, list[list[str]]] = {}
    for path in record.glob("*.json"):
        run = json.loads(path.read_text())
        loaded.setdefault(run["command"], []).append(run["modules"])
    # one process each
    assert {stage: len(runs) for stage, runs in loaded.items()} == {stage: 1 for stage in DVC_STAGES}
    return {stage: runs[0] for stage, runs in loaded.items()}


def module_file(name: str) -> str:
    """The project file of package module `name` (a package's __init__.py); the name itself where there is none."""
    base = PROJECT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return str(candidate.relative_to(PROJECT))
    return name


@pytest.mark.slow
@pytest.mark.parametrize("stage", DVC_STAGES)
def test_each_stage_run_for_real_loads_only_package_code_its_deps_declare(stage_modules, stage):
    loaded = stage_modules[stage]
    assert {"soup_pipeline.cli", f"soup_pipeline.stages.{ENTRY.get(stage, stage)}"} <= set(loaded)  # it ran the stage
    undeclared = sorted({module_file(name) for name in loaded} - set(code_deps(stage)))
    assert undeclared == [], f"{stage} ran package code dvc.yaml does not list among its deps"


def declared_params(stage: str, method: str | None = None) -> set[str]:
    return {key.replace("${key}", method or "") for key in body(stage)["params"]}


def covered(key: str, by: set[str]) -> bool:
    return any(key == other or key.startswith(other + ".") for other in by)


def run_recorded(params, root: Path) -> dict[str, set[str]]:
    """Each stage run once on `params` under `root`, with the keys it read."""
    from soup_pipeline.stages import ablate, evaluate, finetune, importer, prepare, pretrain, soup

    members, methods = list(params.sweep.members), list(params.soup.methods)  # read here, not by the stages
    steps = {"prepare": lambda: prepare.run(params, root), "pretrain": lambda: pretrain.run(params, root),
             "import": lambda: importer.run_params(params, root),
             "finetune": lambda: [finetune.run(params, root, k) for k in members],
             **{f"soup@{m}": (lambda m=m: soup.run(params, root, m)) for m in methods},
             **{f"refine@{m}": (lambda m=m: soup.run(params, root, m)) for m in params.soup.refine},
             "evaluate": lambda: evaluate.run(params, root), "ablate": lambda: ablate.run(params, root)}
    reads = {}
    for name, step in steps.items():
        with recording(params) as recorder:
            step()
        reads[name] = recorder.reads
    return reads


@pytest.mark.slow
def test_each_stage_declares_exactly_the_params_keys_it_reads(tmp_path):
    params_file = tmp_path / "params.yaml"
    values = yaml.safe_load((PROJECT / "params.yaml").read_text())
    small = {**TINY, "pretrain": {"epochs": 1}, "sweep": {"members": [0, 1, 2], "epochs_range": [1, 1]}}
    for section, changes in small.items():
        values[section] = {**values[section], **changes}
    values["soup"]["methods"] = {"uniform": {}, "greedy": {}, "learned_soup": {"epochs": 1},
                                 "mehl_soup_plus": {"passes": 0.5}, "mehl_soup_auto": {"passes": 0.5, "search": {
                                     "groupings": ["model"], "lrs": [0.05], "weight_decays": [0.0]}},
                                 # a merge method: theta_0, soup.seed
                                 "dare": {"search": {"scales": [0.3], "drops": [0.5]}},
                                 "model_stock": {"search": {"groupings": ["model"]}}}
    values["soup"]["refine"] = {"wise_ft_soup": {"soup": "mehl_soup_auto", "search": {"alphas": [0.5]}}}
    external = tmp_path / "external" / "checkpoint.safetensors"  # one imported member beside the fine-tunes
    external.parent.mkdir()
    save_file(classifier_from_spec(classifier_spec("soup-tiny-vit", 10)).state_dict(), str(external))
    values["imports"] = {**values["imports"], "sources": [str(external.parent)]}
    params_file.write_text(yaml.safe_dump(values))
    reads = run_recorded(load_params(params_file), tmp_path)
    soup_reads = set()
    for name, keys in reads.items():
        stage, _, method = name.partition("@")
        declared = declared_params(stage, method)
        keys = keys - EXECUTION_ONLY - (PLACEMENT_ONLY if stage in ("soup", "refine") else set())
        assert not [k for k in keys if not covered(k, declared)], f"{name} reads keys dvc.yaml does not declare"
        if stage == "soup":
            soup_reads |= {k.replace(f"methods.{method}", "methods.${key}") for k in keys}
            continue
        unread = {d for d in declared if not any(covered(k, {d}) for k in keys)} - set(CONDITIONAL.get(stage, {}))
        assert not unread, f"{name}: dvc.yaml declares keys it never reads"
    template = set(body("soup")["params"])  # one declaration for every soup@ stage: the union of their reads
    assert {d for d in template if not any(covered(k, {d}) for k in soup_reads)} == set()


def changed_stages(repo: Path) -> set[str]:
    return set(json.loads(sh("dvc", "status", "--json", cwd=repo) or "{}"))


def flow_reuses(repo: Path) -> set[str]:
    """The stages the flow would reuse rather than recompute (it reuses pre-training and fine-tunes)."""
    from soup_pipeline.stages import finetune, pretrain

    params = load_params(repo / "params.yaml")
    reused = {"pretrain"} if pretrain.reusable(params, repo) is not None else set()
    return reused | {f"finetune@{k}" for k in params.sweep.members if finetune.up_to_date(params, repo, k)}


@pytest.mark.slow
def test_a_code_edit_reruns_what_runs_that_code_in_dvc_and_in_the_flow_alike(pipeline, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    shutil.copytree(pipeline.repo, repo, symlinks=True)
    trained = {"pretrain", *(f"finetune@{k}" for k in (0, 1, 2))}
    assert changed_stages(repo) == set() and flow_reuses(repo) == trained

    evaluation = repo / "soup_pipeline" / "stages" / "evaluate.py"  # code only the evaluation runs
    evaluation.write_text(evaluation.read_text() + "\n# edited\n")
    assert changed_stages(repo) == {"evaluate"}
    assert flow_reuses(repo) == trained
    before = lock_file(repo)["stages"]
    ran = re.findall(r"^Running stage '([^']+)'", sh("dvc", "repro", cwd=repo), flags=re.MULTILINE)
    assert ran == ["evaluate"]  # DVC reran the evaluation and nothing else
    after = lock_file(repo)["stages"]
    assert {stage: after[stage] for stage in before if stage != "evaluate"} == {  # every other stage's record kept
        stage: entry for stage, entry in before.items() if stage != "evaluate"}
    (recorded,) = [dep["md5"] for dep in after["evaluate"]["deps"] if dep["path"] == "soup_pipeline/stages/evaluate.py"]
    assert recorded == hashlib.md5(evaluation.read_bytes()).hexdigest()  # the evaluation as it ran, the edited code
    assert changed_stages(repo) == set()  # and nothing else was left changed by the rerun
    sh("git", "checkout", "soup_pipeline", cwd=repo)
    sh("dvc", "commit", "--force", "evaluate", cwd=repo)  # the code restored and recorded: the next edit starts clean

    presets = repo / "soup_pipeline" / "training" / "augment.py"  # the augmentation presets: what trains runs them
    presets.write_text(presets.read_text().replace("noise=0.1)", "noise=0.12)"))
    assert changed_stages(repo) == trained  # not prepare nor import: they run no augmentation
    assert flow_reuses(repo) == set()  # the flow recomputes exactly what DVC calls changed
    ran = re.findall(r"^Running stage '([^']+)'", sh("dvc", "repro", cwd=repo), flags=re.MULTILINE)
    assert trained <= set(ran) and "prepare" not in ran  # DVC ran them (and what reads their new sidecars), not prepare
    assert changed_stages(repo) == set()

    # the presets back: DVC and the flow see the trained stages changed
    sh("git", "checkout", "soup_pipeline", cwd=repo)
    assert changed_stages(repo) == trained and flow_reuses(repo) == set()
    before, prepared = output_times(repo), lock_file(repo)["stages"]["prepare"]["outs"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_flow(repo)
    after = output_times(repo)
    rewritten = {stage for stage in before if after[stage] != before[stage]}
    assert trained <= rewritten and "import" in ran and "import" in rewritten  # the flow ran them again, as DVC did
    # (import reads the base); the flow's prepare, run every time, wrote the same bytes
    assert lock_file(repo)["stages"]["prepare"]["outs"] == prepared


def output_times(repo: Path) -> dict[str, list[int]]:
    """Per stage in dvc.lock, the modification times (ns) of every file of its outputs."""
    times = {}
    for stage, entry in lock_file(repo)["stages"].items():
        files = [path for out in entry.get("outs", []) for path in sorted(walk(repo / out["path"]))]
        times[stage] = [path.stat().st_mtime_ns for path in files]
    return times


def walk(path: Path):
    """The file itself, or every file under a folder."""
    return [path] if path.is_file() else [child for child in path.rglob("*") if child.is_file()]
