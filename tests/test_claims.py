"""The talk's claims (``studies/bagcert_talk.py``, the Fashion-MNIST study's claims file)
beside report tables, through the claims machinery: each rule on both sides of its line.

The frames are built by hand from per-image outcomes (the first k of 200 images correct, the
first k certified), so every accuracy in the accuracy table agrees with the per-image flags the
paired tests read, and two configurations' flags are nested: McNemar sees |k1 - k2| discordant
images, all on one side (p = 2 / 2**d; significant at 0.05 from d = 6 on). Speeds come only from
benchmark rows of one run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from patchbench.reporting.claims import (
    FAILS,
    HOLDS,
    NOT_COMPARED,
    ClaimsError,
    claims_sentence,
    claims_table,
    load_claims,
)
from patchbench.reporting.paired import PairedTests
from patchbench.reporting.stats import wilson
from patchbench.reporting.tables import TIME, SweepSpec, sweep_configs

STUDIES = Path(__file__).resolve().parent.parent / "studies"
TALK = load_claims(STUDIES / "bagcert_talk.py")
TALK_BAGCERT = {"clean": 86.0, "certified_5x5": 60.0}  # the talk's, as the claims file has it
SWEEP = SweepSpec("bagcert", "rf")

N = 200  # images of every configuration
SERIES = ("1x24", "2x12", "5x5", "12x2", "24x1")  # the equal-area aspect series
HEADLINE = "BagCert: certified accuracy against 5x5 patches (tight)"
TIGHT = "The tight condition certifies more than the global one (same model, 5x5)"
RF_TIME = "Certification time grows with the receptive field (rf 5 to 13)"
RF_PARAMETERS = "The parameter count grows with the receptive field (rf 5 to 9)"
RF7 = "One configuration, rf 7, is close to optimal for every square patch size"
LARGE = "BagCert certifies non-trivial accuracy up to 10x10 patches"
STABLE = "BagCert is stable across patch shapes, unlike column smoothing"
BLOCK = "Block smoothing is robust to non-square patches; band smoothing is not"
BLOCK_TIME = "Block smoothing certifies far slower than column smoothing"
BAGCERT_TIME = "BagCert certifies a little slower than column smoothing"


@dataclass
class Config:
    """A configuration's outcome on the N images: the first ``clean`` are correct, the first
    ``tight[p]`` (``global_[p]``) are certified at patch p."""

    key: str
    defense: str
    params: dict
    clean: int
    tight: dict[str, int]
    global_: dict[str, int] = field(default_factory=dict)
    parameters: int = 1000
    seconds: float = 10.0


def bagcert(rf: int, tight: dict[str, int], **kwargs) -> Config:
    return Config(f"b{rf}", "bagcert", {"rf": rf, "width": 8}, 170, tight, **kwargs)


def series(value: int, **at: int) -> dict[str, int]:
    return {**dict.fromkeys(SERIES, value), **{p[1:].replace("_", "x"): v for p, v in at.items()}}


def default_configs() -> dict[str, Config]:
    """BagCert rf 5, 7 (chosen) and 9, column and block smoothing."""
    return {
        "b5": bagcert(5, {**series(80, _5_5=100), "3x3": 120, "10x10": 30}, parameters=1000),
        "b7": bagcert(7, {**series(80, _5_5=110), "3x3": 125, "10x10": 30},
                      global_={"5x5": 100}, parameters=2000),
        "b9": bagcert(9, {**series(80, _5_5=108), "3x3": 124, "10x10": 28}, parameters=3000),
        "col": Config("col", "ds-column", {"ablation_size": 4}, 160,
                      {"1x24": 0, "2x12": 10, "5x5": 90, "12x2": 120, "24x1": 130}),
        "blk": Config("blk", "ds-block", {"ablation_size": 10}, 150, series(70, _5_5=75)),
    }


CHOSEN = {"bagcert": "b7", "ds-column": "col", "ds-block": "blk"}


def flags(first: int) -> np.ndarray:
    return np.arange(N) < first


def per_image_table(config: Config) -> pd.DataFrame:
    labels = np.arange(N) % 4
    frame = {"index": np.arange(N), "label": labels,
             "prediction": np.where(flags(config.clean), labels, (labels + 1) % 4)}
    for condition, counts in (("tight", config.tight), ("global", config.global_)):
        for patch, k in counts.items():
            frame[f"margin_{condition}_{patch}"] = np.where(flags(k), 1, -1)
    return pd.DataFrame(frame)


@dataclass
class Frames:
    accuracy: pd.DataFrame
    configs: pd.DataFrame
    params: dict[str, dict]
    chosen: dict[tuple[str, str], str]
    paired: PairedTests

    def table(self, bench: pd.DataFrame | None = None):
        return claims_table(TALK, self.accuracy, self.configs, self.params, self.chosen,
                            self.paired, bench, {"d": sweep_configs(self.configs, self.params,
                                                                    SWEEP)})

    def verdicts(self, bench: pd.DataFrame | None = None) -> dict[str, tuple[str, str]]:
        table = self.table(bench)
        return {} if table is None else {
            row["claim"]: (row["here"], row["verdict"]) for row in table.frame.to_dict("records")}


def frames(configs: dict[str, Config] | None = None,
           chosen: dict[str, str] | None = None) -> Frames:
    """The report's frames (percent) of ``configs`` on dataset "d"; labels are the keys."""
    configs = default_configs() if configs is None else configs
    records, certified = [], []
    for c in configs.values():
        for patch in dict.fromkeys([*c.tight, *c.global_]):
            records.append({"dataset": "d", "defense": c.defense, "config": c.key,
                            "patch": patch, "images": N, "clean (%)": 100 * c.clean / N,
                            "tight (%)": 100 * c.tight[patch] / N if patch in c.tight
                            else np.nan,
                            "global (%)": 100 * c.global_[patch] / N if patch in c.global_
                            else np.nan})
            certified += [{"config": c.key, "patch": patch, "condition": cond,
                           "cell_key": c.key} for cond, counts in (("tight", c.tight),
                                                                    ("global", c.global_))
                          if patch in counts]
    accuracy = pd.DataFrame(records)
    if accuracy["global (%)"].isna().all():
        accuracy = accuracy.drop(columns="global (%)")
    table = pd.DataFrame({
        "key": [c.key for c in configs.values()], "dataset": "d",
        "config": [c.key for c in configs.values()],
        "defense": [c.defense for c in configs.values()],
        TIME: [c.seconds for c in configs.values()],
        "parameters": [c.parameters for c in configs.values()]})
    tables = {c.key: per_image_table(c) for c in configs.values()}
    paired = PairedTests(pd.DataFrame(certified), tables.get)
    chosen = CHOSEN if chosen is None else chosen
    return Frames(accuracy, table, {c.key: c.params for c in configs.values()},
                  {("d", d): k for d, k in chosen.items() if k in configs}, paired)


