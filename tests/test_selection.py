"""Selecting a setting on validation rows: the documented rule, and refusals."""

from __future__ import annotations

import pandas as pd
import pytest

from patchbench.running.selection import best_candidate, eligible, select_setting


def rows(clean: list[float], certified: list[float], split: str = "val") -> pd.DataFrame:
    values = [0.1 * (i + 1) for i in range(len(clean))]
    return pd.DataFrame({"defense": "ds-column", "split": split, "patch": "5x5",
                         "condition": "tight", "param_threshold": values,
                         "clean_accuracy": clean, "certified_accuracy": certified})


def test_most_certified_among_settings_close_to_the_best_clean_accuracy():
    chosen = select_setting(rows([0.80, 0.805, 0.79, 0.75], [0.30, 0.35, 0.45, 0.50]),
                            "threshold")
    assert chosen.value == pytest.approx((0.2,))  # 0.3 and 0.4 lose more than a point of clean
    assert chosen.table["eligible"].tolist() == [True, True, False, False]
    loose = select_setting(rows([0.80, 0.805, 0.79, 0.75], [0.30, 0.35, 0.45, 0.50]),
                           "threshold", clean_tolerance=0.02)
    assert loose.value == pytest.approx((0.3,))


def test_ties_go_to_the_higher_clean_accuracy():
    assert select_setting(rows([0.80, 0.81], [0.4, 0.4]), "threshold").value == \
        pytest.approx((0.2,))


@pytest.mark.parametrize("frame, param, message", [
    (rows([0.8], [0.4], split="test"), "threshold", "'val' split only"),
    (rows([0.8], [0.4]), "ablation_size", "no parameter"),
    (pd.concat([rows([0.8], [0.4]), rows([0.7], [0.3])]), "threshold", "several rows"),
])
def test_refuses_test_rows_unknown_parameters_and_mixed_models(frame, param, message):
    with pytest.raises(ValueError, match=message):
        select_setting(frame, param)


def sizes_and_thresholds() -> pd.DataFrame:
    """Two ablation sizes x two thresholds: (size, clean, certified) chosen to test the rule."""
    frames = []
    for size, clean, certified in [(2, [0.80, 0.785], [0.30, 0.41]),
                                   (4, [0.805, 0.80], [0.38, 0.39])]:
        frame = rows(clean, certified)
        frames.append(frame.assign(param_ablation_size=size))
    return pd.concat(frames, ignore_index=True)


def test_several_parameters_are_chosen_jointly():
    chosen = select_setting(sizes_and_thresholds(), ["ablation_size", "threshold"])
    # (2, 0.2) certifies most but loses 1.5 points of clean accuracy to (4, 0.1)
    assert chosen.value == pytest.approx((4, 0.2))
    assert isinstance(chosen.value[0], int)  # printed as 4, as the command line takes it
    assert chosen.table.columns.tolist() == ["ablation_size", "threshold", "clean", "certified",
                                             "eligible"]
    assert chosen.table["eligible"].tolist() == [True, False, True, True]


def test_where_keeps_the_rows_of_one_setting():
    chosen = select_setting(sizes_and_thresholds(), "threshold", where={"ablation_size": "2"})
    assert chosen.value == pytest.approx((0.1,))  # within size 2, 0.2 loses a point of clean
    assert len(chosen.table) == 2
    with pytest.raises(ValueError, match="no rows with ablation_size = 3"):
        select_setting(sizes_and_thresholds(), "threshold", where={"ablation_size": 3})
    with pytest.raises(ValueError, match="several rows per threshold"):
        select_setting(sizes_and_thresholds(), "threshold")


def test_a_training_recipe_field_is_chosen_like_a_parameter():
    rows = pd.DataFrame({
        "defense": "patchcleanser", "split": "val", "patch": "5x5", "condition": "masking",
        "param_width": [48, 48], "clean_accuracy": [0.90, 0.898],
        "certified_accuracy": [0.60, 0.62],
        "train_config": ['{"epochs": 20}', '{"epochs": 30}']})
    chosen = select_setting(rows, ["width", "train_epochs"], condition="masking")
    assert chosen.value == (48, 30)


def test_best_candidate_returns_the_index_label_of_the_rule_s_pick():
    """What choice.py applies per defense: labels, not positions; ties to the higher clean
    accuracy, then to the first row."""
    table = pd.DataFrame({"clean": [0.80, 0.795, 0.78, 0.80], "certified": [0.4, 0.45, 0.9, 0.45]},
                         index=[10, 20, 30, 40])
    assert eligible(table["clean"]).tolist() == [True, True, False, True]
    assert best_candidate(table) == 40  # 0.45 twice: 40 has the higher clean accuracy
    assert best_candidate(table, clean_tolerance=0.03) == 30
    assert best_candidate(table.loc[[20, 40]].assign(clean=0.8)) == 20  # a full tie: first
