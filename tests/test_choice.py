"""The headline configuration is chosen on val, never on test; the report's rankings are of
val-chosen configurations only, paired on the same images; configurations at chance are
flagged and never headlined.

Results folders here are written by hand, rows and per-image tables agreeing (the report
checks them), from per-image outcomes: the first ``clean`` of the images are correct, the first
``k`` of them certified. Two configurations' flags are thus nested, and McNemar sees |k1 - k2|
discordant images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from patchbench.reporting.choice import (
    CHOICE_PATCH,
    CLEAN_TOLERANCE,
    canonical_params,
    config_identity,
    val_choices,
)
from patchbench.reporting.report import build_report
from patchbench.reporting.stats import mcnemar

pytestmark = pytest.mark.slow  # builds reports

N = 200  # test images of every hand-made cell
DATASET = "synthetic"
# rows without a recipe: trained before hold_out_val existed, so with val (not the default)
RF = {rf: f"bagcert rf={rf} hold_out_val=no train_precision=fp32" for rf in (5, 7, 9)}
COLUMN = "ds-column ablation_size=4 threshold=0.2 hold_out_val=no train_precision=fp32"


def identity(defense: str, params: dict, sha: str) -> dict:
    return {"defense": defense, "dataset": DATASET, "params": json.dumps(params),
            "checkpoint_sha256": sha}


def cell_rows(config: dict, cell: str, clean: int, certified: dict[tuple[str, str], int],
              n: int = N, split: str = "test") -> pd.DataFrame:
    """A certification cell's rows: one per (condition, patch) of ``certified``."""
    return pd.DataFrame([{
        **config, "split": split, "cell": cell, "patch": patch,
        "patch_h": int(patch.split("x")[0]), "patch_w": int(patch.split("x")[1]),
        "condition": condition, "n_images": n, "n_correct": clean, "n_certified": k,
        "clean_accuracy": clean / n, "certified_accuracy": k / n, "n_parameters": 1000,
        "certify_seconds": 5.0, "timestamp": "2026-01-01T00:00:00+00:00"}
        for (condition, patch), k in certified.items()])


def write_cell(results: Path, config: dict, cell: str, clean: int,
               certified: dict[tuple[str, str], int], labels: np.ndarray | None = None) -> None:
    """Rows and a per-image table that agree: the first ``clean`` images correct, the first
    ``k`` of them certified (``k <= clean``)."""
    labels = np.arange(N) % 4 if labels is None else labels
    first = np.arange(N)
    table = {"index": first, "label": labels,
             "prediction": np.where(first < clean, labels, (labels + 1) % 4)}
    for (condition, patch), k in certified.items():
        assert k <= clean
        table[f"margin_{condition}_{patch}"] = np.where(first < k, 1, -1)
    for sub in ("rows", "per_image"):
        (results / sub).mkdir(parents=True, exist_ok=True)
    pd.DataFrame(table).assign(cell=cell).to_csv(results / "per_image" / f"{cell}.csv.gz",
                                                 index=False)
    cell_rows(config, cell, clean, certified).to_csv(results / "rows" / f"{cell}.csv",
                                                      index=False)


def write_val(folder: Path, config: dict, name: str, clean: float, certified: float) -> None:
    """Val rows (5x5, tight and global) of ``config`` in ``folder/rows`` (a study folder, or
    the results folder itself); val rows need no per-image table."""
    n = 1000
    rows = cell_rows(config, f"val-{name}", round(clean * n),
                     {("tight", "5x5"): round(certified * n),
                      ("global", "5x5"): round(certified * n) - 10}, n=n, split="val")
    (folder / "rows").mkdir(parents=True, exist_ok=True)
    rows.to_csv(folder / "rows" / f"val-{name}.csv", index=False)


def report(results: Path, out: Path) -> tuple[str, dict[str, pd.DataFrame]]:
    """The report's Markdown and its tables (CSV), gallery off."""
    path = build_report(results, out, gallery_images=0)
    tables = {p.stem: pd.read_csv(p) for p in (out / "tables").glob("*.csv")}
    return path.read_text(), tables


def findings_of(text: str) -> list[str]:
    section = text.split("## Findings")[1].split("\n## ")[0]
    return [line[2:] for line in section.splitlines() if line.startswith("- ")]


# -- the rule on val rows ----------------------------------------------------------------------