def bench(*runs: dict[str, float], batch: int = 32, shapes: int = 20) -> pd.DataFrame:
    """Benchmark rows (median images per second), one run per mapping of defense (or
    "bagcert rf=<r>") to its throughput."""
    rows = []
    for i, run in enumerate(runs):
        for name, value in run.items():
            defense, _, rf = name.partition(" rf=")
            rows.append({"run_id": f"run{i}" + "0" * 12, "timestamp": f"2026-01-0{i + 1}",
                         "metric": "images_per_second", "statistic": "median",
                         "defense": defense, "param_rf": float(rf) if rf else np.nan,
                         "batch_size": batch, "n_patch_shapes": shapes, "value": value,
                         "device": "cpu", "load_average": 0.5})
    return pd.DataFrame(rows)


def test_the_sweep_is_the_group_that_differs_only_in_its_parameter():
    x = frames()
    assert sweep_configs(x.configs, x.params, SWEEP) == {5: "b5", 7: "b7", 9: "b9"}
    other = {**x.params, "b9": {"rf": 9, "width": 16}}  # another width: not the same recipe
    assert sweep_configs(x.configs, other, SWEEP) == {5: "b5", 7: "b7"}
    one = x.configs[x.configs["key"] == "b5"]
    assert sweep_configs(one, x.params, SWEEP) == {}  # one rf
    assert sweep_configs(x.configs, x.params, SweepSpec("ds-column", "rf")) == {}


def test_a_claims_file_must_load_and_define_the_contract(tmp_path: Path):
    assert TALK.source == "talk (CIFAR-10)" and len(TALK.checks) == 10
    missing = tmp_path / "claims.py"
    missing.write_text("TITLE = 'x'\nCHECKS = ()\n")
    with pytest.raises(ClaimsError, match="does not define SOURCE, NOTE"):
        load_claims(missing)
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module\n")
    with pytest.raises(ClaimsError, match="fails to load: ModuleNotFoundError"):
        load_claims(broken)
    with pytest.raises(ClaimsError, match="no claims file"):
        load_claims(tmp_path / "absent.py")


