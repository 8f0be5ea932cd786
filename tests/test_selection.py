"""Selecting a setting on validation rows: the documented rule, and refusals."""

from __future__ import annotations

import pandas as pd
import pytest

from patchbench.selection import select_setting


def rows(clean: list[float], certified: list[float], split: str = "val") -> pd.DataFrame:
    values = [0.1 * (i + 1) for i in range(len(clean))]
    return pd.DataFrame({"defense": "ds-column", "split": split, "patch": "5x5",
                         "condition": "tight", "param_threshold": values,
                         "clean_accuracy": clean, "certified_accuracy": certified})


def test_most_certified_among_settings_close_to_the_best_clean_accuracy():
    chosen = select_setting(rows([0.80, 0.805, 0.79, 0.75], [0.30, 0.35, 0.45, 0.50]),
                            "threshold")
    assert chosen.value == pytest.approx(0.2)  # 0.3 and 0.4 lose more than a point of clean
    assert chosen.table["eligible"].tolist() == [True, True, False, False]
    loose = select_setting(rows([0.80, 0.805, 0.79, 0.75], [0.30, 0.35, 0.45, 0.50]),
                           "threshold", clean_tolerance=0.02)
    assert loose.value == pytest.approx(0.3)


def test_ties_go_to_the_higher_clean_accuracy():
    assert select_setting(rows([0.80, 0.81], [0.4, 0.4]), "threshold").value == \
        pytest.approx(0.2)


@pytest.mark.parametrize("frame, param, message", [
    (rows([0.8], [0.4], split="test"), "threshold", "'val' split only"),
    (rows([0.8], [0.4]), "ablation_size", "no parameter"),
    (pd.concat([rows([0.8], [0.4]), rows([0.7], [0.3])]), "threshold", "several rows"),
])
def test_refuses_test_rows_unknown_parameters_and_mixed_models(frame, param, message):
    with pytest.raises(ValueError, match=message):
        select_setting(frame, param)
