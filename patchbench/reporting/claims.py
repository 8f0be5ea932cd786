"""Published claims checked against a report's results, beside the same quantities measured.

A study brings its claims as a Python file beside the study file (``[report] claims``; the
Fashion-MNIST study's are the BagCert talk's, ``studies/bagcert_talk.py``): a module with
``TITLE`` (the report section's title), ``SOURCE`` (the header of the published column, e.g.
"talk (CIFAR-10)"), ``NOTE`` (the table's note), ``CHECKS`` (functions from ``Inputs`` to a
``Claim``, or None where the results cannot check it) and, optionally, ``SUBJECT`` (how the
findings name the claims). Each row is the published number or
statement and the same quantity measured here. A verdict is given only on what a claim states,
by the rule in its last column, with a paired test where two accuracies are compared and with
times from one benchmark run (``patchbench bench``: one machine, one load) where two speeds
are; numbers measured on another dataset are shown, never judged. This module holds the
machinery and the helpers checks share, and no study's knowledge.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from patchbench.reporting.paired import PairedTests
from patchbench.reporting.tables import Table

HOLDS, FAILS = "holds", "does not hold"
NOT_COMPARED = "not compared: another dataset"


@dataclass
class Claim:
    claim: str
    published: str  # the published number or statement
    here: str
    verdict: str  # HOLDS, FAILS, NOT_COMPARED, or "no verdict: <why>"
    rule: str


@dataclass
class Inputs:
    """What the checks read: the report's tables, the val choices and the paired tests."""

    accuracy: pd.DataFrame  # the accuracy table of one dataset
    configs: pd.DataFrame  # its configurations table
    params: dict[str, dict]  # configuration key -> parameters and recipe
    chosen: dict[str, str]  # defense -> its configuration chosen on val
    paired: PairedTests
    bench: pd.DataFrame  # benchmark rows (metric images_per_second, median), maybe empty
    sweep: dict[Any, str]  # the study's sweep: parameter value -> configuration ({} if none)


Check = Callable[[Inputs], Claim | None]


@dataclass(frozen=True)
class ClaimSet:
    """A study's claims file, loaded."""

    title: str
    source: str
    note: str
    checks: tuple[Check, ...]
    path: Path
    subject: str = "the published claims"  # how the findings name them


class ClaimsError(ValueError):
    """A claims file that cannot be loaded or lacks what it must define."""


def load_claims(path: str | Path) -> ClaimSet:
    """Import a claims file (its own module, not on ``sys.path``)."""
    path = Path(path)
    if not path.is_file():
        raise ClaimsError(f"no claims file {path}")
    spec = importlib.util.spec_from_file_location(f"patchbench_claims_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        raise ClaimsError(f"claims file {path} fails to load: {type(err).__name__}: "
                          f"{err}") from None
    missing = [name for name in ("TITLE", "SOURCE", "NOTE", "CHECKS")
               if not hasattr(module, name)]
    if missing:
        raise ClaimsError(f"claims file {path} does not define {', '.join(missing)}")
    return ClaimSet(module.TITLE, module.SOURCE, module.NOTE, tuple(module.CHECKS), path,
                    getattr(module, "SUBJECT", ClaimSet.subject))


def claims_table(claims: ClaimSet, accuracy: pd.DataFrame, configs: pd.DataFrame,
                 params: dict[str, dict], chosen: dict[tuple[str, str], str],
                 paired: PairedTests, bench: pd.DataFrame | None = None,
                 sweeps: dict[str, dict[Any, str]] | None = None) -> Table | None:
    """One row per claim that the results can check, per dataset; None if none can.
    ``sweeps``: dataset -> its sweep (value -> configuration)."""
    records = []
    bench = bench if bench is not None else pd.DataFrame()
    for dataset in dict.fromkeys(accuracy["dataset"]):
        inputs = Inputs(accuracy[accuracy["dataset"] == dataset],
                        configs[configs["dataset"] == dataset], params,
                        {d: c for (s, d), c in chosen.items() if s == dataset}, paired, bench,
                        (sweeps or {}).get(dataset, {}))
        for check in claims.checks:
            claim = check(inputs)
            if claim is not None:
                records.append({"dataset": dataset, "claim": claim.claim,
                                claims.source: claim.published, "here": claim.here,
                                "verdict": claim.verdict, "rule": claim.rule})
    if not records:
        return None
    return Table("claims", claims.title, pd.DataFrame(records), claims.note)