def test_the_headline_number_is_shown_never_judged():
    for value in (120, 60):  # 60% (the talk's number) or 30%: no verdict either way
        configs = default_configs()
        configs["b7"].tight["5x5"] = value
        here, verdict = frames(configs).verdicts()[HEADLINE]
        assert verdict == NOT_COMPARED == "not compared: another dataset"
        assert here == f"{100 * value / N:.1f}% (clean 85.0%, b7)"
    table = frames().table()
    row = table.frame.set_index("claim").loc[HEADLINE]
    assert row["talk (CIFAR-10)"] == (f"{TALK_BAGCERT['certified_5x5']:.0f}% "
                                      f"(clean {TALK_BAGCERT['clean']:.0f}%)")


@pytest.mark.parametrize(("global_5x5", "verdict", "p"), [
    (100, HOLDS, "p = 0.002"),  # 10 images certified only under tight: 2 / 2**10
    (107, FAILS, "p = 0.250"),  # 3 of them: a gain, but inside the noise
])
def test_the_tight_gain_holds_only_when_significant(global_5x5: int, verdict: str, p: str):
    configs = default_configs()
    configs["b7"].global_["5x5"] = global_5x5
    here, found = frames(configs).verdicts()[TIGHT]
    assert found == verdict
    assert here == f"+{100 * (110 - global_5x5) / N:.1f} points, {p} (b7)"


def test_the_tight_gain_is_the_chosen_configurations():
    configs = default_configs()
    configs["b5"].global_ = {"5x5": 99}  # b5 gains one image, b7 ten
    assert frames(configs).verdicts()[TIGHT] == ("+5.0 points, p = 0.002 (b7)", HOLDS)
    assert frames(configs, {**CHOSEN, "bagcert": "b5"}).verdicts()[TIGHT] == (
        "+0.5 points, p = 1.000 (b5)", FAILS)


@pytest.mark.parametrize(("rf5_10x10", "verdict"), [
    (40, FAILS),  # rf 5 certifies 10 more images at 10x10: significantly ahead of rf 7
    (33, HOLDS),  # 3 more: tied
])
def test_rf7_is_near_optimal_unless_significantly_behind(rf5_10x10: int, verdict: str):
    configs = default_configs()
    configs["b5"].tight["10x10"] = rf5_10x10
    here, found = frames(configs).verdicts()[RF7]
    assert found == verdict
    if verdict == FAILS:
        assert here.startswith("significantly behind at 10x10 (rf 5, 5.0 points)")
    else:
        assert here.startswith("never significantly behind another rf")
    assert here.endswith("(test, rf 5, 7, 9)")


def test_parameters_grow_with_rf_or_not():
    x = frames()
    assert x.verdicts()[RF_PARAMETERS] == ("1,000 to 3,000, x3.00", HOLDS)
    configs = default_configs()
    configs["b9"].parameters = 500
    assert frames(configs).verdicts()[RF_PARAMETERS] == ("1,000 to 500, x0.50", FAILS)


@pytest.mark.parametrize(("at_10x10", "verdict"), [(30, HOLDS), (8, FAILS)])
def test_large_patches_need_a_lower_bound_of_five_percent(at_10x10: int, verdict: str):
    configs = default_configs()
    configs["b7"].tight["10x10"] = at_10x10
    here, found = frames(configs).verdicts()[LARGE]
    low = 100 * wilson(at_10x10, N)[0]
    assert (low >= 5) == (verdict == HOLDS)
    assert found == verdict
    assert here == f"{100 * at_10x10 / N:.1f}% at 10x10, lower 95% bound {low:.1f}% (b7)"


def test_shape_stability_compares_ranges_over_the_aspect_series():
    x = frames()
    # BagCert 80..110 (15 points), column 0..130 (65 points), block 70..75
    assert x.verdicts()[STABLE] == ("range over 1x24 ... 24x1: BagCert 15.0 points, column "
                                    "65.0", HOLDS)
    assert x.verdicts()[BLOCK] == ("range over 1x24 ... 24x1: block 2.5 points, col 65.0",
                                   HOLDS)
    configs = default_configs()
    configs["col"].tight = series(100, _1_24=90)  # column nearly flat: 5 points
    verdicts = frames(configs).verdicts()
    assert verdicts[STABLE][1] == FAILS and verdicts[BLOCK][1] == HOLDS  # 2.5 <= 2.5
    configs["blk"].tight = series(70, _24_1=40)  # block 15 points
    assert frames(configs).verdicts()[BLOCK][1] == FAILS


