"""The talk's CIFAR-10 claims, checked against the results of a report.

The talk that started the project (BagCert, ICLR 2021; ``shared/seed-slides-bagcert-iclr2021``
and DESIGN.md section 2) makes claims measured on CIFAR-10 on a V100. Each claim here is the
talk's number or statement, the same quantity measured from the report's tables, and a verdict
by a rule written next to it, so a report says plainly where its dataset agrees with the talk
and where it does not. A claim whose inputs are missing (no rf sweep, no column smoothing...)
is left out. Inputs are the frames of ``tables.py`` (accuracies in percent).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from patchbench.tables import TIME, Table, best_configs, rf_sweep

# The talk's numbers (CIFAR-10; 10,000 images certified on one V100)
TALK_BAGCERT = {"clean": 86.0, "certified_5x5": 60.0}
TALK_TIGHT_GAIN = 3.0  # points of certified accuracy, same model
TALK_RF_TIME = {5: 39.0, 7: 40.6, 9: 43.2, 11: 45.9, 13: 48.5}  # seconds
TALK_RF_PARAMETERS = {5: 28e6, 7: 38e6, 9: 57e6, 11: 57e6, 13: 66e6}
TALK_TIME = {"ds-block": 788.0, "ds-column": 28.0}  # seconds, ResNet-18 base (11M)
EQUAL_AREA = (24, 25)  # patch areas of the aspect-ratio series 1x24 ... 5x5 ... 24x1

# the rules
POINTS = 3.0  # a certified accuracy agrees within this many points
GAIN_POINTS = 1.5  # the tight condition's gain agrees within this many points
RATIO = 1.5  # a ratio of times or sizes agrees within this factor either way
NEAR_OPTIMAL = 2.0  # rf 7 is "close to optimal" if no rf beats it by more points at a square
NON_TRIVIAL = 5.0  # certified accuracy (%) that counts as non-trivial


@dataclass
class Claim:
    claim: str
    talk: str
    here: str
    agrees: bool
    rule: str


def talk_table(accuracy: pd.DataFrame, configs: pd.DataFrame, gains: pd.DataFrame | None,
               params: dict[str, dict]) -> Table | None:
    """One row per claim that the results can check, per dataset; None if none can."""
    records = []
    for dataset in dict.fromkeys(accuracy["dataset"]):
        mine = accuracy[accuracy["dataset"] == dataset]
        mine_configs = configs[configs["dataset"] == dataset]
        mine_gains = gains[gains["dataset"] == dataset] if gains is not None else None
        for check in CHECKS:
            claim = check(mine, mine_configs, mine_gains, params)
            if claim is not None:
                records.append({"dataset": dataset, "claim": claim.claim,
                                "talk (CIFAR-10)": claim.talk, "here": claim.here,
                                "verdict": "agrees" if claim.agrees else "disagrees",
                                "rule": claim.rule})
    if not records:
        return None
    return Table("talk", "The talk's CIFAR-10 claims, checked here", pd.DataFrame(records),
                 "Talk: BagCert, ICLR 2021 (CIFAR-10, V100). Times here are on the device of "
                 "the configurations table.")


def talk_sentence(table: Table) -> str:
    """The findings' summary of the claims table."""
    frame = table.frame
    against = frame[frame["verdict"] == "disagrees"]
    text = (f"Of the talk's CIFAR-10 claims checked here, {len(frame) - len(against)} of "
            f"{len(frame)} hold")
    if against.empty:
        return text + "."
    return text + "; these do not: " + "; ".join(
        f"{row['claim']} (talk: {row['talk (CIFAR-10)']}; here: {row['here']})"
        for row in against.to_dict("records")) + "."


Check = Callable[[pd.DataFrame, pd.DataFrame, pd.DataFrame | None, dict], Claim | None]


