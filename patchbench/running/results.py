"""Tidy results: one CSV of rows and one of per-image outcomes per certified model.

Each model evaluation is a *cell* named by a hash of what defines it (``cell_id``), written
atomically (temp file + rename) into ``rows/`` and ``per_image/``, so concurrent or
interrupted runs never leave half-written files and never overwrite each other's cells. A
cell that failed leaves ``failed/<cell>.json`` instead.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from patchbench.defense import defense_code
from patchbench.running.atomic import atomic_path
from patchbench.running.checkpoint import Checkpoint
from patchbench.running.data import ImageData
from patchbench.running.evaluate import Evaluation
from patchbench.running.hashing import config_hash
from patchbench.running.train import trained_recipe


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


def cell_id(identity: dict[str, Any]) -> str:
    """A cell's file name: a hash of what defines it, known before any model is loaded."""
    return config_hash(identity)


def rows_path(results_dir: Path, cell: str) -> Path:
    return results_dir / "rows" / f"{cell}.csv"


def is_finished(results_dir: Path, cell: str) -> bool:
    """The rows file is written last, so its presence means the whole cell is on disk."""
    return rows_path(results_dir, cell).is_file()


def prepare(results_dir: Path) -> None:
    """Create the folders up front: an unwritable folder fails before any model is trained."""
    try:
        for sub in ("rows", "per_image", "failed"):
            (results_dir / sub).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ResultsError(f"cannot create results folder {results_dir}: {err.strerror}") from None


def write_cell(results_dir: Path, cell: str, checkpoint: Checkpoint, data: ImageData,
               summary: pd.DataFrame, evaluation: Evaluation, device: torch.device,
               precision: str = "fp32") -> Path:
    """Add provenance columns to ``summary``, write per-image then rows; return rows path.

    Each file is replaced atomically, so a re-run (``--force``) or a concurrent run of the
    same cell leaves one copy, never a duplicate or a half file.
    """
    train = checkpoint.meta.get("train", {})
    n = len(data)
    rows = summary.assign(
        **model_columns(cell, checkpoint, data),
        certify_seconds=evaluation.certify_seconds, forward_seconds=evaluation.forward_seconds,
        images_per_second=n / evaluation.certify_seconds if evaluation.certify_seconds else 0.0,
        train_config=json.dumps(trained_recipe(train), sort_keys=True),
        **provenance_columns(device, precision))
    atomic_write_csv(evaluation.per_image.assign(cell=cell), per_image_path(results_dir, cell))
    path = rows_path(results_dir, cell)
    atomic_write_csv(rows, path)
    failure_path(results_dir, cell).unlink(missing_ok=True)
    return path


def model_columns(cell: str, checkpoint: Checkpoint, data: ImageData) -> dict[str, object]:
    """What every row of a cell (certification or attack) says of its model and data."""
    defense, params = checkpoint.defense, checkpoint.defense.params()
    return {"cell": cell, "defense": defense.name,
            "params": json.dumps(params, sort_keys=True),
            **{f"param_{k}": v for k, v in params.items()},
            "dataset": data.name, "split": data.split,
            "n_parameters": checkpoint.meta.get("n_parameters",
                                                defense.num_parameters(checkpoint.model)),
            "seed": checkpoint.meta.get("train", {}).get("train_seed", 0),
            # how the model was trained; ``precision`` (provenance_columns) is how it certified
            "train_precision": checkpoint.meta.get("train", {}).get("train_precision", "fp32"),
            "checkpoint_sha256": checkpoint.sha256, **defense_code(type(defense))}


def provenance_columns(device: torch.device, precision: str = "fp32") -> dict[str, str]:
    """When, where and with what a row was computed (``precision``: of the certification,
    the votes' arithmetic; the training's is ``train_precision``)."""
    return {"timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            **system_info(device), "precision": precision}


def failure_path(results_dir: Path, cell: str) -> Path:
    return results_dir / "failed" / f"{cell}.json"


def write_failure(results_dir: Path, cell: str, identity: dict[str, Any], reason: str,
                  detail: str) -> Path:
    """Record why a cell failed (its last attempt); a later success removes the record."""
    path = failure_path(results_dir, cell)
    record = {"cell": cell, "identity": identity, "reason": reason, "traceback": detail,
              "host": platform.node(),
              "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    except OSError as err:
        raise ResultsError(f"cannot write results to {path.parent}: {err.strerror}") from None
    return path


def atomic_write_csv(frame: pd.DataFrame, path: Path) -> None:
    try:
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False, compression="gzip" if path.suffix == ".gz" else None)
    except OSError as err:
        raise ResultsError(f"cannot write results to {path.parent}: {err.strerror}") from None


def read_rows(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except OSError as err:  # a folder, a dangling link, no permission
        raise ResultsError(f"cannot read results file {path}: {err.strerror or err}") from None
    except (ValueError, pd.errors.ParserError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ResultsError(f"malformed results file {path}: {message}") from None


def load_results(results_dir: str | Path) -> pd.DataFrame:
    """All rows of a results folder as one DataFrame; a clear error if there are none.

    The folder mixes kinds of rows, told apart by ``metric_of``: certification rows
    (``patchbench run``), empirical attack rows (``patchbench attack``) and benchmark rows.
    """
    folder = Path(results_dir) / "rows"
    if not Path(results_dir).is_dir():
        raise ResultsError(f"results folder {results_dir} does not exist")
    files = sorted(folder.glob("*.csv")) if folder.is_dir() else []
    if not files:
        raise ResultsError(f"results folder {results_dir} holds no result rows")
    return pd.concat([read_rows(path) for path in files], ignore_index=True)


CERTIFIED, EMPIRICAL = "certified", "empirical"  # the ``metric`` of run and attack rows


def metric_of(rows: pd.DataFrame) -> pd.Series:
    """Each row's kind: ``CERTIFIED`` for certification rows (also those of older runs,
    which have no ``metric``), ``EMPIRICAL`` for attack rows, else the metric a benchmark
    row measures."""
    if "metric" not in rows:
        return pd.Series(CERTIFIED, index=rows.index)
    return rows["metric"].astype(object).where(rows["metric"].notna(), CERTIFIED).astype(str)


def per_image_path(results_dir: Path, cell: str) -> Path:
    """The per-image outcomes of a cell (run or attack) beside its rows."""
    return results_dir / "per_image" / f"{cell}.csv.gz"


def load_failures(results_dir: str | Path) -> pd.DataFrame:
    """The failed cells of a results folder that have no rows (cell, reason, identity...)."""
    folder = Path(results_dir) / "failed"
    records = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ResultsError(f"malformed failure record {path}: {err}") from None
        if not is_finished(Path(results_dir), record["cell"]):
            records.append(record)
    return pd.DataFrame(records, columns=["cell", "identity", "reason", "traceback", "host",
                                          "timestamp"])
