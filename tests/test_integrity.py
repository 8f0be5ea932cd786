"""check_integrity on copies of the committed results, intact and broken one way at a time."""

from __future__ import annotations

import gzip
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from patchbench.reporting.integrity import (
    CERTIFICATION_COLUMNS,
    chance_levels,
    check_integrity,
    majority_share,
)
from patchbench.running.results import ResultsError, load_results, metric_of

pytestmark = pytest.mark.slow  # every test copies and alters committed cells

COMMITTED = Path(__file__).resolve().parent.parent / "results"
VOTES = "02f04f1adf0d4d71"  # ds-row certification: one prediction, margins, 36 rows
MASKING = "e1a30a88364445d1"  # PatchCleanser certification: a prediction per patch, 18 rows
ATTACK = "fab4d3444bac2ce2"  # ds-column attack of 50 images, 2 rows
MASKING_ATTACK = "2b71917d7279144a"  # PatchCleanser attack: a prediction per patch
CELLS = (VOTES, MASKING, ATTACK, MASKING_ATTACK)


def copy_results(source: Path, target: Path, cells: tuple[str, ...] | None = None) -> Path:
    """``source``'s rows and per-image tables (of ``cells``, or all) copied into ``target``."""
    for sub, suffix in (("rows", ".csv"), ("per_image", ".csv.gz")):
        (target / sub).mkdir(parents=True)
        for path in sorted((source / sub).glob(f"*{suffix}")):
            if cells is None or path.name.removesuffix(suffix) in cells:
                shutil.copyfile(path, target / sub / path.name)
    return target


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """A few committed cells: vote and masking certification, vote and masking attack."""
    return copy_results(COMMITTED, tmp_path / "results", CELLS)


def check(results: Path) -> None:
    check_integrity(load_results(results), results)


def broken(results: Path, *fragments: str) -> str:
    """The one-line message check_integrity raises; it names every fragment."""
    with pytest.raises(ResultsError) as info:
        check(results)
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def rows_of(results: Path, cell: str) -> pd.DataFrame:
    return pd.read_csv(results / "rows" / f"{cell}.csv")


def write_rows(results: Path, cell: str, rows: pd.DataFrame) -> None:
    rows.to_csv(results / "rows" / f"{cell}.csv", index=False)


def table_of(results: Path, cell: str) -> pd.DataFrame:
    return pd.read_csv(results / "per_image" / f"{cell}.csv.gz")


def write_table(results: Path, cell: str, table: pd.DataFrame) -> None:
    table.to_csv(results / "per_image" / f"{cell}.csv.gz", index=False)


@pytest.mark.parametrize("folder", ["", "loss-comparison", "validation/ds-block-sizes",
                                    "validation/ds-column-sizes", "validation/ds-row-sizes",
                                    "validation/patchcleanser"])
def test_the_committed_results_pass(tmp_path: Path, folder: str) -> None:
    results = copy_results(COMMITTED / folder, tmp_path / "results")
    rows = load_results(results)
    assert (metric_of(rows) == "certified").any()
    check_integrity(rows, results)


def test_the_copied_cells_pass(results: Path) -> None:
    check(results)


def test_an_attack_without_a_per_image_table_passes(results: Path) -> None:
    (results / "per_image" / f"{ATTACK}.csv.gz").unlink()
    check(results)


@pytest.mark.parametrize("cell", [VOTES, MASKING, ATTACK])
def test_a_per_image_table_cut_in_half(results: Path, cell: str) -> None:
    path = results / "per_image" / f"{cell}.csv.gz"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    broken(results, f"cell {cell}", "unreadable")


def test_a_missing_per_image_table(results: Path) -> None:
    (results / "per_image" / f"{VOTES}.csv.gz").unlink()
    broken(results, f"cell {VOTES}", "per-image table", "is missing")