def val_frame(candidates: list[tuple[str, float, float]]) -> pd.DataFrame:
    """Typed val rows at 5x5 tight: (checkpoint sha, clean, certified) per configuration."""
    rows = [cell_rows(identity("bagcert", {"rf": i}, sha), f"v{i}", round(c * 1000),
                      {("tight", CHOICE_PATCH): round(k * 1000)}, n=1000, split="val")
            for i, (sha, c, k) in enumerate(candidates)]
    return pd.concat(rows, ignore_index=True)


def chosen_sha(candidates: list[tuple[str, float, float]]) -> str:
    (choice,) = val_choices(val_frame(candidates)).values()
    return choice.key.rsplit("|", 1)[1]


def test_the_rule_takes_the_most_certified_within_a_point_of_the_best_clean():
    assert CLEAN_TOLERANCE == 0.01
    # b: within a point of a's clean and certifies more; c certifies most but is 1.5 below
    assert chosen_sha([("a", 0.800, 0.40), ("b", 0.795, 0.45), ("c", 0.785, 0.60)]) == "b"
    assert chosen_sha([("a", 0.800, 0.40), ("b", 0.780, 0.45)]) == "a"  # b loses 2 points
    # a tie in certified accuracy goes to the higher clean accuracy, wherever it is listed
    assert chosen_sha([("a", 0.795, 0.40), ("b", 0.800, 0.40)]) == "b"
    assert chosen_sha([("b", 0.800, 0.40), ("a", 0.795, 0.40)]) == "b"


def test_the_choice_records_its_inputs():
    (choice,) = val_choices(val_frame([("a", 0.8, 0.4), ("b", 0.7, 0.5)])).values()
    assert (choice.dataset, choice.defense, choice.condition) == (DATASET, "bagcert", "tight")
    assert (choice.clean, choice.certified, choice.n_images, choice.candidates) == (
        0.8, 0.4, 1000, 2)


def test_a_configuration_is_its_dataset_defense_settings_and_checkpoint():
    rows = pd.DataFrame([identity("bagcert", {"rf": 7, "width": 8}, "a"),
                         identity("bagcert", {"width": 8, "rf": 7}, "a"),  # key order
                         identity("bagcert", {"rf": 7, "width": 8}, "b"),  # another model
                         identity("bagcert", {"rf": 5, "width": 8}, "a")])
    keys = config_identity(rows)
    assert keys[0] == keys[1] and len(set(keys)) == 3
    assert canonical_params('{"b": 1, "a": 2}') == canonical_params('{"a": 2, "b": 1}')
    assert canonical_params(float("nan")) == "{}"


# -- the report: headline, notes, rankings -----------------------------------------------------

def chosen_folder(results: Path) -> None:
    """BagCert rf 5, 7, 9 and column smoothing on test (5x5, tight and global for BagCert);
    val rows of the three BagCert models from two study folders and the results folder's own
    rows; none for column smoothing. On val the rule picks rf 7; on test rf 9 and column
    smoothing certify more."""
    configs = {rf: identity("bagcert", {"rf": rf}, sha * 64)
               for rf, sha in ((5, "a"), (7, "b"), (9, "c"))}
    for rf, tight in ((5, 120), (7, 90), (9, 140)):
        write_cell(results, configs[rf], f"rf{rf}", 170,
                   {("tight", "5x5"): tight, ("global", "5x5"): tight - 20})
    write_cell(results, identity("ds-column", {"ablation_size": 4, "threshold": 0.2}, "d" * 64),
               "column", 175, {("tight", "5x5"): 160})
    write_val(results / "validation" / "study-a", configs[5], "rf5", 0.800, 0.40)
    write_val(results / "validation" / "study-b", configs[7], "rf7", 0.805, 0.45)
    write_val(results, configs[9], "rf9", 0.790, 0.60)  # most certified, 1.5 points below


@pytest.fixture(scope="module")
def chosen(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, pd.DataFrame]]:
    """The report of ``chosen_folder``."""
    root = tmp_path_factory.mktemp("chosen")
    chosen_folder(root / "results")
    return report(root / "results", root / "out")