@pytest.mark.parametrize(("block", "column", "verdict"), [
    (10.0, 300.0, HOLDS),  # x30 in one run
    (100.0, 300.0, FAILS),  # x3
])
def test_block_versus_column_time_comes_from_one_bench_run(block: float, column: float,
                                                          verdict: str):
    x = frames()
    here, found = x.verdicts(bench({"ds-block": block, "ds-column": column}))[BLOCK_TIME]
    assert found == verdict
    assert here.startswith(f"x{column / block:.2f} (ds-block / ds-column; bench run run0")
    assert "batch 32, 20 shapes, cpu, load 0.5" in here


def test_no_speed_claim_without_a_run_that_timed_both():
    x = frames()
    # the configurations table says block is 140x slower, but those are separate runs
    configs = x.configs.copy()
    configs.loc[configs["key"] == "blk", TIME] = 1400.0
    separate = bench({"ds-block": 10.0, "bagcert rf=5": 200.0}, {"ds-column": 300.0},
                     {"bagcert rf=13": 100.0})
    for rows in (None, pd.DataFrame(), separate):
        found = Frames(x.accuracy, configs, x.params, x.chosen, x.paired).verdicts(rows)
        assert not {BLOCK_TIME, BAGCERT_TIME, RF_TIME} & set(found)


def test_the_newest_shared_run_is_used():
    x = frames()
    rows = bench({"ds-block": 100.0, "ds-column": 300.0}, {"ds-block": 10.0, "ds-column": 300.0})
    here, verdict = x.verdicts(rows)[BLOCK_TIME]
    assert verdict == HOLDS and "bench run run1" in here
    # a newer run that timed only one of them does not count
    rows = bench({"ds-block": 10.0, "ds-column": 300.0}, {"ds-block": 100.0})
    here, verdict = x.verdicts(rows)[BLOCK_TIME]
    assert verdict == HOLDS and here.startswith("x30.00 (ds-block / ds-column; bench run run0")


@pytest.mark.parametrize(("rf5", "rf13", "verdict"), [(300.0, 100.0, HOLDS),
                                                      (100.0, 300.0, FAILS)])
def test_rf_time_growth_from_one_bench_run(rf5: float, rf13: float, verdict: str):
    x = frames()
    here, found = x.verdicts(bench({"bagcert rf=5": rf5, "bagcert rf=13": rf13}))[RF_TIME]
    assert found == verdict and here.startswith(f"x{rf5 / rf13:.2f} (bench run run0")


@pytest.mark.parametrize(("bagcert_ips", "verdict"), [(200.0, HOLDS), (100.0, FAILS),
                                                      (400.0, FAILS)])
def test_bagcert_a_little_slower_than_column(bagcert_ips: float, verdict: str):
    """x1.5 is a little slower; x3 is not a little; x0.75 is faster."""
    found = frames().verdicts(bench({"bagcert": bagcert_ips, "ds-column": 300.0}))
    assert found[BAGCERT_TIME][1] == verdict


def test_claims_without_their_inputs_are_left_out():
    x = frames()
    only_bagcert = x.accuracy[x.accuracy["defense"] == "bagcert"]
    claims = set(claims_table(TALK, only_bagcert, x.configs, x.params, x.chosen, x.paired,
                              sweeps={"d": sweep_configs(x.configs, x.params, SWEEP)})
                 .frame["claim"])
    assert {STABLE, BLOCK} & claims == set()  # their smoothing rows are not in the table
    assert {HEADLINE, TIGHT, RF7, LARGE} <= claims
    not_chosen = frames(chosen={})  # nothing chosen on val: no claim about a chosen one
    assert {HEADLINE, TIGHT, LARGE, STABLE, BLOCK} & set(not_chosen.verdicts()) == set()
    assert claims_table(TALK, x.accuracy[x.accuracy["defense"] == "ds-row"], x.configs,
                        x.params, x.chosen, x.paired) is None


def test_the_summary_counts_verdicts_and_names_what_does_not_hold():
    configs = default_configs()
    configs["b7"].tight["10x10"] = 8  # large patches: does not hold
    table = frames(configs).table()
    frame = table.frame
    judged = frame[frame["verdict"].isin([HOLDS, FAILS])]
    assert (frame["verdict"] == NOT_COMPARED).sum() == 1
    sentence = claims_sentence(TALK, table)
    assert sentence.startswith(
        "Of the talk's CIFAR-10 claims that state something checkable here, "
        f"{(judged['verdict'] == HOLDS).sum()} of {len(judged)} hold on d "
        f"({len(frame) - len(judged)} more is shown")
    assert sentence.count("; these do not: ") == 1
    assert f"{LARGE} (talk (CIFAR-10): yes; here: 4.0% at 10x10, lower 95% bound" in sentence
    everything = claims_sentence(TALK, frames().table())
    assert "these do not" not in everything and everything.endswith(".")
