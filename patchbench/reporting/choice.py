"""The configuration a study chose on ``val``, per dataset and defense: what a report headlines.

A report never ranks configurations on the test set to pick a "best" one. It reads the
study's validation rows (``<results>/validation/**/rows/``, and any ``val`` rows beside the
test rows), applies the selection rule of ``selection.py`` to every configuration of a
defense that has them, and headlines the test numbers of the one chosen. A configuration is
identified by its dataset, defense, parameters and checkpoint (``config_identity``), so a val
row and a test row of the same model and settings name the same configuration.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd

from patchbench.reporting.tables import ordered
from patchbench.running.selection import best_candidate

CHOICE_PATCH = "5x5"  # the shape the rule ranks on (the talk's headline shape)
CLEAN_TOLERANCE = 0.01
RULE = (f"on `val`, among a defense's configurations within {100 * CLEAN_TOLERANCE:g} point "
        f"of the best val clean accuracy, the one that certifies the most at {CHOICE_PATCH} "
        "(its primary condition: tight for vote maps); ties to the higher clean accuracy")


@dataclass(frozen=True)
class Choice:
    """The configuration the rule chose on val for one dataset and defense."""

    dataset: str
    defense: str
    key: str  # config_identity of the chosen configuration
    condition: str  # the condition it was ranked under
    clean: float  # its val accuracies (fractions)
    certified: float
    n_images: int  # val images of its row
    candidates: int  # configurations the rule chose among


def canonical_params(text: object) -> str:
    """A ``params`` JSON text with sorted keys, so that equal settings compare equal."""
    if not isinstance(text, str) or not text:
        return "{}"
    return json.dumps(json.loads(text), sort_keys=True)


def config_identity(rows: pd.DataFrame) -> pd.Series:
    """dataset|defense|parameters|checkpoint hash of each row: one configuration's key."""
    sha = rows.get("checkpoint_sha256", pd.Series("", index=rows.index))
    params = rows.get("params", pd.Series("", index=rows.index))
    return (rows["dataset"].astype(str) + "|" + rows["defense"].astype(str) + "|"
            + params.map(canonical_params) + "|" + sha.astype(object).where(sha.notna(), "")
            .astype(str))


def val_choices(val_rows: pd.DataFrame) -> dict[tuple[str, str], Choice]:
    """(dataset, defense) -> the rule's choice among the val certification rows (typed: the
    accuracies as numbers), one per configuration at CHOICE_PATCH under the defense's primary
    condition (its largest, newest run)."""
    out: dict[tuple[str, str], Choice] = {}
    if val_rows.empty:
        return out
    rows = val_rows.assign(config_key=config_identity(val_rows))
    for (dataset, defense), group in rows.groupby(["dataset", "defense"], sort=True):
        condition = ordered(set(group["condition"]))[0]  # tight for vote maps
        at = group[(group["patch"] == CHOICE_PATCH) & (group["condition"] == condition)]
        if at.empty:
            continue
        order = [c for c in ("n_images", "timestamp") if c in at]
        at = (at.sort_values(order, kind="stable").drop_duplicates("config_key", keep="last")
              .sort_values("config_key", kind="stable"))
        table = pd.DataFrame({"clean": at["clean_accuracy"].to_numpy(),
                              "certified": at["certified_accuracy"].to_numpy()})
        chosen = at.iloc[best_candidate(table, CLEAN_TOLERANCE)]
        out[(dataset, defense)] = Choice(dataset, defense, chosen["config_key"], condition,
                                         float(chosen["clean_accuracy"]),
                                         float(chosen["certified_accuracy"]),
                                         int(chosen["n_images"]), len(at))
    return out
