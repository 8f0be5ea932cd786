"""Integrity of a results folder: do the rows agree with the per-image tables beside them?

``check_integrity`` reads every certification and attack cell's per-image table once and
raises ``ResultsError`` (one line, naming the cell) at the first problem it finds:

* a row lacks a column every row of its kind has (``CERTIFICATION_COLUMNS``,
  ``ATTACK_COLUMNS``), or holds a count or an accuracy that is not a number;
* a certification cell's per-image table is missing; a table (certification, or an attack's
  where it has one: an attack's is not required) is unreadable (a cut gzip, a malformed
  CSV), lacks ``index``, ``label`` or a prediction, holds empty values, repeats an image
  index, or holds another number of images than its rows' ``n_images``;
* a row disagrees with its table: the counts recomputed from the table (correct, and correct
  and certified under the row's condition and patch; for an attack row, correct, robust,
  attacked and certified per condition) differ from the row's, or an accuracy is not its
  count over ``n_images``;
* a cell lacks a row (every patch and condition of a certification table, every attacked
  patch of an attack table, has one) or holds one twice.

``majority_share`` and ``chance_levels`` give the accuracy of always predicting a table's
most common label: a configuration at or below it has learnt nothing.
"""

from __future__ import annotations

import math
import re
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from patchbench.running import per_image
from patchbench.running.results import CERTIFIED, EMPIRICAL, ResultsError, metric_of, per_image_path

# The columns every certification row has (all committed rows, the oldest included, hold
# them: n_correct and n_certified are written since the first version).
CERTIFICATION_COLUMNS = ("defense", "dataset", "patch", "condition", "params", "n_images",
                         "n_correct", "n_certified", "clean_accuracy", "certified_accuracy",
                         "cell")
# Those of an attack row; its counts and accuracies are checked where present.
ATTACK_COLUMNS = ("defense", "dataset", "patch", "params", "n_images", "cell")
# Where an attack row keeps its empirical accuracy (robust_accuracy: earlier versions).
EMPIRICAL_VALUES = ("empirical_accuracy", "robust_accuracy")
TOLERANCE = 1e-9  # an accuracy against its count / n_images
_PATCH = re.compile(r"^\d+x\d+$")
_UNREADABLE = (OSError, EOFError, ValueError, pd.errors.ParserError, zlib.error)


def check_integrity(rows: pd.DataFrame, results_dir: Path) -> None:
    """Raise ResultsError (one line, naming the cell) unless the certification and attack
    rows in ``rows`` (as ``load_results`` or ``report.check_rows`` gives them) are complete
    and agree with their per-image tables in ``results_dir``; other rows (benchmarks) are
    left out. Each per-image table is read once."""
    results_dir = Path(results_dir)
    metric = metric_of(rows)
    for kind, needed in ((CERTIFIED, CERTIFICATION_COLUMNS), (EMPIRICAL, ATTACK_COLUMNS)):
        check_columns(rows[metric == kind], needed, kind, results_dir)
    kept = rows[metric.isin([CERTIFIED, EMPIRICAL])].assign(metric=metric)
    for cell, group in kept.groupby(kept["cell"].astype(str), sort=True):
        certification = group[group["metric"] == CERTIFIED]
        attack = group[group["metric"] == EMPIRICAL]
        where = f"results in {results_dir}: cell {cell}"
        path = per_image_path(results_dir, cell)
        if not path.is_file() and certification.empty:
            continue  # an attack without a per-image table (allowed)
        n_images = whole_numbers(group, "n_images", where)
        if n_images.nunique() != 1:
            raise ResultsError(f"{where}: rows disagree on n_images "
                               f"({', '.join(map(str, sorted(n_images.unique())))})")
        table = read_table(path, where)
        check_table(table, int(n_images.iloc[0]), cell, where)
        if not certification.empty:
            check_certification(certification, table, where)
        if not attack.empty:
            check_attack(attack, table, where)


def check_columns(rows: pd.DataFrame, needed: tuple[str, ...], kind: str,
                  results_dir: Path) -> None:
    """Every row of ``kind`` holds a value in each ``needed`` column."""
    if rows.empty:
        return
    label = "certification" if kind == CERTIFIED else "attack"
    cells = rows["cell"].astype(str) if "cell" in rows else pd.Series("?", index=rows.index)
    for column in needed:
        lacking = ~rows[column].notna() if column in rows else pd.Series(True, index=rows.index)
        if lacking.any():
            bad = sorted(set(cells[lacking]))
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise ResultsError(f"results in {results_dir}: cell {bad[0]}{more}: {label} rows "
                               f"lack column {column}")


