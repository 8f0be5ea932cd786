"""Where checkpoints live: a model configuration's hash names its file.

Lookup order: the repository's shipped ``checkpoints/`` folder (trained study models), then
the user cache (``$PATCHBENCH_CACHE`` or ``~/.cache/patchbench``), where new training lands.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from patchbench.defense import Defense
from patchbench.train import TrainConfig

SHIPPED = Path(__file__).resolve().parent.parent / "checkpoints"


def cache_dir() -> Path:
    return Path(os.environ.get("PATCHBENCH_CACHE", Path.home() / ".cache" / "patchbench"))


def model_key(defense: Defense, dataset: str, train_config: TrainConfig) -> str:
    """A stable name for (defense, parameters, dataset, training recipe)."""
    blob = json.dumps({"defense": defense.name, "params": defense.params(), "dataset": dataset,
                       "train": asdict(train_config)}, sort_keys=True)
    return f"{dataset}-{defense.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def find_checkpoint(key: str) -> Path | None:
    for folder in (SHIPPED, cache_dir() / "checkpoints"):
        path = folder / f"{key}.pt"
        if path.is_file():
            return path
    return None


def new_checkpoint_path(key: str) -> Path:
    return cache_dir() / "checkpoints" / f"{key}.pt"