def test_the_headline_is_the_val_choice_not_the_test_best(chosen) -> None:
    text, tables = chosen
    headline = tables["headline"]
    assert headline[["defense", "config"]].values.tolist() == [["bagcert", RF[7]]]
    assert headline["5x5 tight (%)"].tolist() == [45.0]  # rf 9 certifies 70.0 on test
    configs = tables["configurations"].set_index("config")
    assert configs["chosen on val"].to_dict() == {RF[5]: "no", RF[7]: "yes", RF[9]: "no",
                                                  COLUMN: "no val rows"}
    section = text.split("## Headline")[1].split("\n## ")[0]
    assert "ds-column on synthetic: not chosen on val (no `val` rows); not in the headline" in (
        section)
    # the val rows are not test rows: nothing of val in the accuracy table
    assert (tables["accuracy"]["images"] == N).all() and len(tables["accuracy"]) == 4


def test_findings_rank_only_configurations_chosen_on_val(chosen) -> None:
    text, _ = chosen
    sentences = findings_of(text)
    (ranking,) = [s for s in sentences if "of the configurations chosen on val" in s]
    assert ranking.startswith(f"At 5x5 on {DATASET}, of the configurations chosen on val, "
                              f"**{RF[7]}** certifies the most: 45.0% [38.3, 51.9]")
    assert "ahead of" not in ranking and "tied with" not in ranking  # nothing else chosen
    # column smoothing (no val rows) certifies 80% on test, yet no sentence ranks it
    for sentence in sentences:
        if COLUMN in sentence:
            assert not any(word in sentence for word in ("certifies the most", "ahead of",
                                                         "tied with", "**"))


def test_without_any_val_rows_nothing_is_headlined_or_ranked(tmp_path: Path) -> None:
    results = tmp_path / "results"
    chosen_folder(results)
    for path in [*results.glob("validation/*/rows/*.csv"), *results.glob("rows/val-*.csv")]:
        path.unlink()
    text, tables = report(results, tmp_path / "out")
    assert "headline" not in tables
    assert "_No configuration was chosen on val (no `val` rows under" in text
    assert (f"On {DATASET}, no configuration was chosen on val: the report ranks none"
            in text)
    assert set(tables["configurations"]["chosen on val"]) == {"no val rows"}


@pytest.mark.parametrize(("column_tight", "tied"), [
    (99, True),  # one image apart (of 200): tied
    (40, False),  # 60 images apart, all on one side: significantly ahead
])
def test_two_chosen_configurations_are_compared_on_the_same_images(
        tmp_path: Path, column_tight: int, tied: bool) -> None:
    results = tmp_path / "results"
    bagcert = identity("bagcert", {"rf": 7}, "b" * 64)
    column = identity("ds-column", {"ablation_size": 4, "threshold": 0.2}, "d" * 64)
    write_cell(results, bagcert, "bagcert", 170, {("tight", "5x5"): 100})
    write_cell(results, column, "column", 175, {("tight", "5x5"): column_tight})
    write_val(results / "validation" / "b", bagcert, "b", 0.8, 0.4)
    write_val(results / "validation" / "c", column, "c", 0.8, 0.3)
    text, tables = report(results, tmp_path / "out")
    assert sorted(tables["headline"]["defense"]) == ["bagcert", "ds-column"]
    (ranking,) = [s for s in findings_of(text) if "of the configurations chosen on val" in s]
    test = mcnemar(np.arange(N) < 100, np.arange(N) < column_tight)
    assert test.significant != tied
    p = "p < 0.001" if test.p_value < 1e-3 else f"p = {test.p_value:.3f}"
    assert f"**{RF[7]}** certifies the most: 50.0%" in ranking
    other = f"{COLUMN} ({100 * column_tight / N:.1f}%, {p})"
    if tied:
        assert f"; tied with {other} (McNemar on the same images, not significant" in ranking
        assert "significantly ahead" not in ranking
    else:
        assert f"; significantly ahead of {other}." in ranking and "tied" not in ranking


