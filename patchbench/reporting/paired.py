"""Paired comparisons of certified accuracies, from the per-image tables of the runs.

Two accuracies measured on the same test images are compared image by image (McNemar,
``stats.py``), which is far more sensitive than comparing two intervals: most images are
certified by both or by neither and carry no information about the difference.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from patchbench.reporting.stats import Paired, mcnemar
from patchbench.running.per_image import certified as certified_flags
from patchbench.running.per_image import correct as correct_flags
from patchbench.running.per_image import has_condition

PerImage = Callable[[str], "pd.DataFrame | None"]  # a cell's per-image table, if readable
Measure = tuple[str, str, str]  # (config label, patch, condition)


class PairedTests:
    """Correct-and-certified flags per image of the report's certified rows (one per
    configuration, patch and condition, with their ``config`` label and ``cell_key``), and
    tests between them."""

    def __init__(self, certified: pd.DataFrame, per_image: PerImage):
        self._cells = {(row["config"], row["patch"], row["condition"]): row["cell_key"]
                       for row in certified.to_dict("records")}
        self._per_image = per_image
        self._flags: dict[Measure, pd.Series | None] = {}

    def flags(self, measure: Measure) -> pd.Series | None:
        """Per image index: correct and certified under the condition; None without a
        readable per-image table that holds them."""
        if measure not in self._flags:
            self._flags[measure] = self._read(measure)
        return self._flags[measure]

    def _read(self, measure: Measure) -> pd.Series | None:
        cell = self._cells.get(measure)
        table = self._per_image(cell) if cell else None
        _, patch, condition = measure
        if table is None or "index" not in table or not has_condition(table, condition, patch):
            return None
        flags = correct_flags(table, patch) & certified_flags(table, condition, patch)
        return pd.Series(flags.to_numpy(), index=table["index"].to_numpy())

    def compare(self, first: Measure, second: Measure) -> Paired | None:
        """McNemar on the images both were measured on; None where either lacks its flags or
        they share no image."""
        a, b = self.flags(first), self.flags(second)
        if a is None or b is None:
            return None
        common = a.index.intersection(b.index)
        if common.empty:
            return None
        return mcnemar(a.loc[common].to_numpy(), b.loc[common].to_numpy())


def p_text(test: Paired) -> str:
    """"p < 0.001" or "p = 0.042"."""
    return "p < 0.001" if test.p_value < 1e-3 else f"p = {test.p_value:.3f}"
