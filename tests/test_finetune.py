"""pretrain.py, finetune.py, sweep.py: a short pre-training, deterministic fine-tunes, the seeded sweep."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from soup_pipeline.core.ingredients import IngredientStore, file_sha256
from soup_pipeline.core.models import TINY_ARCH, classifier_from_clip, load_clip, model_config, zero_shot_head
from soup_pipeline.core.portable_classifier import classifier_from_spec
from soup_pipeline.core.settings import FinetuneParams, ModelParams, SweepParams
from soup_pipeline.evaluation.scoring import loss_and_accuracy
from soup_pipeline.runtime.errors import SoupError
from soup_pipeline.training.finetune import finetune
from soup_pipeline.training.sweep import ingredient_path, sample_hparams

ONE_EPOCH = FinetuneParams(epochs=1, lr=1e-4, augmentation="strong", label_smoothing=0.1, seed=7).model_dump()


def test_pretraining_lowers_the_loss_and_beats_chance(pretrained_base, tiny_splits):
    path, losses = pretrained_base
    assert losses[-1] < losses[0] - 0.1
    clip = load_clip(TINY_ARCH, path)
    head = zero_shot_head(clip.model, clip.tokenizer, tiny_splits.classnames, tiny_splits.templates)
    accuracy = loss_and_accuracy(classifier_from_clip(clip.model, head), tiny_splits.test, 256, torch.device("cpu"))[1]
    assert accuracy > 0.3  # chance is 0.1


def test_same_seed_gives_identical_bytes(pretrained_base, tiny_splits, tmp_path):
    base, _ = pretrained_base
    first = finetune(base, ONE_EPOCH, tiny_splits, tmp_path / "a.safetensors", member=0, device="cpu")
    again = finetune(base, ONE_EPOCH, tiny_splits, tmp_path / "b.safetensors", member=0, device="cpu")
    other = finetune(base, {**ONE_EPOCH, "seed": 8}, tiny_splits, tmp_path / "c.safetensors", member=0, device="cpu")
    assert first.meta["sha256"] == again.meta["sha256"] == file_sha256(again.path)
    assert other.meta["sha256"] != first.meta["sha256"]


def test_ingredient_matches_classifier_from_spec(pretrained_base, tiny_splits, tmp_path):
    base, _ = pretrained_base
    ingredient = finetune(base, ONE_EPOCH, tiny_splits, tmp_path / "m.safetensors", member=3, device="cpu")
    meta = ingredient.meta
    assert (meta["member"] == 3 and meta["hparams"] == ONE_EPOCH and 0.0 <= meta["fit_acc"] <= 1.0
            and 0.0 <= meta["select_acc"] <= 1.0)
    assert meta["base_model"].startswith(f"{TINY_ARCH}@sha256:")
    state = load_file(ingredient.path)
    empty = classifier_from_spec(meta["classifier_spec"]).state_dict()
    assert {k: (v.shape, v.dtype) for k, v in state.items()} == {k: (v.shape, v.dtype) for k, v in empty.items()}
    assert not any(key.startswith(("transformer.", "token_embedding")) for key in state)


def test_bad_hparams_key_is_named(pretrained_base, tiny_splits, tmp_path):
    base, _ = pretrained_base
    with pytest.raises(SoupError, match="learning_rate"):
        finetune(base, {**ONE_EPOCH, "learning_rate": 1.0}, tiny_splits, tmp_path / "x.safetensors", member=0)


def test_sample_hparams_is_seeded_per_member():
    small, large = SweepParams(members=3), SweepParams(members=20)
    draws = [sample_hparams(large, k) for k in range(20)]
    assert [sample_hparams(small, k) for k in range(3)] == draws[:3]
    assert len({d["seed"] for d in draws}) == 20 and len({d["augmentation"] for d in draws}) == 3
    for d in draws:
        FinetuneParams(**d)
        assert math.log(3e-5) <= math.log(d["lr"]) <= math.log(1e-3) and 10 <= d["epochs"] <= 30
    assert sample_hparams(SweepParams(seed=1), 0) != draws[0]


def test_sweep_members_form_one_store(pretrained_base, tiny_splits, tmp_path):
    base, _ = pretrained_base
    params = SweepParams(members=2, epochs_range=(1, 1))
    ingredients = [finetune(base, sample_hparams(params, k), tiny_splits, ingredient_path(tmp_path, k), member=k,
                            device="cpu") for k in params.members]
    assert [i.meta["member"] for i in ingredients] == [0, 1]
    assert len({i.meta["base_model"] for i in ingredients}) == 1
    assert len(IngredientStore(ingredients)) == 2


ALONE = """
import json, sys
import open_clip
from helpers_clip import TINY_DATA
from soup_pipeline.core.data import digits_splits
from soup_pipeline.core.settings import ModelParams
from soup_pipeline.training.finetune import finetune
config, base, hparams, out, arch = sys.argv[1:]
open_clip.add_model_config(config)
finetune(base, json.loads(hparams), digits_splits(TINY_DATA), out, member=0, model_params=ModelParams(arch=arch),
         device="cpu")
