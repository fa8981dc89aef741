"""Where every stage reads and writes, under one pipeline root."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import Params
from ..training.sweep import ingredient_path


@dataclass(frozen=True)
class StagePaths:
    """The pipeline's files under `root/runs/`."""

    root: Path

    @property
    def runs(self) -> Path:
        return Path(self.root) / "runs"

    @property
    def data_manifest(self) -> Path:
        return self.runs / "data" / "manifest.json"

    @property
    def base_dir(self) -> Path:
        return self.runs / "base"

    @property
    def base_weights(self) -> Path:
        return self.base_dir / "clip.safetensors"

    @property
    def zero_shot_weights(self) -> Path:
        """The base's zero-shot classifier: theta_0, the anchor of the merge methods."""
        return self.base_dir / "zero_shot.safetensors"

    @property
    def base_info(self) -> Path:
        return self.base_dir / "base.json"

    @property
    def ingredients_dir(self) -> Path:
        return self.runs / "ingredients"

    def ingredient(self, member: int) -> Path:
        return ingredient_path(self.ingredients_dir, member)

    @property
    def imported_dir(self) -> Path:
        """The `import` stage's output: imported checkpoints as ingredients, beside (never over) the fine-tunes."""
        return self.runs / "imported"

    def imported(self, member: int) -> Path:
        return ingredient_path(self.imported_dir, member)

    def imported_ingredients(self) -> list[Path]:
        """The imported ingredients, by member id."""
        found = self.imported_dir.glob("member-*.safetensors") if self.imported_dir.is_dir() else []
        return sorted(found, key=lambda path: int(path.name.split("-")[1].split(".")[0]))

    def soup_dir(self, method: str) -> Path:
        return self.runs / "soups" / method

    @property
    def eval_dir(self) -> Path:
        return self.runs / "eval"

    @property
    def ablation_dir(self) -> Path:
        return self.runs / "ablation"

    @property
    def costs_dir(self) -> Path:
        """Seconds and peak memory: varying from run to run, so outside every DVC output (DVC hashes results only)."""
        return self.runs / "costs"

    def soup_cost(self, method: str) -> Path:
        return self.costs_dir / f"soup-{method}.json"


def base_reference(params: Params, paths: StagePaths) -> str:
    """What every fine-tune starts from: the configured pretrained weights, or the pipeline's own pre-training."""
    return params.model.pretrained or str(paths.base_weights)
