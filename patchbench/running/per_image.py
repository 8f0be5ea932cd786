"""The per-image table: one row per certified image, the columns every family writes.

``index``, ``label``; the defended prediction as ``prediction`` where it is the same for every
patch shape (vote maps) or ``prediction_<patch>`` per shape (masking); ``votes_<c>`` per class
for a vote-map defense; per shape and condition ``margin_<cond>_<patch>`` where the condition
has a margin (certified iff >= 0), else ``certified_<cond>_<patch>`` (0/1). Readers go through
the functions below, never through the column names.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from torch import Tensor

from patchbench.certify import Certificate
from patchbench.patches import PatchShape


def batch_columns(offset: int, labels: Tensor, cert: Certificate,
                  patches: Sequence[PatchShape]) -> dict[str, np.ndarray | range]:
    """The table's columns for one batch of images (``offset`` = index of its first image):
    what ``run`` writes and what ``attack`` adds its own columns to."""
    return {"index": range(offset, offset + len(labels)), "label": labels.cpu().numpy(),
            **certificate_columns(cert, patches)}


def certificate_columns(cert: Certificate, patches: Sequence[PatchShape]) -> dict[str, np.ndarray]:
    """The columns of a batch's certificate, in the table's order (after index and label)."""
    frame: dict[str, np.ndarray] = {}
    if cert.per_shape:
        prediction = cert.prediction.cpu().numpy()
        for s, patch in enumerate(patches):
            frame[f"prediction_{patch}"] = prediction[:, s]
    else:
        frame["prediction"] = cert.prediction.cpu().numpy()
    if cert.counts is not None:
        counts = cert.counts.cpu().numpy()
        for c in range(counts.shape[1]):
            frame[f"votes_{c}"] = counts[:, c]
    for cond, flags in cert.certified.items():
        values = (cert.margin[cond] if cond in cert.margin else flags.to(int)).cpu().numpy()
        kind = "margin" if cond in cert.margin else "certified"
        for s, patch in enumerate(patches):
            frame[f"{kind}_{cond}_{patch}"] = values[:, s]
    return frame


def prediction(table: pd.DataFrame, patch: PatchShape | str) -> pd.Series:
    """The defended prediction of every image for ``patch``."""
    column = f"prediction_{patch}"
    return table[column] if column in table else table["prediction"]


def correct(table: pd.DataFrame, patch: PatchShape | str) -> pd.Series:
    """Whether the defended prediction for ``patch`` is the label."""
    return prediction(table, patch) == table["label"]


def has_condition(table: pd.DataFrame, cond: str, patch: PatchShape | str) -> bool:
    return f"margin_{cond}_{patch}" in table or f"certified_{cond}_{patch}" in table


def certified(table: pd.DataFrame, cond: str, patch: PatchShape | str) -> pd.Series:
    """Whether each image is certified for ``patch`` under ``cond`` (correct or not)."""
    margin = f"margin_{cond}_{patch}"
    if margin in table:
        return table[margin] >= 0
    return table[f"certified_{cond}_{patch}"].astype(bool)


def conditions(table: pd.DataFrame, patch: PatchShape | str) -> list[str]:
    """The conditions the table holds for ``patch``, in column order."""
    suffix = f"_{patch}"
    found = [column[len(kind):-len(suffix)] for column in table.columns
             for kind in ("margin_", "certified_")
             if column.startswith(kind) and column.endswith(suffix)]
    return list(dict.fromkeys(found))
