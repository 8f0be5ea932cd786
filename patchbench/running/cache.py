"""Where checkpoints live: a model configuration's hash names its file.

Lookup order: the repository's shipped ``checkpoints/`` folder (trained study models), then
the user cache (``$PATCHBENCH_CACHE`` or ``~/.cache/patchbench``), where new training lands.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from patchbench.defense import Defense
from patchbench.running.hashing import config_hash
from patchbench.running.train import TrainConfig

DEFAULT_RECIPE = TrainConfig()
# Recipe fields that existed when the first checkpoints were named: always in the key.
LEGACY_RECIPE_FIELDS = ("epochs", "batch_size", "seed", "crop_padding", "hflip", "schedule",
                        "max_images")
SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints"


def cache_dir() -> Path:
    return Path(os.environ.get("PATCHBENCH_CACHE", Path.home() / ".cache" / "patchbench"))


def model_key(defense: Defense, dataset: str, train_config: TrainConfig) -> str:
    """A stable name for what determines the trained weights: defense, training parameters,
    dataset and recipe. Certification-only parameters (``Defense.certify_params``) are left
    out, so sweeping them reuses one model; so are recipe fields at their defaults, so adding
    a field to ``TrainConfig`` does not rename every existing checkpoint."""
    params = {k: v for k, v in defense.params().items() if k not in defense.certify_params}
    recipe = {k: v for k, v in asdict(train_config).items()
              if k in LEGACY_RECIPE_FIELDS or v != getattr(DEFAULT_RECIPE, k)}
    digest = config_hash({"defense": defense.name, "params": params, "dataset": dataset,
                          "train": recipe}, 12)
    return f"{dataset}-{defense.name}-{digest}"


def find_checkpoint(key: str) -> Path | None:
    for folder in (SHIPPED, cache_dir() / "checkpoints"):
        path = folder / f"{key}.pt"
        if path.is_file():
            return path
    return None


def new_checkpoint_path(key: str) -> Path:
    return cache_dir() / "checkpoints" / f"{key}.pt"
