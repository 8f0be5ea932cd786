"""The committed vote-map results re-certify byte-identically through today's interface: the
shipped checkpoint of a cell, certified again at the cell's parameters and precision, gives the
same per-image CSV lines (prediction, votes, margins) as the committed table."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest

from patchbench.defense import get_defense
from patchbench.patches import parse_patches
from patchbench.running.checkpoint import load_checkpoint
from patchbench.running.data import load_dataset
from patchbench.running.evaluate import certify_split

ROOT = Path(__file__).resolve().parent.parent
N_IMAGES = 64
CELLS = ["05fd8a5119d8ac80",  # BagCert rf 7, fp32 (the first study's headline)
         "02f04f1adf0d4d71",  # row smoothing s 6, θ 0.3
         "0f0147906104a773"]  # column smoothing


def shipped_checkpoint(sha256: str) -> Path:
    for path in sorted((ROOT / "checkpoints").glob("*.pt")):
        if load_checkpoint(path).sha256 == sha256:
            return path
    raise LookupError(f"no shipped checkpoint with sha256 {sha256}")


def csv_text(frame: pd.DataFrame) -> str:
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    return buffer.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("cell", CELLS)
def test_committed_cell_recertifies_byte_identically(cell):
    try:
        data = load_dataset("fashion-mnist", "test")
    except Exception as err:  # the dataset is installed by scripts/install.sh
        pytest.skip(f"Fashion-MNIST not installed: {err}")
    row = pd.read_csv(ROOT / "results" / "rows" / f"{cell}.csv").iloc[0]
    committed = pd.read_csv(ROOT / "results" / "per_image" / f"{cell}.csv.gz",
                            nrows=N_IMAGES).drop(columns="cell")
    patches = parse_patches(list(dict.fromkeys(pd.read_csv(
        ROOT / "results" / "rows" / f"{cell}.csv")["patch"])))
    conditions = list(dict.fromkeys(pd.read_csv(
        ROOT / "results" / "rows" / f"{cell}.csv")["condition"]))
    defense = get_defense(row["defense"]).from_params(json.loads(row["params"]))
    loaded = load_checkpoint(shipped_checkpoint(row["checkpoint_sha256"]))
    evaluation = certify_split(defense, loaded.model, data.subset(N_IMAGES), patches,
                               conditions, batch_size=32, show_progress=False,
                               precision=row["precision"])
    assert list(evaluation.per_image.columns) == list(committed.columns)
    assert csv_text(evaluation.per_image) == csv_text(committed)