"""


@contextlib.contextmanager
def open_clip_registry_kept():
    """What open_clip.add_model_config registers inside the block is gone after it: open_clip's registry is module
    state (the config folders it scans and the configs it found), so left alone a config one test adds is seen by every
    later test of the session."""
    factory = open_clip.factory
    paths, configs = list(factory._MODEL_CONFIG_PATHS), dict(factory._MODEL_CONFIGS)  # copies: a rescan mutates them
    try:
        yield
    finally:
        factory._MODEL_CONFIG_PATHS[:] = paths
        factory._MODEL_CONFIGS = configs


@pytest.fixture
def add_model_config():
    """open_clip.add_model_config for this test only."""
    with open_clip_registry_kept():
        yield open_clip.add_model_config


def test_a_model_config_added_for_one_test_is_gone_after_it(tmp_path):
    name = "soup-tiny-scoped-test"
    (tmp_path / f"{name}.json").write_text(json.dumps(model_config(TINY_ARCH)))
    before = open_clip.list_models()
    with open_clip_registry_kept():
        open_clip.add_model_config(tmp_path / f"{name}.json")
        assert name in open_clip.list_models()
    assert open_clip.list_models() == before
    open_clip.factory._rescan_model_configs()  # and its file is no longer scanned: a later registration misses it
    assert open_clip.list_models() == before and open_clip.get_model_config(name) is None


def test_fine_tunes_with_dropout_in_threads_equal_each_run_alone_in_a_process(pretrained_base, tiny_splits, tmp_path,
                                                                            add_model_config):
    """Patch dropout draws from torch's global generator: threads must not share its state."""
    arch = "soup-tiny-dropout-test"
    config = model_config(TINY_ARCH)
    config["vision_cfg"]["patch_dropout"] = 0.5
    config_path = tmp_path / f"{arch}.json"
    config_path.write_text(json.dumps(config))
    add_model_config(config_path)  # for this test only: the next tests do not see the dropout architecture
    base, _ = pretrained_base
    members = [{**ONE_EPOCH, "epochs": 2, "seed": seed} for seed in (7, 8)]
    with concurrent.futures.ThreadPoolExecutor(len(members)) as pool:
        threaded = list(pool.map(lambda k: finetune(base, members[k], tiny_splits, tmp_path / f"thread-{k}.safetensors",
                                                    member=0, model_params=ModelParams(arch=arch), device="cpu"),
                                    range(len(members))))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    for k, hparams in enumerate(members):
        out = tmp_path / f"alone-{k}.safetensors"
        subprocess.run([sys.executable, "-c", ALONE, str(config_path), str(base), json.dumps(hparams), str(out), arch],
                       env=env, check=True, timeout=300)
        assert file_sha256(out) == threaded[k].meta["sha256"], f"member with seed {hparams['seed']}"
    assert threaded[0].meta["sha256"] != threaded[1].meta["sha256"]
