"""The claims of the talk that started patchbench (BagCert, Metzen & Yatsura, ICLR 2021;
``shared/seed-slides-bagcert-iclr2021``), checked by the Fashion-MNIST study's report
(``[report] claims`` of ``fashion-mnist.toml``; the machinery is ``patchbench.reporting.claims``).

The talk measured on CIFAR-10 on a V100, so its numbers are shown beside this dataset's and
never judged; a verdict is given only on what a claim states (more, grows, slower, close to
optimal), by the rule in the table's last column. BagCert, smoothing and the others are each
represented by their configuration chosen on val; the receptive-field claims read the study's
sweep (``[report] sweep``: BagCert by ``rf``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from patchbench.reporting.claims import (
    NOT_COMPARED,
    Check,
    Claim,
    Inputs,
    bench_ratio,
    images,
    shape_range,
    value,
    verdict,
)
from patchbench.reporting.paired import p_text
from patchbench.reporting.stats import wilson

TITLE = "The talk's CIFAR-10 claims beside this dataset's numbers"
SOURCE = "talk (CIFAR-10)"
SUBJECT = "the talk's CIFAR-10 claims"
NOTE = ("Talk: BagCert, ICLR 2021 (CIFAR-10, V100). Each defense is represented by its "
        "configuration chosen on val. Numbers are not judged across datasets; accuracy "
        "comparisons use the exact McNemar test on the same images, speed comparisons the "
        "ratio of one `patchbench bench` run (its load average shown).")

# The talk's numbers (CIFAR-10; 10,000 images certified on one V100)
TALK_BAGCERT = {"clean": 86.0, "certified_5x5": 60.0}
TALK_TIGHT_GAIN = 3.0  # points of certified accuracy, same model
TALK_RF_TIME = {5: 39.0, 7: 40.6, 9: 43.2, 11: 45.9, 13: 48.5}  # seconds
TALK_RF_PARAMETERS = {5: 28e6, 7: 38e6, 9: 57e6, 11: 57e6, 13: 66e6}
TALK_TIME = {"ds-block": 788.0, "ds-column": 28.0}  # seconds, ResNet-18 base (11M)
EQUAL_AREA = (24, 25)  # patch areas of the aspect-ratio series 1x24 ... 5x5 ... 24x1

# the rules
FAR_SLOWER = 5.0  # "far slower": at least this many times the time
A_LITTLE = (1.0, 2.0)  # "a little slower": a time ratio above the first, at most the second
NON_TRIVIAL = 5.0  # certified accuracy (%) that counts as non-trivial (lower 95% bound)


def bagcert_headline(x: Inputs) -> Claim | None:
    config = x.chosen.get("bagcert")
    if config is None:
        return None
    certified = value(x.accuracy, config, "5x5")
    clean = float(x.accuracy.loc[x.accuracy["config"] == config, "clean (%)"].iloc[0])
    return Claim("BagCert: certified accuracy against 5x5 patches (tight)",
                 f"{TALK_BAGCERT['certified_5x5']:.0f}% (clean {TALK_BAGCERT['clean']:.0f}%)",
                 f"{certified:.1f}% (clean {clean:.1f}%, {config})", NOT_COMPARED, "–")


def tight_gain(x: Inputs) -> Claim | None:
    config = x.chosen.get("bagcert")
    if config is None or "global (%)" not in x.accuracy:
        return None
    tight_value = value(x.accuracy, config, "5x5")
    global_value = value(x.accuracy, config, "5x5", "global (%)")
    test = x.paired.compare((config, "5x5", "tight"), (config, "5x5", "global"))
    if math.isnan(tight_value) or math.isnan(global_value) or test is None:
        return None
    gain = tight_value - global_value
    return Claim("The tight condition certifies more than the global one (same model, 5x5)",
                 f"about +{TALK_TIGHT_GAIN:.0f} points",
                 f"+{gain:.1f} points, {p_text(test)} ({config})",
                 verdict(gain > 0 and test.significant),
                 "tight above global, significant (McNemar, 0.05)")


def rf_time_growth(x: Inputs) -> Claim | None:
    rfs = sorted(TALK_RF_TIME)
    low, high = rfs[0], rfs[-1]
    found = bench_ratio(x.bench, {"defense": "bagcert", "param_rf": high},
                        {"defense": "bagcert", "param_rf": low})
    if found is None:
        return None
    ratio, where = found
    talk = TALK_RF_TIME[high] / TALK_RF_TIME[low]
    return Claim(f"Certification time grows with the receptive field (rf {low} to {high})",
                 f"{TALK_RF_TIME[low]:.1f} s to {TALK_RF_TIME[high]:.1f} s, x{talk:.2f}",
                 f"x{ratio:.2f} ({where})", verdict(ratio > 1),
                 f"rf {high} slower than rf {low} in one benchmark run")


def rf_parameter_growth(x: Inputs) -> Claim | None:
    sweep = x.sweep
    shared = [rf for rf in sweep if rf in TALK_RF_PARAMETERS]
    if len(shared) < 2:
        return None
    low, high = shared[0], shared[-1]
    values = x.configs.set_index("config")["parameters"]
    here = float(values[sweep[high]]) / float(values[sweep[low]])
    talk = TALK_RF_PARAMETERS[high] / TALK_RF_PARAMETERS[low]
    return Claim(f"The parameter count grows with the receptive field (rf {low} to {high})",
                 f"{TALK_RF_PARAMETERS[low] / 1e6:.0f}M to {TALK_RF_PARAMETERS[high] / 1e6:.0f}M,"
                 f" x{talk:.2f}",
                 f"{int(values[sweep[low]]):,} to {int(values[sweep[high]]):,}, x{here:.2f}",
                 verdict(here > 1), "more parameters at the larger rf")


def rf7_near_optimal(x: Inputs) -> Claim | None:
    sweep = x.sweep
    if 7 not in sweep or len(sweep) < 2:
        return None
    squares = [p for p in dict.fromkeys(x.accuracy["patch"])
               if p.split("x")[0] == p.split("x")[1]]
    behind = []  # (patch, rf, points) where some rf beats rf 7 significantly
    for patch in squares:
        for rf, config in sweep.items():
            gap = value(x.accuracy, config, patch) - value(x.accuracy, sweep[7], patch)
            test = x.paired.compare((config, patch, "tight"), (sweep[7], patch, "tight"))
            if gap > 0 and test is not None and test.significant:
                behind.append((patch, rf, gap))
    here = ("never significantly behind another rf" if not behind else
            "significantly behind at " + ", ".join(f"{p} (rf {rf}, {g:.1f} points)"
                                                    for p, rf, g in behind))
    return Claim("One configuration, rf 7, is close to optimal for every square patch size",
                 "yes", f"{here} (test, rf {', '.join(map(str, sweep))})", verdict(not behind),
                 "no rf of the sweep certifies significantly more than rf 7 at any square "
                 "patch (McNemar, 0.05)")


def large_patches(x: Inputs) -> Claim | None:
    config = x.chosen.get("bagcert")
    if config is None:
        return None
    certified = value(x.accuracy, config, "10x10")
    n = images(x.accuracy, config, "10x10")
    if math.isnan(certified) or not n:
        return None
    low = 100 * wilson(round(certified / 100 * n), n)[0]
    return Claim("BagCert certifies non-trivial accuracy up to 10x10 patches", "yes",
                 f"{certified:.1f}% at 10x10, lower 95% bound {low:.1f}% ({config})",
                 verdict(low >= NON_TRIVIAL),
                 f"the lower 95% bound at least {NON_TRIVIAL:.0f}%")


def shape_stability(x: Inputs) -> Claim | None:
    bagcert, column = x.chosen.get("bagcert"), x.chosen.get("ds-column")
    if bagcert is None or column is None:
        return None
    mine = shape_range(x.accuracy, bagcert, EQUAL_AREA)
    theirs = shape_range(x.accuracy, column, EQUAL_AREA)
    if math.isnan(mine) or math.isnan(theirs):
        return None
    return Claim("BagCert is stable across patch shapes, unlike column smoothing", "yes",
                 f"range over 1x24 ... 24x1: BagCert {mine:.1f} points, column {theirs:.1f}",
                 verdict(mine <= theirs / 2), "BagCert's range at most half of column "
                 "smoothing's")


def block_robust(x: Inputs) -> Claim | None:
    block = x.chosen.get("ds-block")
    bands = [c for c in (x.chosen.get("ds-column"), x.chosen.get("ds-row")) if c]
    if block is None or not bands:
        return None
    mine = shape_range(x.accuracy, block, EQUAL_AREA)
    theirs = {c: shape_range(x.accuracy, c, EQUAL_AREA) for c in bands}
    if math.isnan(mine) or any(math.isnan(v) for v in theirs.values()):
        return None
    return Claim("Block smoothing is robust to non-square patches; band smoothing is not",
                 "yes", f"range over 1x24 ... 24x1: block {mine:.1f} points, "
                 + ", ".join(f"{c} {v:.1f}" for c, v in theirs.items()),
                 verdict(all(mine <= v / 2 for v in theirs.values())),
                 "block's range at most half of each band's")


def time_ratio(claim: str, slow: str, fast: str, talk: float,
               holds: Callable[[float], bool], rule: str) -> Check:
    def check(x: Inputs) -> Claim | None:
        found = bench_ratio(x.bench, {"defense": slow}, {"defense": fast})
        if found is None:
            return None
        ratio, where = found
        return Claim(claim, f"x{talk:.2f}", f"x{ratio:.2f} ({slow} / {fast}; {where})",
                     verdict(holds(ratio)), rule)
    return check


CHECKS: tuple[Check, ...] = (
    bagcert_headline,
    tight_gain,
    rf_time_growth,
    rf_parameter_growth,
    rf7_near_optimal,
    large_patches,
    shape_stability,
    block_robust,
    time_ratio("Block smoothing certifies far slower than column smoothing", "ds-block",
               "ds-column", TALK_TIME["ds-block"] / TALK_TIME["ds-column"],
               lambda r: r >= FAR_SLOWER, f"at least x{FAR_SLOWER:g} in one benchmark run"),
    time_ratio("BagCert certifies a little slower than column smoothing", "bagcert",
               "ds-column", TALK_RF_TIME[7] / TALK_TIME["ds-column"],
               lambda r: A_LITTLE[0] < r <= A_LITTLE[1],
               f"above x{A_LITTLE[0]:g}, at most x{A_LITTLE[1]:g}, in one benchmark run"),
)