def tight(accuracy: pd.DataFrame, config: str, patch: str) -> float:
    value = accuracy.loc[(accuracy["config"] == config) & (accuracy["patch"] == patch),
                         "tight (%)"]
    return float(value.iloc[0]) if len(value) else math.nan


def best(accuracy: pd.DataFrame, defense: str) -> str | None:
    """The defense's headline configuration (most certified at 5x5, tight)."""
    return best_configs(accuracy).get(defense)


def time_of(configs: pd.DataFrame, config: str) -> float:
    value = configs.loc[configs["config"] == config, TIME]
    return float(value.iloc[0]) if len(value) else math.nan


def within_ratio(here: float, talk: float) -> bool:
    return abs(math.log(here / talk)) <= math.log(RATIO)


def bagcert_headline(accuracy, configs, gains, params) -> Claim | None:
    config = best(accuracy, "bagcert")
    if config is None:
        return None
    certified = tight(accuracy, config, "5x5")
    clean = float(accuracy.loc[accuracy["config"] == config, "clean (%)"].iloc[0])
    return Claim("BagCert: certified accuracy against 5x5 patches (tight)",
                 f"{TALK_BAGCERT['certified_5x5']:.0f}% (clean {TALK_BAGCERT['clean']:.0f}%)",
                 f"{certified:.1f}% (clean {clean:.1f}%, {config})",
                 abs(certified - TALK_BAGCERT["certified_5x5"]) <= POINTS,
                 f"within {POINTS:.0f} points")


def tight_gain(accuracy, configs, gains, params) -> Claim | None:
    config = best(accuracy, "bagcert")
    if config is None or gains is None:
        return None
    row = gains[(gains["config"] == config) & (gains["patch"] == "5x5")]
    if row.empty:
        return None
    gain = float(row["gain (points)"].iloc[0])
    return Claim("The tight condition certifies more than the global one (same model, 5x5)",
                 f"about +{TALK_TIGHT_GAIN:.0f} points", f"+{gain:.1f} points ({config})",
                 abs(gain - TALK_TIGHT_GAIN) <= GAIN_POINTS,
                 f"within {GAIN_POINTS} points")


def rf_growth(what: str, talk: dict[int, float], column: str, unit: Callable[[float], str]
              ) -> Check:
    def check(accuracy, configs, gains, params) -> Claim | None:
        sweep = rf_sweep(configs, params)
        shared = [rf for rf in sweep if rf in talk]
        if len(shared) < 2:
            return None
        low, high = shared[0], shared[-1]
        values = configs.set_index("config")[column]
        here = float(values[sweep[high]]) / float(values[sweep[low]])
        ratio = talk[high] / talk[low]
        return Claim(f"{what} grows with the receptive field (rf {low} to {high})",
                     f"{unit(talk[low])} to {unit(talk[high])}, x{ratio:.2f}",
                     f"{unit(float(values[sweep[low]]))} to {unit(float(values[sweep[high]]))}, "
                     f"x{here:.2f}", within_ratio(here, ratio), f"ratio within x{RATIO}")
    return check


def rf7_near_optimal(accuracy, configs, gains, params) -> Claim | None:
    sweep = rf_sweep(configs, params)
    if 7 not in sweep or len(sweep) < 2:
        return None
    squares = [p for p in dict.fromkeys(accuracy["patch"])
               if p.split("x")[0] == p.split("x")[1]]
    shortfall, where = 0.0, None
    for patch in squares:
        values = {rf: tight(accuracy, config, patch) for rf, config in sweep.items()}
        top = max(values, key=lambda rf: values[rf])
        if values[top] - values[7] > shortfall:
            shortfall, where = values[top] - values[7], (patch, top)
    here = (f"at most {shortfall:.2f} points behind the best rf"
            + (f" ({where[0]}: rf {where[1]})" if where else ""))
    return Claim("One configuration, rf 7, is close to optimal for every square patch size",
                 "yes", here, shortfall <= NEAR_OPTIMAL,
                 f"rf 7 at most {NEAR_OPTIMAL:.0f} points behind the best rf of the sweep")