@pytest.mark.parametrize(("clean", "flagged"), [(110, True), (120, True), (130, False)])
def test_a_configuration_at_chance_is_flagged_and_not_headlined(
        tmp_path: Path, clean: int, flagged: bool) -> None:
    """120 of the 200 test images are of one class (60%): a clean accuracy at or below that
    is no better than always predicting it."""
    results = tmp_path / "results"
    labels = np.where(np.arange(N) < 120, 0, 1 + np.arange(N) % 3)
    bagcert = identity("bagcert", {"rf": 7}, "b" * 64)
    column = identity("ds-column", {"ablation_size": 4, "threshold": 0.2}, "d" * 64)
    write_cell(results, bagcert, "bagcert", clean, {("tight", "5x5"): 100}, labels)
    write_cell(results, column, "column", 150, {("tight", "5x5"): 50}, labels)
    write_val(results / "validation" / "b", bagcert, "b", 0.8, 0.4)
    write_val(results / "validation" / "c", column, "c", 0.8, 0.3)
    text, tables = report(results, tmp_path / "out")
    configs = tables["configurations"].set_index("config")
    assert configs["chance (%)"].tolist() == [60.0, 60.0]
    assert (RF[7] in set(tables["headline"]["config"])) != flagged
    assert COLUMN in set(tables["headline"]["config"])  # 75% beats chance
    sentences = findings_of(text)
    low = [s for s in sentences if s.startswith("**At or below chance**")]
    if flagged:
        assert configs.loc[RF[7], "chosen on val"] == "yes, at chance"
        assert low == [f"**At or below chance** (clean accuracy no better than the most common "
                       f"class): {RF[7]} ({100 * clean / N:.1f}% vs 60.0%); never headlined."]
        assert (f"bagcert on {DATASET}: the configuration chosen on val, {RF[7]}, is at or "
                "below chance on test") in text
        (ranking,) = [s for s in sentences if "of the configurations chosen on val" in s]
        assert RF[7] not in ranking  # not ranked either
    else:
        assert configs.loc[RF[7], "chosen on val"] == "yes" and low == []


def test_only_configurations_at_chance_leave_no_headline(tmp_path: Path) -> None:
    results = tmp_path / "results"
    labels = np.where(np.arange(N) < 120, 0, 1)
    bagcert = identity("bagcert", {"rf": 7}, "b" * 64)
    write_cell(results, bagcert, "bagcert", 100, {("tight", "5x5"): 50}, labels)
    write_val(results / "validation" / "b", bagcert, "b", 0.8, 0.4)
    text, tables = report(results, tmp_path / "out")
    assert "headline" not in tables
    section = text.split("## Headline")[1].split("\n## ")[0]
    assert "_No configuration chosen on val can be headlined (notes below)" in section
    assert "no `val` rows" not in section
    assert "is at or below chance on test" in section


@pytest.mark.parametrize("val_sha", ["b", "z"])
def test_val_rows_name_a_test_configuration_by_its_identity(tmp_path: Path, val_sha: str):
    """The val rows' params JSON lists its keys in another order (the same settings); with
    another checkpoint hash they name another model, which has no test rows here."""
    results = tmp_path / "results"
    test = identity("bagcert", {"rf": 7, "width": 8}, "b" * 64)
    write_cell(results, test, "bagcert", 170, {("tight", "5x5"): 100})
    val = {**test, "params": '{"width": 8, "rf": 7}', "checkpoint_sha256": val_sha * 64}
    write_val(results / "validation" / "b", val, "b", 0.8, 0.4)
    text, tables = report(results, tmp_path / "out")
    label = "bagcert rf=7 width=8 hold_out_val=no train_precision=fp32"
    if val_sha == "b":
        assert tables["headline"]["config"].tolist() == [label]
        assert tables["configurations"]["chosen on val"].tolist() == ["yes"]
    else:
        assert "headline" not in tables
        assert tables["configurations"]["chosen on val"].tolist() == ["no"]
        assert (f"bagcert on {DATASET}: the configuration chosen on val has no test rows "
                "here.") in text


def test_a_configuration_whose_cells_come_from_different_code_is_flagged(tmp_path: Path):
    """Rows record a hash of the defense's source; one configuration computed by two versions
    of it is named in the findings, and the configurations table says "differs"."""
    results = tmp_path / "results"
    config = identity("bagcert", {"rf": 7}, "a" * 64)
    write_cell(results, {**config, "defense_source_sha256": "1" * 64}, "first", 150,
               {("tight", "5x5"): 80})
    write_cell(results, {**config, "defense_source_sha256": "2" * 64}, "second", 150,
               {("tight", "2x12"): 70})
    text, tables = report(results, tmp_path / "out")
    assert tables["configurations"]["defense code"].tolist() == [
        f"differs: {'1' * 12}, {'2' * 12}"]
    assert any(f.startswith("**Different code**: the cells of bagcert rf=7")
               for f in findings_of(text))
    alone = tmp_path / "alone"
    write_cell(alone, {**config, "defense_source_sha256": "1" * 64}, "first", 150,
               {("tight", "5x5"): 80})
    text, tables = report(alone, tmp_path / "out-alone")
    assert tables["configurations"]["defense code"].astype(str).tolist() == ["1" * 12]
    assert not any("Different code" in f for f in findings_of(text))
