"""An independent, slow certificate: enumerate every vote assignment inside every footprint.

It shares nothing with patchbench.certify but the problem statement: for each footprint (an
explicit set of cells), the attacker replaces the votes of those cells by any vote vectors
(multi-hot: any subset of classes; one-hot: exactly one class), and the image is certified iff
the prediction (argmax of counts, ties to the smallest index) never changes.
"""

from __future__ import annotations

import itertools

import numpy as np


def predict(counts: np.ndarray) -> np.ndarray:
    """Argmax over the last axis with ties going to the smallest index."""
    return np.argmax(counts, axis=-1)  # numpy returns the first maximum


def attacker_sums(n_cells: int, n_classes: int, one_hot: bool) -> np.ndarray:
    """All vote-count vectors that ``n_cells`` attacker-controlled cells can add up to."""
    if one_hot:
        choices = [np.eye(n_classes, dtype=np.int64)[c] for c in range(n_classes)]
    else:
        choices = [np.array(bits, dtype=np.int64)
                   for bits in itertools.product((0, 1), repeat=n_classes)]
    if n_cells == 0:
        return np.zeros((1, n_classes), dtype=np.int64)
    combos = itertools.product(choices, repeat=n_cells)
    return np.unique(np.array([np.sum(c, axis=0) for c in combos]), axis=0)


def brute_force_certified(votes: np.ndarray, footprint_cells: list[frozenset[tuple[int, int]]],
                          one_hot: bool = False) -> bool:
    """``votes`` (C, h, w) 0/1; True iff no assignment in any footprint changes the prediction."""
    n_classes = votes.shape[0]
    counts = votes.sum(axis=(1, 2))
    label = predict(counts)
    cache: dict[int, np.ndarray] = {}
    for cells in footprint_cells:
        kept = counts.copy()
        for i, j in cells:
            kept -= votes[:, i, j]
        if len(cells) not in cache:
            cache[len(cells)] = attacker_sums(len(cells), n_classes, one_hot)
        if np.any(predict(kept[None, :] + cache[len(cells)]) != label):
            return False
    return True
