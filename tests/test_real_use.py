"""The real-use path where it succeeds: `model.pretrained: openai` resolved offline from a Hugging Face cache laid out
the way `hf_hub_download` leaves it, the zero-shot head built, two fine-tunes of that architecture and one soup stage
on an image folder (seeded random weights stand in for OpenAI's: nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from soup_pipeline.config import Params
from soup_pipeline.core.models import load_clip
from soup_pipeline.stages import finetune, pretrain, soup

pytestmark = pytest.mark.slow

ARCH = "ViT-B-32-quickgelu"  # the architecture OpenAI's weights were trained with
REPO = "models--timm--vit_base_patch32_clip_224.openai"  # open_clip's hf-hub id of ViT-B-32 / openai
WEIGHTS = "open_clip_model.safetensors"  # the safetensors name open_clip looks for first


def hf_cache(folder, state: dict[str, torch.Tensor]) -> None:
    """`folder` as a Hugging Face cache holding `state` as ViT-B-32 / openai: refs/main -> snapshots/<commit>/."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = folder / REPO / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (folder / REPO / "refs").mkdir()
    (folder / REPO / "refs" / "main").write_text(commit)
    save_file({key: value.contiguous() for key, value in state.items()}, str(snapshot / WEIGHTS))


def image_folder(root) -> None:
    """train / heldout / test folders of two classes, four small images each (the model's transform resizes them)."""
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "heldout", "test"):
        for index, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True)
            for i in range(4):
                pixels = (torch.rand(32, 32, 3, generator=generator) * 80 + 150 * index).byte().numpy()
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def test_openai_tag_from_a_local_cache_fine_tunes_and_soups(tmp_path):
    torch.manual_seed(0)
    reference = load_clip(ARCH).model.state_dict()
    hf_cache(tmp_path / "hf", reference)
    image_folder(tmp_path / "images")
    params = Params.model_validate({
        "model": {"arch": ARCH, "pretrained": "openai", "cache_dir": str(tmp_path / "hf")},
        "data": {"source": "image_folder", "root": str(tmp_path / "images"), "image_size": 224},
        "sweep": {"members": [0, 1], "epochs_range": [1, 1], "batch_size": 4, "device": "cpu"},
        "soup": {"batch_size": 4, "device": "cpu", "methods": {"mehl_soup_plus": {"passes": 1.0, "model_batch": 2}}},
        "evaluate": {"batch_size": 8},
        "tracking": {"register_method": "mehl_soup_plus"},
        "pretrain": {"device": "cpu"},
    })
    root = tmp_path / "run"

    loaded = load_clip(ARCH, "openai", cache_dir=str(tmp_path / "hf")).model.state_dict()
    assert all(torch.equal(loaded[key], reference[key]) for key in reference)  # the cached weights, not random ones
    info = pretrain.run(params, root)
    assert info["base"] == f"{ARCH}/openai" and info["chance_acc"] == 0.5
    assert set(info["zero_shot"]) == {"fit_acc", "select_acc", "test_acc"}
    ingredients = [finetune.run(params, root, member) for member in (0, 1)]
    assert all(i.meta["base_model"] == f"{ARCH}/openai" and 0 <= i.fit_acc <= 1 for i in ingredients)
    result = soup.run(params, root, "mehl_soup_plus")
    assert result.beta.shape[0] == 2 and torch.allclose(result.beta.sum(0), torch.ones(result.beta.shape[1],
                                                                                        dtype=result.beta.dtype))
    assert (result.beta - 0.5).abs().max() > 1e-3  # learned on the fit images: moved away from the uniform soup
    assert result.info["coefficients"].abs().max() > 1e-3
    assert (root / "runs" / "soups" / "mehl_soup_plus" / "soup.safetensors").is_file()