def whole_numbers(rows: pd.DataFrame, column: str, where: str) -> pd.Series:
    """``column`` as numbers; a one-line error for text or a fraction (counts are whole)."""
    values = numbers(rows, column, where)
    if values.isna().any() or (values != values.round()).any():
        raise ResultsError(f"{where}: column {column} holds a value that is not a count")
    return values.astype(np.int64)


def numbers(rows: pd.DataFrame, column: str, where: str) -> pd.Series:
    try:
        return pd.to_numeric(rows[column])
    except (TypeError, ValueError):
        raise ResultsError(f"{where}: column {column} holds a value that is not a "
                           "number") from None


def read_table(path: Path, where: str, columns: list[str] | None = None) -> pd.DataFrame:
    """A cell's per-image table; a one-line error where it is missing or unreadable."""
    if not path.is_file():
        raise ResultsError(f"{where}: per-image table {path} is missing")
    try:
        return pd.read_csv(path, usecols=columns)
    except _UNREADABLE as err:
        text = str(err).strip()
        reason = text.splitlines()[0] if text else type(err).__name__
        raise ResultsError(f"{where}: per-image table {path} is unreadable: {reason}") from None


def table_patches(table: pd.DataFrame, prefixes: tuple[str, ...]) -> list[str]:
    """The patch shapes named by the table's ``<prefix><...>_<HxW>`` columns, in order."""
    found = [column.rsplit("_", 1)[1] for column in table.columns
             if column.startswith(prefixes) and "_" in column]
    return list(dict.fromkeys(p for p in found if _PATCH.match(p)))


def check_table(table: pd.DataFrame, n_images: int, cell: str, where: str) -> None:
    """The table's own shape: its columns, no gaps, one row per image, n_images of them."""
    lacking = [c for c in ("index", "label") if c not in table]
    if lacking:
        raise ResultsError(f"{where}: per-image table lacks column(s) {', '.join(lacking)}")
    used = [c for c in table.columns
            if c in ("index", "label") or c.startswith(("prediction", "margin_", "certified_",
                                                        "attacked_", "broken_"))]
    empty = [c for c in used if table[c].isna().any()]
    if empty:
        raise ResultsError(f"{where}: per-image table holds empty values (column "
                           f"{empty[0]})")
    if len(table) != n_images:
        raise ResultsError(f"{where}: per-image table holds {len(table)} images, its rows "
                           f"say n_images {n_images}")
    duplicated = table["index"].duplicated()
    if duplicated.any():
        raise ResultsError(f"{where}: per-image table repeats image index "
                           f"{table['index'][duplicated].iloc[0]} "
                           f"({int(duplicated.sum())} repeated)")
    if "cell" in table and (table["cell"].astype(str) != cell).any():
        other = table["cell"].astype(str)[table["cell"].astype(str) != cell].iloc[0]
        raise ResultsError(f"{where}: per-image table belongs to cell {other}")


def has_prediction(table: pd.DataFrame, patch: str) -> bool:
    return f"prediction_{patch}" in table or "prediction" in table


def check_certification(rows: pd.DataFrame, table: pd.DataFrame, where: str) -> None:
    """Each row's counts and accuracies recomputed from the table; a row for every patch and
    condition of the table, none twice."""
    patch, condition = rows["patch"].astype(str), rows["condition"].astype(str)
    twice = pd.concat([patch, condition], axis=1).duplicated()
    if twice.any():
        raise ResultsError(f"{where}: two rows for patch {patch[twice].iloc[0]} condition "
                           f"{condition[twice].iloc[0]}")
    present = set(zip(patch, condition, strict=True))
    expected = [(p, c) for p in table_patches(table, ("margin_", "certified_"))
                for c in per_image.conditions(table, p)]
    missing = [f"{p} {c}" for p, c in expected if (p, c) not in present]
    if missing:
        raise ResultsError(f"{where}: no row for patch and condition {missing[0]} of its "
                           f"per-image table ({len(missing)} missing)")
    n_images = len(table)
    counts = {name: whole_numbers(rows, name, where) for name in ("n_correct", "n_certified")}
    accuracy = {name: numbers(rows, name, where)
                for name in ("clean_accuracy", "certified_accuracy")}
    correct_of: dict[str, np.ndarray] = {}
    for i, (p, c) in enumerate(zip(patch, condition, strict=True)):
        if not has_prediction(table, p) or not per_image.has_condition(table, c, p):
            raise ResultsError(f"{where}: the row for patch {p} condition {c} has no "
                               "columns in the per-image table")
        if p not in correct_of:
            correct_of[p] = per_image.correct(table, p).to_numpy()
        correct = correct_of[p]
        recomputed = {"n_correct": int(correct.sum()),
                      "n_certified": int((correct & per_image.certified(table, c, p)
                                          .to_numpy()).sum())}
        for name, value in recomputed.items():
            if counts[name].iloc[i] != value:
                raise ResultsError(f"{where}: patch {p} condition {c}: {name} "
                                   f"{counts[name].iloc[i]}, its per-image table gives {value}")
        for name, count in (("clean_accuracy", "n_correct"),
                            ("certified_accuracy", "n_certified")):
            check_accuracy(accuracy[name].iloc[i], recomputed[count], n_images,
                           f"{where}: patch {p} condition {c}: {name}")


