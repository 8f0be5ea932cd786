"""Checkpoints: weights plus everything needed to rebuild and trust them.

Saved with ``torch.save`` and loaded with ``weights_only=True`` (no pickled code runs). A
SHA-256 over the metadata and every tensor is stored inside and checked on load, so a file
altered after it was written is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from patchbench.atomic import atomic_path
from patchbench.defense import Defense, UnknownDefenseError, get_defense

FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, altered, or does not match what was asked."""


@dataclass
class Checkpoint:
    defense: Defense
    model: nn.Module
    meta: dict[str, Any]  # dataset, in_shape, classes, train config, metrics
    sha256: str


def content_hash(meta: dict[str, Any], state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(path: str | Path, defense: Defense, model: nn.Module,
                    meta: dict[str, Any]) -> str:
    """Write atomically (temp file + rename); return the content hash."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "defense": defense.name, "params": defense.params(), **meta}
    meta = json.loads(json.dumps(meta))  # plain JSON types only, as the hash sees them
    sha = content_hash(meta, state)
    try:
        with atomic_path(path) as tmp:
            torch.save({"meta": meta, "state_dict": state, "sha256": sha}, tmp)
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoint {path}: {err.strerror}") from None
    return sha


def load_checkpoint(path: str | Path, defense: str | None = None, dataset: str | None = None,
                    map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load, verify the hash, rebuild the defense and its model (eval mode)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
        meta, state, sha = payload["meta"], payload["state_dict"], payload["sha256"]
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated "
                              f"({type(err).__name__})") from None
    if content_hash(meta, state) != sha:
        raise CheckpointError(f"checkpoint {path} was altered after it was written "
                              "(content hash mismatch)")
    if defense is not None and meta.get("defense") != defense:
        raise CheckpointError(f"checkpoint {path} is for defense {meta.get('defense')!r}, "
                              f"not {defense!r}")
    if dataset is not None and meta.get("dataset") != dataset:
        raise CheckpointError(f"checkpoint {path} is for dataset {meta.get('dataset')!r}, "
                              f"not {dataset!r}")
    try:
        rebuilt = get_defense(meta["defense"]).from_params(meta["params"])
    except (UnknownDefenseError, ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None
    model = rebuilt.build_model(tuple(meta["in_shape"]), len(meta["classes"]))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v
                           for k, v in state.items()})
    model.eval()
    return Checkpoint(rebuilt, model, meta, sha)
