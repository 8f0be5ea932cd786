"""Tidy results: one CSV of rows and one of per-image outcomes per certified model.

Each model evaluation is a *cell* named by a hash of what defines it, written atomically
(temp file + rename) into ``rows/`` and ``per_image/``, so concurrent or interrupted runs
never leave half-written files and never overwrite each other's cells.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
import subprocess
from importlib.metadata import version
from pathlib import Path

import pandas as pd
import torch

from patchbench.atomic import atomic_path
from patchbench.checkpoint import Checkpoint
from patchbench.data import ImageData
from patchbench.evaluate import Evaluation


class ResultsError(OSError):
    """A results folder is missing, empty or holds a malformed file."""


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def system_info(device: torch.device) -> dict[str, str]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {"device": str(device), "device_name": name or platform.machine(),
            "precision": "fp32", "git_commit": git_commit(),
            "python": platform.python_version(),
            **{f"{p}_version": version(p) for p in ("patchbench", "torch", "timm")}}


def write_cell(results_dir: Path, checkpoint: Checkpoint, data: ImageData, summary: pd.DataFrame,
               evaluation: Evaluation, device: torch.device) -> Path:
    """Add provenance columns to ``summary``, write rows and per-image tables; return rows path."""
    defense = checkpoint.defense
    params = defense.params()
    identity = {"defense": defense.name, "params": params, "dataset": data.name,
                "split": data.split, "n_images": len(data), "checkpoint": checkpoint.sha256,
                "patches": list(summary["patch"].unique()),
                "conditions": list(summary["condition"].unique())}
    cell = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    n = len(data)
    rows = summary.assign(
        cell=cell, defense=defense.name, params=json.dumps(params, sort_keys=True),
        **{f"param_{k}": v for k, v in params.items()},
        dataset=data.name, split=data.split,
        n_parameters=checkpoint.meta.get("n_parameters", defense.num_parameters(checkpoint.model)),
        certify_seconds=evaluation.certify_seconds, forward_seconds=evaluation.forward_seconds,
        images_per_second=n / evaluation.certify_seconds if evaluation.certify_seconds else 0.0,
        seed=checkpoint.meta.get("train", {}).get("train_seed", 0),
        checkpoint_sha256=checkpoint.sha256,
        timestamp=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **system_info(device))
    rows_path = results_dir / "rows" / f"{cell}.csv"
    atomic_write_csv(evaluation.per_image.assign(cell=cell),
                     results_dir / "per_image" / f"{cell}.csv.gz")
    atomic_write_csv(rows, rows_path)
    return rows_path


def atomic_write_csv(frame: pd.DataFrame, path: Path) -> None:
    try:
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False, compression="gzip" if path.suffix == ".gz" else None)
    except OSError as err:
        raise ResultsError(f"cannot write results to {path.parent}: {err.strerror}") from None


def load_results(results_dir: str | Path) -> pd.DataFrame:
    """All rows of a results folder as one DataFrame; a clear error if there are none."""
    folder = Path(results_dir) / "rows"
    if not Path(results_dir).is_dir():
        raise ResultsError(f"results folder {results_dir} does not exist")
    files = sorted(folder.glob("*.csv")) if folder.is_dir() else []
    if not files:
        raise ResultsError(f"results folder {results_dir} holds no result rows")
    frames = []
    for path in files:
        try:
            frames.append(pd.read_csv(path))
        except (OSError, ValueError, pd.errors.ParserError) as err:
            raise ResultsError(f"malformed results file {path}: {err}") from None
    return pd.concat(frames, ignore_index=True)