def check_accuracy(value: float, count: int, n_images: int, where: str) -> None:
    share = count / n_images if n_images else float("nan")
    if not (math.isclose(value, share, rel_tol=0, abs_tol=TOLERANCE)
            or (n_images == 0 and math.isnan(value))):
        raise ResultsError(f"{where} {value!r} is not {count} / {n_images}")


def check_attack(rows: pd.DataFrame, table: pd.DataFrame, where: str) -> None:
    """An attack row per attacked patch of the table, none twice; its counts and accuracies
    (those present) recomputed from the table."""
    patch = rows["patch"].astype(str)
    twice = patch.duplicated()
    if twice.any():
        raise ResultsError(f"{where}: two attack rows for patch {patch[twice].iloc[0]}")
    missing = [p for p in table_patches(table, ("broken_",)) if p not in set(patch)]
    if missing:
        raise ResultsError(f"{where}: no attack row for patch {missing[0]} of its per-image "
                           f"table ({len(missing)} missing)")
    n_images = len(table)
    for i, p in enumerate(patch):
        row = rows.iloc[i]
        if not has_prediction(table, p) or f"broken_{p}" not in table:
            raise ResultsError(f"{where}: the attack row for patch {p} has no columns in the "
                               "per-image table")
        correct = per_image.correct(table, p).to_numpy()
        robust = correct & ~table[f"broken_{p}"].astype(bool).to_numpy()
        counts = {"n_correct": int(correct.sum()), "n_robust": int(robust.sum())}
        if f"attacked_{p}" in table:
            counts["n_attacked"] = int(table[f"attacked_{p}"].astype(bool).sum())
        shares = {"clean_accuracy": counts["n_correct"],
                  **dict.fromkeys(EMPIRICAL_VALUES, counts["n_robust"])}
        for c in per_image.conditions(table, p):
            shares[f"certified_accuracy_{c}"] = int(
                (correct & per_image.certified(table, c, p).to_numpy()).sum())
        for name, value in counts.items():
            if name in rows and pd.notna(row[name]):
                given = whole_numbers(rows.iloc[[i]], name, where).iloc[0]
                if given != value:
                    raise ResultsError(f"{where}: attack patch {p}: {name} {given}, its "
                                       f"per-image table gives {value}")
        for name, count in shares.items():
            if name in rows and pd.notna(row[name]):
                check_accuracy(numbers(rows.iloc[[i]], name, where).iloc[0], count, n_images,
                               f"{where}: attack patch {p}: {name}")


def majority_share(table: pd.DataFrame) -> float:
    """The share of the most common label among the table's images: the accuracy of always
    predicting the majority class (chance level); NaN for a table without images."""
    if table.empty:
        return float("nan")
    return float(table["label"].value_counts(dropna=False).max() / len(table))


def chance_levels(rows: pd.DataFrame, results_dir: Path) -> dict[str, float]:
    """Each certification cell's ``majority_share``, by cell id (reads only the labels of each
    per-image table; a one-line ResultsError where one is missing or unreadable)."""
    results_dir = Path(results_dir)
    certification = rows[metric_of(rows) == CERTIFIED]
    if "cell" not in certification:
        if certification.empty:
            return {}
        raise ResultsError(f"results in {results_dir}: certification rows lack column cell")
    levels = {}
    for cell in sorted(set(certification["cell"].dropna().astype(str))):
        where = f"results in {results_dir}: cell {cell}"
        levels[cell] = majority_share(read_table(per_image_path(results_dir, cell), where,
                                                 columns=["label"]))
    return levels