@pytest.mark.parametrize("cell", [VOTES, MASKING, ATTACK])
def test_a_per_image_table_without_one_image(results: Path, cell: str) -> None:
    table = table_of(results, cell)
    write_table(results, cell, table.drop(index=len(table) // 2))
    broken(results, f"cell {cell}", f"{len(table) - 1} images", f"n_images {len(table)}")


def test_a_per_image_table_with_an_image_twice(results: Path) -> None:
    table = table_of(results, MASKING)
    write_table(results, MASKING, pd.concat([table.iloc[:-1], table.iloc[[0]]]))
    broken(results, f"cell {MASKING}", "repeats image index")


def test_a_per_image_table_with_a_cut_last_line(results: Path) -> None:
    """A last line cut short (a writer that died mid-line) leaves its last columns empty."""
    text = table_of(results, VOTES).to_csv(index=False)
    cut = text[:text.rindex(",", 0, len(text) - 40)]
    (results / "per_image" / f"{VOTES}.csv.gz").write_bytes(gzip.compress(cut.encode()))
    broken(results, f"cell {VOTES}", "empty values")


def test_a_per_image_table_of_another_cell(results: Path) -> None:
    other = "5363acbb501d0054"  # another attack of 500 images
    shutil.copyfile(COMMITTED / "per_image" / f"{other}.csv.gz",
                    results / "per_image" / f"{MASKING_ATTACK}.csv.gz")
    broken(results, f"cell {MASKING_ATTACK}", f"belongs to cell {other}")


def test_rows_that_disagree_on_n_images(results: Path) -> None:
    rows = rows_of(results, VOTES)
    rows.loc[3, "n_images"] -= 1
    write_rows(results, VOTES, rows)
    broken(results, f"cell {VOTES}", "disagree on n_images")


@pytest.mark.parametrize("column", ["params", "n_correct", "condition", "n_certified"])
def test_a_rows_file_without_a_required_column(results: Path, column: str) -> None:
    write_rows(results, MASKING, rows_of(results, MASKING).drop(columns=column))
    broken(results, f"cell {MASKING}", f"lack column {column}")


def test_rows_without_a_required_column_at_all(results: Path) -> None:
    rows = load_results(results).drop(columns="params")
    with pytest.raises(ResultsError, match="lack column params"):
        check_integrity(rows, results)


def test_the_required_columns_are_the_committed_ones() -> None:
    rows = load_results(COMMITTED)
    certification = rows[metric_of(rows) == "certified"]
    assert set(CERTIFICATION_COLUMNS) <= set(certification.columns)
    assert certification[list(CERTIFICATION_COLUMNS)].notna().all(axis=None)


@pytest.mark.parametrize("cell", [VOTES, MASKING])
def test_a_rows_file_with_a_row_deleted(results: Path, cell: str) -> None:
    rows = rows_of(results, cell)
    write_rows(results, cell, rows.drop(index=len(rows) // 2))
    broken(results, f"cell {cell}", "no row for patch and condition",
           f"{rows['patch'].iloc[len(rows) // 2]} {rows['condition'].iloc[len(rows) // 2]}")


def test_an_attack_rows_file_with_a_row_deleted(results: Path) -> None:
    write_rows(results, MASKING_ATTACK, rows_of(results, MASKING_ATTACK).iloc[:-1])
    broken(results, f"cell {MASKING_ATTACK}", "no attack row for patch")


def test_a_rows_file_with_a_row_twice(results: Path) -> None:
    rows = rows_of(results, VOTES)
    write_rows(results, VOTES, pd.concat([rows, rows.iloc[[3]]]))
    broken(results, f"cell {VOTES}", "two rows")


@pytest.mark.parametrize("cell", [VOTES, MASKING])
@pytest.mark.parametrize("column,change", [("n_certified", 1), ("n_certified", -1),
                                           ("n_correct", 1)])
def test_a_count_off_by_one(results: Path, cell: str, column: str, change: int) -> None:
    rows = rows_of(results, cell)
    rows.loc[5, column] += change
    write_rows(results, cell, rows)
    broken(results, f"cell {cell}", column, f"patch {rows['patch'].iloc[5]}")


@pytest.mark.parametrize("column", ["clean_accuracy", "certified_accuracy"])
def test_an_accuracy_that_is_not_its_count(results: Path, column: str) -> None:
    rows = rows_of(results, MASKING)
    rows.loc[2, column] += 1 / rows.loc[2, "n_images"]
    write_rows(results, MASKING, rows)
    broken(results, f"cell {MASKING}", column)


def test_a_prediction_changed_for_one_patch_only(results: Path) -> None:
    """Masking predictions are per patch: the counts are recomputed from that patch's own."""
    table = table_of(results, MASKING)
    right = table["prediction_5x5"] == table["label"]
    first = right.idxmax()
    table.loc[first, "prediction_5x5"] = (table.loc[first, "label"] + 1) % 10
    write_table(results, MASKING, table)
    broken(results, f"cell {MASKING}", "patch 5x5", "n_correct")


def test_a_certificate_changed_in_the_table(results: Path) -> None:
    table = table_of(results, VOTES)
    correct = table["prediction"] == table["label"]
    (image,) = table.index[correct & (table["margin_tight_5x5"] >= 0)][:1]
    table.loc[image, "margin_tight_5x5"] = -1
    write_table(results, VOTES, table)
    broken(results, f"cell {VOTES}", "patch 5x5 condition tight", "n_certified")


@pytest.mark.parametrize("column", ["n_robust", "n_correct", "n_attacked"])
def test_an_attack_count_off_by_one(results: Path, column: str) -> None:
    rows = rows_of(results, ATTACK)
    rows.loc[1, column] += 1
    write_rows(results, ATTACK, rows)
    broken(results, f"cell {ATTACK}", column)


@pytest.mark.parametrize("column", ["empirical_accuracy", "certified_accuracy_tight"])
def test_an_attack_accuracy_that_is_not_its_count(results: Path, column: str) -> None:
    rows = rows_of(results, ATTACK)
    rows.loc[0, column] += 0.02
    write_rows(results, ATTACK, rows)
    broken(results, f"cell {ATTACK}", column)


def test_benchmark_rows_are_left_out(results: Path) -> None:
    rows = load_results(results)
    bench = rows.iloc[[0]].assign(metric="forward_seconds", cell="bench", n_images=1)
    check_integrity(pd.concat([rows, bench], ignore_index=True), results)


def test_majority_share() -> None:
    assert majority_share(pd.DataFrame({"label": [0, 1, 1, 2]})) == 0.5
    assert majority_share(pd.DataFrame({"label": [3, 3, 3]})) == 1.0
    assert majority_share(pd.DataFrame({"label": [0, 1, 2, 3, 4]})) == pytest.approx(0.2)
    assert math.isnan(majority_share(pd.DataFrame({"label": []})))


def test_chance_levels(results: Path) -> None:
    levels = chance_levels(load_results(results), results)
    assert set(levels) == {VOTES, MASKING}  # certification cells only
    for cell, level in levels.items():
        labels = table_of(results, cell)["label"]
        assert level == pytest.approx(labels.value_counts().max() / len(labels))
        assert 0.1 <= level < 0.2  # ten classes, near balanced


def test_chance_levels_of_a_missing_table(results: Path) -> None:
    (results / "per_image" / f"{MASKING}.csv.gz").unlink()
    with pytest.raises(ResultsError, match=f"cell {MASKING}.*is missing"):
        chance_levels(load_results(results), results)
