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

from patchbench.defense import Defense, UnknownDefenseError, defense_code, get_defense
from patchbench.running.atomic import atomic_path

FORMAT = 1
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format: a zip archive


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, altered, or does not match what was asked."""


@dataclass
class Checkpoint:
    defense: Defense
    model: nn.Module
    meta: dict[str, Any]  # dataset, in_shape, classes, train config, metrics
    sha256: str
    path: Path | None = None  # the file it was loaded from


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
    meta = {"format": FORMAT, "defense": defense.name, "params": defense.params(),
            "code": defense_code(type(defense)), **meta}
    meta = json.loads(json.dumps(meta))  # plain JSON types only, as the hash sees them
    sha = content_hash(meta, state)
    try:
        with atomic_path(path) as tmp:
            torch.save({"meta": meta, "state_dict": state, "sha256": sha}, tmp)
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoint {path}: {err.strerror}") from None
    return sha


def _read(path: Path, map_location: str | torch.device = "cpu"
          ) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """(meta, state dict, stored hash) of a checkpoint file, unverified."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a checkpoint file: it is "
                              + ("a folder" if path.is_dir() else "not a regular file"))
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(ZIP_MAGIC))
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror}") from None
    if not head:
        raise CheckpointError(f"{path} is not a checkpoint file: it is empty")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        if head != ZIP_MAGIC:  # not even the container torch.save writes
            raise CheckpointError(f"{path} is not a checkpoint file") from None
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated "
                              f"({type(err).__name__})") from None
    if not (isinstance(payload, dict) and {"meta", "state_dict", "sha256"} <= set(payload)
            and isinstance(payload["meta"], dict)):
        raise CheckpointError(f"{path} is not a checkpoint file: torch.save data, but not "
                              "written by patchbench (no meta, state_dict and sha256)")
    return payload["meta"], payload["state_dict"], payload["sha256"]


def read_header(path: str | Path) -> tuple[dict[str, Any], str]:
    """(metadata, stored content hash) of a checkpoint, without rebuilding its model; the hash
    is checked against the content when it is loaded (``load_checkpoint``)."""
    path = Path(path)
    meta, _, sha = _read(path)
    if not isinstance(meta.get("defense"), str):
        raise CheckpointError(f"checkpoint {path} names no defense")
    return meta, str(sha)


def checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of a checkpoint (defense, params, dataset, ...): ``read_header``'s."""
    return read_header(path)[0]


def load_checkpoint(path: str | Path, defense: str | None = None, dataset: str | None = None,
                    map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load, verify the hash, rebuild the defense and its model (eval mode)."""
    path = Path(path)
    meta, state, sha = _read(path, map_location)
    try:
        altered = content_hash(meta, state) != sha
    except Exception:  # not JSON, or not tensors: not as written
        altered = True
    if altered:
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
    return Checkpoint(rebuilt, model, meta, sha, path)


def parameter_clash(loaded: Checkpoint, given: dict[str, Any]) -> str | None:
    """Why ``given`` parameters cannot read these weights ("checkpoint F was trained with
    rf=5, not rf=7"), or None: every parameter but the certification-only ones (a threshold)
    must be the trained value."""
    trained = loaded.defense.params()
    clash = {k: v for k, v in given.items()
             if k not in loaded.defense.certify_params and trained.get(k) != v}
    if not clash:
        return None
    return (f"checkpoint {loaded.path} was trained with "
            f"{', '.join(f'{k}={trained.get(k)}' for k in clash)}, not "
            f"{', '.join(f'{k}={v}' for k, v in clash.items())}")
