"""Shared tiny settings for the model / data / fine-tune tests: small digits splits and a briefly pre-trained base."""

from __future__ import annotations

import pytest

from soup_pipeline.core.data import digits_splits
from soup_pipeline.core.settings import DataParams, PretrainParams
from soup_pipeline.training.pretrain import pretrain

# clean digits: learnable in 1 epoch
TINY_DATA = DataParams(pretrain_size=500, train_size=64, heldout_size=200, test_size=200, heldout_views=1,
                      target_rotation=0, target_scale=(1.0, 1.0), target_offset=0, target_noise=0)
TINY_PRETRAIN = PretrainParams(epochs=5, batch_size=16, lr=5e-4, augmentation="none", device="cpu")


@pytest.fixture(scope="session")
def tiny_splits():
    return digits_splits(TINY_DATA)


@pytest.fixture(scope="session")
def pretrained_base(tiny_splits, tmp_path_factory):
    """(path of a CLIP pre-trained for a few epochs, its per-epoch losses)."""
    losses = []
    path = pretrain(TINY_PRETRAIN, tiny_splits, tmp_path_factory.mktemp("base") / "base.safetensors",
                    on_epoch=lambda epoch, loss: losses.append(loss))
    return path, losses
