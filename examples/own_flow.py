"""A team's own Prefect flow: it fine-tunes with its own code, then calls soup-pipeline's souping subflow.

    python examples/own_flow.py OUT_DIR      # MLFLOW_TRACKING_URI and PREFECT_API_URL as your stack sets them
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from prefect import flow, task
from safetensors.torch import save_file

from soup_pipeline.config import DataParams
from soup_pipeline.core.data import digits_splits
from soup_pipeline.core.models import classifier_spec
from soup_pipeline.core.portable_classifier import classifier_from_spec
from soup_pipeline.prefect import soup_subflow

ARCH, CLASSES = "soup-tiny-vit", 10


def pretrained_model() -> torch.nn.Module:
    """The weights every fine-tune starts from, as a sweep's members do (here a seeded init)."""
    torch.manual_seed(0)
    return classifier_from_spec(classifier_spec(ARCH, CLASSES))


@task
def my_finetune(lr: float, train, out: Path) -> str:
    """The team's own training code: any loop that ends in a state dict of the classifier."""
    model = pretrained_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    images, labels = train.tensors
    for step in range(30):
        batch = torch.randint(0, len(labels), (32,), generator=torch.Generator().manual_seed(step))
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_file(model.state_dict(), out)
    return str(out)


@flow(name="my-sweep")
def my_sweep(out_dir: str) -> dict:
    splits = digits_splits(DataParams(pretrain_size=10, train_size=64, heldout_size=60, test_size=60, heldout_views=1))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(pretrained_model().state_dict(), out / "pretrained.safetensors")  # what the merge methods start from
    checkpoints = [my_finetune(lr, splits.train, out / f"lr-{lr}.safetensors") for lr in (3e-4, 1e-3, 2e-3)]
    return soup_subflow(checkpoints, arch=ARCH, num_classes=CLASSES, fit=splits.fit, select=splits.select,
                        test=splits.test,
                        methods={"uniform": {}, "greedy": {}, "mehl_soup": {"passes": 1.0}, "ties": {}},
                        register="mehl_soup", registered_model="my-team-soup", workdir=str(out / "soup"),
                        pretrained=str(out / "pretrained.safetensors"))


if __name__ == "__main__":
    print(json.dumps(my_sweep(sys.argv[1]), default=str))
