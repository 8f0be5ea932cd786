"""Choosing defense settings (a vote threshold, an ablation size, or both) on validation rows.

Settings are picked on the ``val`` split (carved from the training files, see ``data.py``),
never on ``test``. The rule trades the two headline numbers explicitly: among the candidates
whose clean accuracy is within ``clean_tolerance`` of the best candidate's, take the one with
the highest certified accuracy for the chosen patch shape and condition; ties go to the
higher clean accuracy, then to the first candidate in sorted order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from patchbench.certify import CONDITIONS
from patchbench.running.results import ResultsError

# what selecting needs of each row (besides the swept parameter's column)
COLUMNS = ("defense", "split", "patch", "condition", "clean_accuracy", "certified_accuracy")


@dataclass
class Selection:
    value: tuple  # the chosen setting: one value per parameter, in the order asked for
    table: pd.DataFrame  # one row per candidate: the parameters, clean, certified, eligible


def select_setting(rows: pd.DataFrame, params: str | Sequence[str], patch: str = "5x5",
                   condition: str = "tight", clean_tolerance: float = 0.01,
                   where: Mapping[str, object] | None = None) -> Selection:
    """Pick values of ``params`` (jointly, e.g. an ablation size and a threshold) from tidy
    result rows of one defense on one validation split; ``where`` keeps only the rows whose
    parameters have the given values (e.g. one ablation size)."""
    names = [params] if isinstance(params, str) else list(params)
    rows = with_recipe_columns(rows, names)
    columns = [f"param_{name}" for name in names]
    for name in [*names, *(where or {})]:
        if f"param_{name}" not in rows.columns:
            raise ValueError(f"the rows sweep no parameter {name!r}")
    picked = rows[(rows["patch"] == patch) & (rows["condition"] == condition)]
    for name, value in (where or {}).items():
        picked = picked[picked[f"param_{name}"].map(lambda v, want=value: same(v, want))]
        if picked.empty:
            raise ValueError(f"no rows with {name} = {value}")
    if picked.empty:
        raise ValueError(f"no rows for patch {patch} and condition {condition}")
    if picked["split"].ne("val").any():
        raise ValueError("settings are selected on the 'val' split only, "
                         f"got {sorted(picked['split'].unique())}")
    if picked["defense"].nunique() != 1:
        raise ValueError(f"rows of several defenses: {sorted(picked['defense'].unique())}")
    if picked.duplicated(columns).any():
        raise ValueError(f"several rows per {', '.join(names)} value: filter to one model "
                         "first")
    table = (picked.sort_values(columns)[[*columns, "clean_accuracy", "certified_accuracy"]]
             .rename(columns={**dict(zip(columns, names, strict=True)),
                              "clean_accuracy": "clean", "certified_accuracy": "certified"})
             .reset_index(drop=True))
    table["eligible"] = eligible(table["clean"], clean_tolerance)
    first = table.loc[[best_candidate(table, clean_tolerance)]]  # an int stays an int
    return Selection(tuple(first[name].tolist()[0] for name in names), table)


def selection_condition(rows: pd.DataFrame, defense: str, asked: str | None = None) -> str:
    """The condition to select on: ``asked`` (the defense's rows must hold it), else the
    defense's first (tight for vote maps, masking for PatchCleanser)."""
    mine = rows.loc[rows["defense"] == defense, "condition"] if "condition" in rows else []
    present = list(dict.fromkeys(pd.Series(mine).dropna()))
    if asked is None:
        return next((c for c in (*CONDITIONS, *present) if c in present), "tight")
    if present and asked not in present:
        raise ValueError(f"unknown condition {asked!r}; the rows of {defense} have "
                         f"{', '.join(present)}")
    return asked


def eligible(clean: pd.Series, clean_tolerance: float = 0.01) -> pd.Series:
    """The candidates whose clean accuracy is within ``clean_tolerance`` of the best one's."""
    return clean >= clean.max() - clean_tolerance


def best_candidate(table: pd.DataFrame, clean_tolerance: float = 0.01) -> object:
    """The index label of the rule's choice among ``table``'s rows (columns ``clean`` and
    ``certified``, fractions): the most certified eligible candidate, ties to the higher
    clean accuracy, then to the first row."""
    pool = table[eligible(table["clean"], clean_tolerance)]
    return pool.sort_values(["certified", "clean"], ascending=False, kind="stable").index[0]


def with_recipe_columns(rows: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """Rows with ``param_train_<field>`` for each asked ``train_<field>`` of the training
    recipe (the ``train_config`` JSON), so that a recipe field (``train_epochs``) is chosen on
    val like a defense parameter."""
    recipe = [n for n in names if n.startswith("train_") and f"param_{n}" not in rows
              and "train_config" in rows]
    if not recipe:
        return rows
    configs = rows["train_config"].map(lambda text: json.loads(text) if isinstance(text, str)
                                       else {})
    prefix = len("train_")
    return rows.assign(**{f"param_{n}": configs.map(lambda c, k=n[prefix:]: c.get(k))
                          for n in recipe})


def same(value: object, wanted: object) -> bool:
    """Equal as numbers where both read as numbers (2 == 2.0 == "2"), else as text."""
    try:
        return float(value) == float(wanted)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value) == str(wanted)


def defense_rows(rows: pd.DataFrame, defense: str, source: str | Path) -> pd.DataFrame:
    """The rows of ``defense``, their accuracies as numbers. ResultsError (one line) for rows
    that lack a column or hold text for a number; ValueError when no row is of ``defense``."""
    missing = [c for c in COLUMNS if c not in rows]
    if missing:
        raise ResultsError(f"results in {source} lack column(s) {', '.join(missing)}")
    rows = rows.copy()
    for name in ("clean_accuracy", "certified_accuracy"):
        try:
            rows[name] = pd.to_numeric(rows[name])
        except (TypeError, ValueError):
            raise ResultsError(f"results in {source}: column {name} holds a value that is not "
                               "a number") from None
    kept = rows[rows["defense"] == defense]
    if kept.empty:
        held = ", ".join(sorted(rows["defense"].dropna().astype(str).unique()))
        raise ValueError(f"no rows of defense {defense!r} in {source}; it holds rows of {held}")
    return kept