def claims_sentence(claims: ClaimSet, table: Table) -> str:
    """The findings' summary of the claims table."""
    frame = table.frame
    judged = frame[frame["verdict"].isin([HOLDS, FAILS])]
    against = judged[judged["verdict"] == FAILS]
    datasets = ", ".join(dict.fromkeys(frame["dataset"]))
    unjudged = len(frame) - len(judged)
    text = (f"Of {claims.subject} that state something checkable here, "
            f"{len(judged) - len(against)} of {len(judged)} hold on {datasets} "
            f"({unjudged} more {'is' if unjudged == 1 else 'are'} shown beside this "
            "dataset's numbers without a verdict)")
    if against.empty:
        return text + "."
    return text + "; these do not: " + "; ".join(
        f"{row['claim']} ({claims.source}: {row[claims.source]}; here: {row['here']})"
        for row in against.to_dict("records")) + "."


# --- helpers that checks share ----------------------------------------------------------------

def value(accuracy: pd.DataFrame, config: str, patch: str, column: str = "tight (%)") -> float:
    found = accuracy.loc[(accuracy["config"] == config) & (accuracy["patch"] == patch), column]
    return float(found.iloc[0]) if len(found) else math.nan


def images(accuracy: pd.DataFrame, config: str, patch: str) -> int:
    found = accuracy.loc[(accuracy["config"] == config) & (accuracy["patch"] == patch),
                         "images"]
    return int(found.iloc[0]) if len(found) else 0


def verdict(holds: bool) -> str:
    return HOLDS if holds else FAILS


def shape_range(accuracy: pd.DataFrame, config: str, areas: Sequence[int]) -> float:
    """Largest minus smallest certified accuracy over the patch shapes of these ``areas`` (an
    equal-area aspect series); NaN with fewer than three shapes."""
    rows = accuracy[accuracy["config"] == config]
    area = rows["patch"].map(lambda p: int(p.split("x")[0]) * int(p.split("x")[1]))
    series = rows.loc[area.isin(list(areas)), "tight (%)"].dropna()
    return float(series.max() - series.min()) if len(series) >= 3 else math.nan


def bench_ratio(bench: pd.DataFrame, slow: dict, fast: dict) -> tuple[float, str] | None:
    """(time of ``slow`` / time of ``fast``, "run <id>, load <x>") from one benchmark run
    that timed both (each a dict of row values to match, e.g. {"defense": "bagcert",
    "param_rf": 5}), at the largest batch size and number of shapes they share; None
    without such a run (the newest is used)."""
    if bench.empty:
        return None

    def matching(want: dict) -> pd.Series:
        keep = pd.Series(True, index=bench.index)
        for name, wanted in want.items():
            keep &= (bench[name] == wanted) if name in bench else False
        return keep

    a, b = bench[matching(slow)], bench[matching(fast)]
    runs = sorted(set(a["run_id"]) & set(b["run_id"]),
                  key=lambda r: str(bench.loc[bench["run_id"] == r, "timestamp"].max()))
    if not runs:
        return None
    run = runs[-1]
    a, b = a[a["run_id"] == run], b[b["run_id"] == run]
    shared = a.merge(b, on=["batch_size", "n_patch_shapes"], suffixes=("_a", "_b"))
    if shared.empty:
        return None
    top = shared.sort_values(["n_patch_shapes", "batch_size"]).iloc[-1]
    load = a["load_average"].iloc[0] if "load_average" in a else math.nan
    return (float(top["value_b"] / top["value_a"]),
            f"bench run {run[:8]}, batch {int(top['batch_size'])}, "
            f"{int(top['n_patch_shapes'])} shapes, {a['device'].iloc[0]}, load {load}")