def large_patches(accuracy, configs, gains, params) -> Claim | None:
    config = best(accuracy, "bagcert")
    if config is None:
        return None
    value = tight(accuracy, config, "10x10")
    if math.isnan(value):
        return None
    return Claim("BagCert certifies non-trivial accuracy up to 10x10 patches", "yes",
                 f"{value:.1f}% at 10x10 ({config})", value >= NON_TRIVIAL,
                 f"at least {NON_TRIVIAL:.0f}%")


def shape_range(accuracy: pd.DataFrame, config: str) -> float:
    """Largest minus smallest certified accuracy over the equal-area aspect series."""
    rows = accuracy[accuracy["config"] == config]
    areas = rows["patch"].map(lambda p: int(p.split("x")[0]) * int(p.split("x")[1]))
    series = rows.loc[areas.isin(EQUAL_AREA), "tight (%)"].dropna()
    return float(series.max() - series.min()) if len(series) >= 3 else math.nan


def shape_stability(accuracy, configs, gains, params) -> Claim | None:
    bagcert, column = best(accuracy, "bagcert"), best(accuracy, "ds-column")
    if bagcert is None or column is None:
        return None
    mine, theirs = shape_range(accuracy, bagcert), shape_range(accuracy, column)
    if math.isnan(mine) or math.isnan(theirs):
        return None
    return Claim("BagCert is stable across patch shapes, unlike column smoothing", "yes",
                 f"range over 1x24 ... 24x1: BagCert {mine:.1f} points, column {theirs:.1f}",
                 mine <= theirs / 2, "BagCert's range at most half of column smoothing's")


def block_robust(accuracy, configs, gains, params) -> Claim | None:
    block = best(accuracy, "ds-block")
    bands = [c for c in (best(accuracy, "ds-column"), best(accuracy, "ds-row")) if c]
    if block is None or not bands:
        return None
    mine = shape_range(accuracy, block)
    theirs = {c: shape_range(accuracy, c) for c in bands}
    if math.isnan(mine) or any(math.isnan(v) for v in theirs.values()):
        return None
    return Claim("Block smoothing is robust to non-square patches; band smoothing is not",
                 "yes", f"range over 1x24 ... 24x1: block {mine:.1f} points, "
                 + ", ".join(f"{c} {v:.1f}" for c, v in theirs.items()),
                 all(mine <= v / 2 for v in theirs.values()),
                 "block's range at most half of each band's")


def time_ratio(claim: str, slow: str, fast: str, talk: float) -> Check:
    def check(accuracy, configs, gains, params) -> Claim | None:
        a, b = best(accuracy, slow), best(accuracy, fast)
        if a is None or b is None:
            return None
        here = time_of(configs, a) / time_of(configs, b)
        if math.isnan(here):
            return None
        return Claim(claim, f"x{talk:.2f}", f"x{here:.2f} ({a} / {b})",
                     within_ratio(here, talk), f"ratio within x{RATIO}")
    return check


CHECKS: tuple[Check, ...] = (
    bagcert_headline,
    tight_gain,
    rf_growth("Certification time", TALK_RF_TIME, TIME, lambda s: f"{s:.1f} s"),
    rf_growth("The parameter count", TALK_RF_PARAMETERS, "parameters",
              lambda n: f"{n / 1e6:.2f}M"),
    rf7_near_optimal,
    large_patches,
    shape_stability,
    block_robust,
    time_ratio("Block smoothing certifies far slower than column smoothing", "ds-block",
               "ds-column", TALK_TIME["ds-block"] / TALK_TIME["ds-column"]),
    time_ratio("BagCert certifies a little slower than column smoothing", "bagcert",
               "ds-column", TALK_RF_TIME[7] / TALK_TIME["ds-column"]),
)
