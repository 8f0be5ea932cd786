"""``patchbench report``: a results folder made by real (tiny) runs in; Markdown, CSV, LaTeX and
PNG out, every number traceable to the rows, and one-line errors for bad folders and filters.

Two tiny models are trained and certified once for the module (BagCert rf 5 and column
smoothing, 64 synthetic images). Tiny models learn little (they are at or below chance), so a
hand-made cell (BagCert rf 7, distinct numbers, an unknown checkpoint) with a per-image table
that agrees with its rows, and attack rows for it, are added beside them: they exercise the
receptive-field sweep, the tight-vs-global gains, the certified-vs-attacked table and the
gallery's "checkpoint not found" note. Val rows of both BagCert configurations (two study
folders under ``validation/``) let the rule choose rf 7; column smoothing has none, so it is
"not chosen on val". The certified-vs-attacked comparison on a subset of the certified images
gets its own folder: an accurate BagCert model (trained on 12 x 12 stripes in seconds)
certified on 48 images and attacked on the first 16.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image

from patchbench.cli import cli
from patchbench.defense import get_defense
from patchbench.patches import PatchShape
from patchbench.reporting.gallery import axis_intervals, worst_footprint
from patchbench.reporting.report import slug
from patchbench.reporting.stats import mcnemar, wilson
from patchbench.running.checkpoint import save_checkpoint
from patchbench.running.data import SYNTHETIC_CLASSES, ImageData, TensorImages, make_stripes
from patchbench.running.train import TrainConfig, train

PATCHES = "3x3,5x5,2x12,12x2"
IMAGES = 64  # the test images every cell of ``built`` certifies
TINY = ["--dataset", "synthetic", "--n-images", str(IMAGES), "--width", "8", "--epochs", "1",
        "--max-train-images", "256", "--hold-out-val", "no", "--train-precision", "fp32",
        "--device", "cpu"]
CERTIFIED_IMAGES, ATTACKED = 48, 16  # the accurate model: certified on 48, attacked on 16
ATTACK_PATCHES = ("12x12", "18x18")  # it certifies some images at 12 x 12, none at 18 x 18
ATTACK_BUDGET = ["--steps", "3", "--restarts", "1", "--position-stride", "28",
                 "--worst-positions", "3"]
CRAFTED_CORRECT = 40  # of the 64 images, the hand-made rf 7 cell classifies the first 40 right
CRAFTED = {  # patch -> images (of 64) correct and certified tight, global; correct, not broken
    "3x3": (32, 28, 36), "5x5": (26, 19, 29), "2x12": (16, 12, 26), "12x2": (24, 13, 27)}
UNKNOWN_SHA = "f" * 64
# Labels (labels.config_label): the naming parameters always, then what differs from the
# defense's defaults (width 8, one epoch on 256 images, val not held out), then the training
# precision
RECIPE = "width=8 epochs=1 max_images=256 hold_out_val=no train_precision=fp32"
RF5, RF7 = f"bagcert rf=5 {RECIPE}", f"bagcert rf=7 {RECIPE}"
COLUMN = f"ds-column ablation_size=4 threshold=0.2 {RECIPE}"
ACCURATE = ("bagcert rf=5 cell_loss=ce lr=0.003 patch_max=3 patch_min=1 width=8 "
            "hold_out_val=no train_precision=fp32")
VAL = {5: (0.30, 0.02), 7: (0.60, 0.35)}  # rf -> val clean, certified (5x5 tight): rf 7 wins


def pct(count: int, n: int = IMAGES) -> float:
    return 100 * count / n


# the Fashion-MNIST study's [report]: the receptive-field sweep and the talk's claims
STUDY = ("--study", str(Path(__file__).resolve().parent.parent / "studies" / "fashion-mnist.toml"))


def invoke(*args: str, cache: Path | None = None) -> Result:
    env = {"COLUMNS": "200", **({"PATCHBENCH_CACHE": str(cache)} if cache else {})}
    return CliRunner().invoke(cli, list(args), env=env)


def assert_one_line_error(result: Result, fragment: str) -> None:
    escaped = result.exception if not isinstance(result.exception, SystemExit) else None
    assert escaped is None, f"uncaught {type(escaped).__name__}: {escaped}"
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    assert fragment in lines[0], lines[0]


@dataclass(frozen=True)
class Built:
    results: Path
    out: Path
    result: Result
    rows: pd.DataFrame  # every rows file of the results folder, as written


def read_all_rows(results: Path) -> pd.DataFrame:
    return pd.concat([pd.read_csv(p) for p in sorted((results / "rows").glob("*.csv"))],
                     ignore_index=True)


def labels_of(results: Path, cell: str) -> pd.Series:
    return pd.read_csv(results / "per_image" / f"{cell}.csv.gz")["label"]


def crafted_table(labels: pd.Series, cell: str, correct: dict[str, int],
                  flags: dict[tuple[str, str], int], margins: bool = True) -> pd.DataFrame:
    """A per-image table (per_image.py's columns) whose first ``correct[patch]`` images are
    classified right and whose first ``flags[condition, patch]`` are certified: margins
    (+1 / -1) for vote maps, 0/1 flags otherwise; one prediction column when it is the same
    for every patch (``correct`` with one entry under ``""``)."""
    n = len(labels)
    first = np.arange(n)
    wrong = (labels.to_numpy() + 1) % len(SYNTHETIC_CLASSES)
    frame: dict[str, object] = {"index": first, "label": labels.to_numpy()}
    for patch, k in correct.items():
        frame[f"prediction_{patch}" if patch else "prediction"] = np.where(
            first < k, labels.to_numpy(), wrong)
    for (condition, patch), k in flags.items():
        kind = "margin" if margins else "certified"
        frame[f"{kind}_{condition}_{patch}"] = (np.where(first < k, 1, -1) if margins
                                                else (first < k).astype(int))
    return pd.DataFrame(frame).assign(cell=cell)


def add_crafted_cell(results: Path) -> None:
    """A BagCert rf 7 cell copied from the real rf 5 one with other numbers, its per-image
    table agreeing with them (the real cell's labels), plus attack rows for it laid out as
    ``patchbench attack`` writes them (``metric`` = empirical, no condition) on the same 64
    images, without a per-image table; the real certification files keep having no
    ``metric`` column."""
    real = read_all_rows(results)
    rows = real[real["defense"] == "bagcert"].copy()
    params = json.loads(rows["params"].iloc[0])
    certified = [CRAFTED[p][0 if c == "tight" else 1]
                 for p, c in zip(rows["patch"], rows["condition"], strict=True)]
    rows = rows.assign(params=json.dumps({**params, "rf": 7}, sort_keys=True), param_rf=7,
                       cell="crafted", checkpoint_sha256=UNKNOWN_SHA, n_parameters=123456,
                       certify_seconds=2.0, forward_seconds=1.5, n_correct=CRAFTED_CORRECT,
                       clean_accuracy=CRAFTED_CORRECT / IMAGES, metric="certified",
                       n_certified=certified,
                       certified_accuracy=[k / IMAGES for k in certified])
    rows.to_csv(results / "rows" / "crafted.csv", index=False)
    table = crafted_table(labels_of(results, real.loc[real["defense"] == "bagcert", "cell"]
                                    .iloc[0]), "crafted", {"": CRAFTED_CORRECT},
                          {(c, p): counts[i] for p, counts in CRAFTED.items()
                           for i, c in enumerate(("tight", "global"))})
    table.to_csv(results / "per_image" / "crafted.csv.gz", index=False)
    tight = rows[rows["condition"] == "tight"]
    attack = tight.drop(columns=["condition", "certified_accuracy", "n_certified",
                                 "certify_seconds", "forward_seconds", "train_config"]).assign(
        metric="empirical", cell="crafted-attack",
        empirical_accuracy=[CRAFTED[p][2] / IMAGES for p in tight["patch"]],
        certified_accuracy_tight=[CRAFTED[p][0] / IMAGES for p in tight["patch"]],
        certified_accuracy_global=[CRAFTED[p][1] / IMAGES for p in tight["patch"]],
        n_attacked=40, n_violations=0, attack_steps=10, attack_restarts=2)
    attack.to_csv(results / "rows" / "crafted-attack.csv", index=False)


def write_val_rows(folder: Path, rows: pd.DataFrame, clean: float, certified: float,
                   n: int = 100) -> None:
    """``rows`` (test certification rows of one configuration) as the val rows of a selection
    study in ``folder``: the same model and settings, other images and accuracies."""
    (folder / "rows").mkdir(parents=True, exist_ok=True)
    rows.assign(split="val", cell=f"val-{folder.name}", n_images=n,
                n_correct=round(clean * n), n_certified=round(certified * n),
                clean_accuracy=clean, certified_accuracy=certified).to_csv(
        folder / "rows" / "val.csv", index=False)


def add_val_rows(results: Path) -> None:
    """Val rows of BagCert rf 5 and rf 7, one study folder each; the rule picks rf 7."""
    rows = read_all_rows(results)
    bagcert = rows[(rows["defense"] == "bagcert") & (rows["metric"].fillna("certified")
                                                     == "certified")]
    for rf, (clean, certified) in VAL.items():
        write_val_rows(results / "validation" / f"bagcert-rf{rf}",
                       bagcert[bagcert["param_rf"] == rf], clean, certified)


def add_failed_cell(results: Path) -> None:
    """A failure record as the sweep leaves it for a cell that raised (no rows)."""
    record = {"cell": "deadbeef", "identity": {"defense": "ds-row", "dataset": "synthetic"},
              "reason": "RuntimeError: out of memory\nmore", "traceback": "",
              "host": "here", "timestamp": "2026-01-01T00:00:00+00:00"}
    (results / "failed").mkdir(exist_ok=True)
    (results / "failed" / "deadbeef.json").write_text(json.dumps(record))


STALE_GALLERY = "gallery_9_a-config-no-longer-here.png"


# slow: trains and certifies tiny models, then builds reports
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("report")
    results, cache, out = root / "results", root / "cache", root / "reports"
    for defense, extra in (("bagcert", ["--rf", "5"]),
                           ("ds-column", ["--ablation-size", "4", "--threshold", "0.2"])):
        run = invoke("run", "--defense", defense, "--patch", PATCHES, *TINY, *extra,
                     "--results-dir", str(results), cache=cache)
        assert run.exit_code == 0, run.output
    add_crafted_cell(results)
    add_val_rows(results)
    add_failed_cell(results)
    (out / "figures").mkdir(parents=True)
    (out / "figures" / STALE_GALLERY).write_bytes(b"left by an older report")
    result = invoke("report", "--results-dir", str(results), "--out", str(out), *STUDY,
                    cache=cache)
    return Built(results, out, result, read_all_rows(results))


def table(built: Built, name: str) -> pd.DataFrame:
    return pd.read_csv(built.out / "tables" / f"{name}.csv")


def test_report_writes_markdown_figures_and_tables(built: Built) -> None:
    assert built.result.exit_code == 0, built.result.output
    report = built.out / "report.md"
    assert built.result.output.strip() == str(report)
    text = report.read_text()
    for name in (RF5, RF7, COLUMN):
        assert name in text
    for section in ("## Findings", "## Headline", "## The talk's CIFAR-10 claims",
                    "## Certified accuracy", "## Patch shapes", "## Receptive-field sweep",
                    "## Tight vs global", "## Certification time vs parameters",
                    "## Certified vs attacked", "## Gallery"):
        assert section in text
    assert "Soundness violation" not in text
    linked = re.findall(r"\]\((figures/[^)]+\.png)\)", text)
    assert {"figures/certified_vs_patch_size.png", "figures/patch_shapes.png",
            "figures/time_vs_parameters.png", "figures/certified_vs_attacked.png"} <= set(linked)
    assert len([p for p in linked if "gallery" in p]) == 2  # rf 7 has no checkpoint
    assert not (built.out / "figures" / STALE_GALLERY).exists()
    for path in linked:
        with Image.open(built.out / path) as image:
            assert image.format == "PNG" and min(image.size) > 100
            image.verify()
    for name in ("accuracy", "configurations", "rf_sweep", "tight_vs_global", "gallery",
                 "certified_vs_attacked", "headline", "claims"):
        assert f"(tables/{name}.csv)" in text
        tex = (built.out / "tables" / f"{name}.tex").read_text()
        assert tex.startswith("\\begin{tabular}") and "\\bottomrule" in tex


def label_of(row) -> str:
    """The label a row's configuration must get (module constants, written out by hand)."""
    if row.defense != "bagcert":
        return COLUMN
    return {5: RF5, 7: RF7}[json.loads(row.params)["rf"]]


def test_accuracy_table_matches_the_rows(built: Built) -> None:
    accuracy = table(built, "accuracy")
    assert len(accuracy) == 3 * 4  # three configurations, four shapes; no attack row
    assert "empirical (%)" not in accuracy
    certified = built.rows[built.rows["metric"].fillna("certified") == "certified"]
    for row in certified.itertuples():
        mine = accuracy[(accuracy["config"] == label_of(row)) & (accuracy["patch"] == row.patch)]
        assert len(mine) == 1
        assert mine[f"{row.condition} (%)"].iloc[0] == pytest.approx(
            100 * row.certified_accuracy)
        assert mine["clean (%)"].iloc[0] == pytest.approx(100 * row.clean_accuracy)


def test_accuracies_carry_their_wilson_intervals(built: Built) -> None:
    """Each accuracy of the accuracy and headline CSVs has ``<col> low`` / ``<col> high``
    columns: 100 x the Wilson interval of the rows' own counts; Markdown shows the bracket."""
    accuracy = table(built, "accuracy")
    certified = built.rows[built.rows["metric"].fillna("certified") == "certified"]
    checked = 0
    for row in certified.itertuples():
        mine = accuracy[(accuracy["config"] == label_of(row))
                        & (accuracy["patch"] == row.patch)].iloc[0]
        for name, count in ((f"{row.condition} (%)", row.n_certified),
                            ("clean (%)", row.n_correct)):
            low, high = wilson(int(count), int(row.n_images))
            assert mine[f"{name} low"] == pytest.approx(100 * low, abs=1e-9)
            assert mine[f"{name} high"] == pytest.approx(100 * high, abs=1e-9)
            checked += 1
    assert checked == 2 * len(certified)
    columns = list(accuracy.columns)
    at = columns.index("tight (%)")
    assert columns[at + 1:at + 3] == ["tight (%) low", "tight (%) high"]

    headline = table(built, "headline").iloc[0]
    assert headline["config"] == RF7
    tight = CRAFTED["5x5"][0]
    assert (headline["5x5 tight (%) low"], headline["5x5 tight (%) high"]) == pytest.approx(
        tuple(100 * b for b in wilson(tight, IMAGES)))
    assert (headline["clean (%) low"], headline["clean (%) high"]) == pytest.approx(
        tuple(100 * b for b in wilson(CRAFTED_CORRECT, IMAGES)))
    low, high = wilson(tight, IMAGES)
    bracket = f"{pct(tight):.1f} [{100 * low:.1f}, {100 * high:.1f}]"
    assert bracket == "40.6 [29.5, 52.9]"  # worked by hand: 26 of 64
    text = (built.out / "report.md").read_text()
    headline_md = text.split("## Headline")[1].split("##")[0]
    assert f"| {RF7} | – | 64 | 62.5 [50.3, 73.3] | {bracket} |" in headline_md
    assert " low |" not in text and " high |" not in text  # the bounds are folded in


def test_gain_sweep_and_configuration_tables(built: Built) -> None:
    gains = table(built, "tight_vs_global").set_index(["config", "patch"])
    assert gains["gain (points)"].to_numpy() == pytest.approx(
        (gains["tight (%)"] - gains["global (%)"]).to_numpy())
    for patch, (tight, global_, _) in CRAFTED.items():
        mine = gains.loc[(RF7, patch)]
        assert mine["gain (points)"] == pytest.approx(pct(tight - global_))
        # global implies tight image by image: McNemar on the tight-only images
        assert mine["p (McNemar)"] == pytest.approx(
            mcnemar(np.arange(IMAGES) < tight, np.arange(IMAGES) < global_).p_value)
        assert mine["significant"] == (mine["p (McNemar)"] < 0.05)

    sweep = table(built, "rf_sweep").set_index("measure")
    assert list(sweep.columns) == [RF5, RF7, COLUMN]
    assert sweep.loc["certified 5x5, tight (%)", RF7] == "40.6 [29.5, 52.9]"
    assert float(sweep.loc["cert. time, 10,000 images (s)", RF7]) == pytest.approx(
        2.0 / IMAGES * 10_000)
    assert int(sweep.loc["parameters", RF7]) == 123456

    configs = table(built, "configurations").set_index("config")
    assert sorted(configs.index) == sorted([RF5, RF7, COLUMN])
    real = built.rows.drop_duplicates("cell").set_index("checkpoint_sha256")
    for config in (RF5, COLUMN):
        row = real.loc[real.index.str.startswith(configs.loc[config, "checkpoint"])].iloc[0]
        assert configs.loc[config, "s per 10,000 images"] == pytest.approx(
            row["certify_seconds"] / IMAGES * 10_000)
        assert configs.loc[config, "parameters"] == row["n_parameters"]
    # rf 7 chosen on val, rf 5 not; column smoothing has no val rows
    assert configs["chosen on val"].to_dict() == {RF5: "no", RF7: "yes", COLUMN: "no val rows"}
    majority = labels_of(built.results, "crafted").value_counts().max()
    assert configs["chance (%)"].tolist() == pytest.approx([pct(majority)] * 3)


def test_findings_are_computed_from_the_tables(built: Built) -> None:
    text = (built.out / "report.md").read_text()
    findings = text.split("## Findings")[1].split("##")[0]
    # only the configuration chosen on val is ranked: rf 7 (column smoothing has no val rows)
    assert (f"At 5x5 on synthetic, of the configurations chosen on val, **{RF7}** certifies "
            f"the most: 40.6% [29.5, 52.9] (tight; clean 62.5%, 64 images)." in findings)
    assert "tied with" not in findings.split("\n")[0] and COLUMN not in findings.split("\n")[0]
    gains = table(built, "tight_vs_global")
    at_5x5 = gains.loc[gains["patch"] == "5x5", "gain (points)"].mean()
    assert (f"certifies {at_5x5:.1f} points more than the global one on average at 5x5"
            in findings)
    gaps = [pct(e - t) for t, _, e in CRAFTED.values()]
    assert (f"Under the attack, accuracy stays {min(gaps):.1f}–{max(gaps):.1f} points above "
            "the certified (tight) accuracy of the same images (4 configuration and shape "
            f"pairs; the widest gap: {RF7} at 2x12); no certified image was broken."
            in findings)
    # rf 7 against the real rf 5, image by image
    rf5_cell = built.rows.loc[built.rows["param_rf"] == 5, "cell"].iloc[0]
    rf5 = pd.read_csv(built.results / "per_image" / f"{rf5_cell}.csv.gz")
    rf5_flags = (rf5["prediction"] == rf5["label"]) & (rf5["margin_tight_5x5"] >= 0)
    test = mcnemar(np.arange(IMAGES) < CRAFTED["5x5"][0], rf5_flags.to_numpy())
    assert (f"Across rf 5, 7 (bagcert, one recipe), on test, rf 7 certifies the most at "
            f"5x5 (40.6% tight, {RF7}), " + ("significantly ahead of every other rf" if
                                       test.significant else "tied with rf 5")) in findings
    assert (f"Patch orientation matters most to **{RF7}**: 25.0% at 2x12 vs 37.5% at 12x2 "
            "(12.5 points, p = ") in findings
    # the real tiny models learnt nothing: flagged exactly where clean <= chance
    configs = table(built, "configurations")
    low = configs[configs["clean (%)"] <= configs["chance (%)"]]
    assert RF7 not in set(low["config"])
    if len(low):
        assert "**At or below chance**" in findings
        for config in low["config"]:
            assert f"{config} (" in findings.split("**At or below chance**")[1]
    talk = table(built, "claims")
    assert "## The talk's CIFAR-10 claims beside this dataset's numbers" in text
    judged = talk[talk["verdict"].isin(["holds", "does not hold"])]
    assert (f"Of the talk's CIFAR-10 claims that state something checkable here, "
            f"{(judged['verdict'] == 'holds').sum()} of {len(judged)} hold on synthetic "
            f"({len(talk) - len(judged)} more") in findings
    verdicts = talk.set_index("claim")["verdict"]
    assert verdicts["BagCert: certified accuracy against 5x5 patches (tight)"] == (
        "not compared: another dataset")
    assert verdicts["The tight condition certifies more than the global one (same model, "
                    "5x5)"] == "holds"  # 26 vs 19 of 64, global inside tight: p = 0.016
    assert verdicts["The parameter count grows with the receptive field (rf 5 to 7)"] == "holds"
    # no benchmark run beside the results: no speed claim
    assert not any("slower" in c or "time grows" in c for c in verdicts.index)


def test_gallery_finds_the_worst_patch_and_agrees_with_the_run(built: Built) -> None:
    gallery = table(built, "gallery")
    assert sorted(set(gallery["config"])) == sorted([RF5, COLUMN])
    assert (gallery.groupby("config").size() == 3).all()
    assert (gallery["patch"] == "5x5").all()
    assert gallery["votes match"].all()
    assert (gallery["patch at"] != "-").all()
    # the run's tight margin is exact when negative and a lower bound otherwise
    assert (gallery["margin"] >= gallery["stored margin"]).all()
    negative = gallery["stored margin"] < 0
    assert (gallery.loc[negative, "margin"] == gallery.loc[negative, "stored margin"]).all()
    text = (built.out / "report.md").read_text()
    assert f"{RF7}: no gallery, checkpoint {UNKNOWN_SHA[:12]} is neither in" in text


def test_filters_keep_only_what_was_asked(built: Built) -> None:
    out = built.out.parent / "filtered"
    result = invoke("report", "--results-dir", str(built.results), "--out", str(out),
                    "--defense", "ds-column", "--gallery-images", "0")
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    assert "bagcert" not in text and "## Failed cells" not in text
    # no study given: no study's sweep table, no study's claims
    assert "sweep" not in text.lower() and "claims" not in text
    # no attack rows in this selection: no attack section, no attack table
    assert "## Certified vs attacked" not in text and "empirical" not in text
    assert not (out / "tables" / "certified_vs_attacked.csv").exists()
    assert list(pd.read_csv(out / "tables" / "configurations.csv")["config"]) == [COLUMN]
    # no val rows for column smoothing: nothing headlined or ranked, and the report says why
    assert "_No configuration was chosen on val" in text
    assert "- ds-column on synthetic: not chosen on val (no `val` rows)" in text
    assert "On synthetic, no configuration was chosen on val: the report ranks none" in text
    assert not (out / "tables" / "headline.csv").exists()
    assert len(pd.read_csv(out / "tables" / "accuracy.csv")) == 4


def test_crafted_attack_rows_use_the_run_of_the_same_images(built: Built) -> None:
    """The crafted attack ran on the run's own 64 images and has no per-image table: the
    certified columns come from the run's per-image table (all 64 images), and agree with
    its rows."""
    attacks = table(built, "certified_vs_attacked").set_index(["config", "patch"])
    assert sorted(attacks.index) == sorted((RF7, p) for p in CRAFTED)
    for patch, (tight, global_, empirical) in CRAFTED.items():
        mine = attacks.loc[(RF7, patch)]
        assert mine["images"] == 64 and mine["certified by"] == "run crafted: 64 of 64 images"
        assert mine[["clean (%)", "tight (%)", "global (%)", "empirical (%)",
                     "gap (points)"]].tolist() == pytest.approx(
            [pct(CRAFTED_CORRECT), pct(tight), pct(global_), pct(empirical),
             pct(empirical - tight)])
        assert mine["attacked"] == 40 and mine["violations"] == 0
        assert mine["budget"] == "steps 10, restarts 2"


def accurate_checkpoint(path: Path) -> Path:
    """BagCert trained on 12 x 12 stripes (as in test_attack); the network is fully
    convolutional, so it votes on the 28 x 28 synthetic images as well."""
    torch.manual_seed(0)
    defense = get_defense("bagcert")(rf=5, width=8, patch_min=1, patch_max=3, lr=3e-3,
                                     cell_loss="ce")
    images, labels = make_stripes(512, size=12, seed=0)
    data = ImageData("synthetic", "train", TensorImages(images, labels), (1, 12, 12),
                     SYNTHETIC_CLASSES)
    model, _ = train(defense, data, TrainConfig(epochs=3, batch_size=32, crop_padding=0),
                     show_progress=False)
    save_checkpoint(path, defense, model, {"dataset": "synthetic", "in_shape": [1, 12, 12],
                                           "classes": list(SYNTHETIC_CLASSES)})
    return path


@pytest.fixture(scope="module")
def attacked(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """``run`` on the first 48 images and ``attack`` on the first 16, one results folder."""
    root = tmp_path_factory.mktemp("attacked")
    results, cache, out = root / "results", root / "cache", root / "reports"
    checkpoint = accurate_checkpoint(root / "bagcert.pt")
    common = ["--defense", "bagcert", "--dataset", "synthetic", "--patch",
              ",".join(ATTACK_PATCHES), "--checkpoint", str(checkpoint), "--device", "cpu",
              "--results-dir", str(results)]
    run = invoke("run", *common, "--n-images", str(CERTIFIED_IMAGES), cache=cache)
    assert run.exit_code == 0, run.output
    attack = invoke("attack", *common, "--n-images", str(ATTACKED), *ATTACK_BUDGET,
                    cache=cache)
    assert attack.exit_code == 0, attack.output
    result = invoke("report", "--results-dir", str(results), "--out", str(out),
                    "--gallery-images", "0", cache=cache)
    rows = pd.concat([pd.read_csv(p) for p in (results / "rows").glob("*.csv")],
                     ignore_index=True)
    return Built(results, out, result, rows)


def per_image(results: Path, cell: str) -> pd.DataFrame:
    return pd.read_csv(results / "per_image" / f"{cell}.csv.gz")


def test_certified_vs_attacked_is_recomputed_on_the_attacked_images(attacked: Built) -> None:
    """The attack ran on the first 16 of the 48 certified images: the certified columns are
    recomputed from the run's per-image margins of those 16, the empirical ones from the
    attack's per-image outcomes, the gap and the violations from both."""
    assert attacked.result.exit_code == 0, attacked.result.output
    attacks = table(attacked, "certified_vs_attacked").set_index("patch")
    assert list(attacks.index) == list(ATTACK_PATCHES)
    metric = attacked.rows["metric"].fillna("certified")
    (run_cell,) = set(attacked.rows.loc[metric == "certified", "cell"])
    (attack_cell,) = set(attacked.rows.loc[metric == "empirical", "cell"])
    run = per_image(attacked.results, run_cell)
    attack = per_image(attacked.results, attack_cell)
    assert len(run) == CERTIFIED_IMAGES and attack["index"].tolist() == list(range(ATTACKED))
    first = run[run["index"] < ATTACKED]
    correct = first["prediction"] == first["label"]
    attack_correct = attack["prediction"] == attack["label"]
    for patch in ATTACK_PATCHES:
        mine = attacks.loc[patch]
        certified = first[f"margin_tight_{patch}"] >= 0
        tight = 100 * (correct & certified).mean()
        global_ = 100 * (correct & (first[f"margin_global_{patch}"] >= 0)).mean()
        empirical = 100 * (attack_correct & ~attack[f"broken_{patch}"]).mean()
        assert mine["config"] == ACCURATE and mine["split"] == "test"
        assert mine["images"] == ATTACKED
        assert mine["clean (%)"] == pytest.approx(100 * attack_correct.mean())
        assert mine["tight (%)"] == pytest.approx(tight)
        assert mine["global (%)"] == pytest.approx(global_)
        assert mine["empirical (%)"] == pytest.approx(empirical)
        assert mine["gap (points)"] == pytest.approx(empirical - tight)
        assert mine["attacked"] == attack[f"attacked_{patch}"].sum()
        assert mine["violations"] == (attack[f"broken_{patch}"] & certified.to_numpy()).sum() == 0
        assert mine["certified by"] == (
            f"run {run_cell[:8]}: {ATTACKED} of {CERTIFIED_IMAGES} images")
        assert mine["budget"] == "steps 3, restarts 1, step 0.15, stride 28, worst 3"
    # not vacuous: images certified at 12 x 12, and images the attack broke
    assert attacks.loc["12x12", "tight (%)"] > 0 and attack["broken_18x18"].any()
    text = (attacked.out / "report.md").read_text()
    findings = text.split("## Findings")[1].split("##")[0]
    gaps = attacks["gap (points)"]
    assert (f"Under the attack, accuracy stays {gaps.min():.1f}–{gaps.max():.1f} points above "
            "the certified (tight) accuracy of the same images (2 configuration and shape "
            f"pairs; the widest gap: {ACCURATE} at 18x18); no certified image was broken."
            in findings)
    assert "(figures/certified_vs_attacked.png)" in text


def test_an_attack_only_folder_gets_a_report(attacked: Built, tmp_path: Path) -> None:
    """Attack rows alone: the attack's own certificate of its images, no certified sections."""
    results = tmp_path / "results"
    (results / "rows").mkdir(parents=True)
    (results / "per_image").mkdir()
    attack_rows = attacked.rows[attacked.rows["metric"] == "empirical"]
    (cell,) = set(attack_rows["cell"])
    for sub, suffix in (("rows", ".csv"), ("per_image", ".csv.gz")):
        (results / sub / f"{cell}{suffix}").write_bytes(
            (attacked.results / sub / f"{cell}{suffix}").read_bytes())
    out = tmp_path / "out"
    result = invoke("report", "--results-dir", str(results), "--out", str(out))
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    assert "0 certified rows, 2 empirical (attack) rows" in text
    assert "_No certification rows (`patchbench run`) in this selection" in text
    for section in ("## Patch shapes", "## Tight vs global", "## Gallery"):
        assert section not in text
    assert "## Certified vs attacked" in text and "(figures/certified_vs_attacked.png)" in text
    with Image.open(out / "figures" / "certified_vs_attacked.png") as image:
        image.verify()
    attacks = pd.read_csv(out / "tables" / "certified_vs_attacked.csv").set_index("patch")
    assert (attacks["certified by"] == "attack pass").all()
    for row in attack_rows.to_dict("records"):
        mine = attacks.loc[row["patch"]]
        assert mine["images"] == row["n_images"] == ATTACKED
        assert mine["tight (%)"] == pytest.approx(100 * row["certified_accuracy_tight"])
        assert mine["global (%)"] == pytest.approx(100 * row["certified_accuracy_global"])
        assert mine["empirical (%)"] == pytest.approx(100 * row["empirical_accuracy"])
        assert mine["violations"] == row["n_violations"] == 0
    # the attack certifies its images as the run does
    full = table(attacked, "certified_vs_attacked").set_index("patch")
    assert attacks["tight (%)"].tolist() == pytest.approx(full["tight (%)"].tolist())
    findings = text.split("## Findings")[1].split("##")[0]
    assert "Under the attack, accuracy stays" in findings
    assert "no certified image was broken." in findings


HANDMADE = "bagcert rf=5 hold_out_val=no train_precision=fp32"  # no recipe in its rows: the
# fields of TrainConfig's defaults, as trained before they existed


def write_handmade(results: Path) -> None:
    """A certification run of 10 images (5x5, tight and global) and an attack of its first 4
    that breaks image 1, certified (tight margin 3): a soundness violation. Rows and per-image
    tables agree: 9 correct (image 3 is not), 4 of them certified tight, 3 global."""
    common = {"defense": "bagcert", "dataset": "synthetic", "split": "test",
              "params": json.dumps({"rf": 5}), "checkpoint_sha256": "a" * 64, "patch": "5x5",
              "patch_h": 5, "patch_w": 5, "timestamp": "2026-01-01T00:00:00+00:00"}
    for sub in ("rows", "per_image"):
        (results / sub).mkdir(parents=True, exist_ok=True)
    tight = [5, 3, -1, 2, -4, 6, 1, -2, -5, -3]
    global_ = [m - 2 for m in tight]
    labels = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]  # most common class: 40%, below the clean 90%
    predictions = [y if i != 3 else (y + 1) % 3 for i, y in enumerate(labels)]
    pd.DataFrame({"index": range(10), "label": labels, "prediction": predictions,
                  "margin_tight_5x5": tight, "margin_global_5x5": global_}
                 ).to_csv(results / "per_image" / "run1.csv.gz", index=False)
    pd.DataFrame([{**common, "cell": "run1", "condition": c, "n_images": 10, "n_correct": 9,
                   "n_certified": k, "clean_accuracy": 0.9, "certified_accuracy": k / 10}
                  for c, k in (("tight", 4), ("global", 3))]).to_csv(
        results / "rows" / "run1.csv", index=False)
    pd.DataFrame({"index": range(4), "label": labels[:4], "prediction": predictions[:4],
                  "margin_tight_5x5": tight[:4], "margin_global_5x5": global_[:4],
                  "attacked_5x5": [True] * 4, "broken_5x5": [False, True, True, False]}
                 ).to_csv(results / "per_image" / "attack1.csv.gz", index=False)
    pd.DataFrame([{**common, "cell": "attack1", "metric": "empirical", "n_images": 4,
                   "clean_accuracy": 0.75, "empirical_accuracy": 0.25,
                   "certified_accuracy_tight": 0.5, "certified_accuracy_global": 0.5,
                   "n_attacked": 4, "n_violations": 1}]).to_csv(
        results / "rows" / "attack1.csv", index=False)


def test_a_broken_certificate_is_shown_prominently(tmp_path: Path) -> None:
    results, out = tmp_path / "results", tmp_path / "out"
    write_handmade(results)
    result = invoke("report", "--results-dir", str(results), "--out", str(out),
                    "--gallery-images", "0")
    assert result.exit_code == 0, result.output
    (row,) = pd.read_csv(out / "tables" / "certified_vs_attacked.csv").to_dict("records")
    # images 0-3: correct, correct, correct, wrong; tight margins 5, 3, -1, 2; broken: 1, 2
    assert row["images"] == 4 and row["clean (%)"] == pytest.approx(75.0)
    assert row["tight (%)"] == pytest.approx(50.0)  # the whole run: 40.0
    assert row["global (%)"] == pytest.approx(50.0)  # the whole run: 30.0
    assert row["empirical (%)"] == pytest.approx(25.0)
    assert row["gap (points)"] == pytest.approx(-25.0)
    assert row["violations"] == 1 and row["certified by"] == "run run1: 4 of 10 images"
    text = (out / "report.md").read_text()
    head = text.split("## Findings")[0]
    assert "> **Soundness violation**: the attack broke 1 certified image(s)" in head
    findings = text.split("## Findings")[1].split("##")[0]
    assert ("**Soundness violation**: the attack changed the prediction of 1 certified image(s) "
            f"({HANDMADE} at 5x5 (1))") in findings
    assert ("Under the attack, accuracy falls 25.0 points below the certified (tight) accuracy "
            f"of the same images for {HANDMADE} at 5x5, which a sound certificate rules out."
            in findings)
    assert "no certified image" not in findings
    assert "**Soundness violation: certified images were broken" in text.split(
        "## Certified vs attacked")[1]


def test_failed_cells_are_listed(built: Built) -> None:
    text = (built.out / "report.md").read_text()
    assert "## Failed cells" in text and "| deadbeef | ds-row | synthetic |" in text
    failed = table(built, "failed")
    assert failed["reason"].tolist() == ["RuntimeError: out of memory"]


def write_rows(folder: Path, text: str) -> Path:
    (folder / "rows").mkdir(parents=True)
    (folder / "rows" / "bad.csv").write_text(text)
    return folder


@pytest.mark.parametrize(("case", "fragment"), [
    ("missing", "does not exist"),
    ("empty folder", "holds no result rows"),
    ("empty rows folder", "holds no result rows"),
    ("benchmark rows only", "holds no result rows of a certification or an attack"),
    ("garbage", "malformed results file"),
    ("empty file", "malformed results file"),
    ("missing columns", "lack column(s) patch_h, patch_w"),
    ("text in a number column", "column certified_accuracy holds a value that is not a number"),
    ("malformed params", "malformed params"),
])
def test_bad_results_folders_are_one_line_errors(tmp_path: Path, case: str,
                                                 fragment: str) -> None:
    folder = tmp_path / "results"
    header = ("defense,dataset,patch,patch_h,patch_w,condition,n_images,clean_accuracy,"
              "certified_accuracy,n_correct,n_certified,cell,params\n")
    good = "bagcert,synthetic,5x5,5,5,tight,8,0.5,0.25,4,2,bad,{}\n"
    if case == "empty folder":
        folder.mkdir()
    elif case == "empty rows folder":
        (folder / "rows").mkdir(parents=True)
    elif case == "benchmark rows only":
        write_rows(folder, "benchmark,run_id,metric,statistic,value,unit,defense\n"
                           "bench,x,forward_seconds,median,1.0,s,bagcert\n")
    elif case == "garbage":
        write_rows(folder, 'a,b\n1,2,3,4\n"unclosed\n')
    elif case == "empty file":
        write_rows(folder, "")
    elif case == "missing columns":
        write_rows(folder, "defense,dataset,patch,condition,n_images,clean_accuracy,"
                           "certified_accuracy\nbagcert,synthetic,5x5,tight,8,0.5,0.25\n")
    elif case == "text in a number column":
        write_rows(folder, header + good.replace("0.25", "lots"))
    elif case == "malformed params":  # all else agrees with its per-image table
        write_rows(folder, header + good.replace("{}", '"{rf: 7"'))
        (folder / "per_image").mkdir()
        crafted_table(pd.Series([0, 1, 2, 3] * 2), "bad", {"": 4}, {("tight", "5x5"): 2}
                      ).to_csv(folder / "per_image" / "bad.csv.gz", index=False)
    result = invoke("report", "--results-dir", str(folder), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out" / "report.md").exists()


def test_speed_claims_come_from_the_median_throughput_of_one_bench_run(built: Built,
                                                                       tmp_path: Path) -> None:
    """``<results>/bench/rows``: the talk's speed claims use the median images per second of
    one run (other statistics and metrics of the same run are left out)."""
    results = tmp_path / "results"
    for sub in ("rows", "per_image", "validation"):
        shutil.copytree(built.results / sub, results / sub)
    rows = []
    for defense, rf, median in (("bagcert", 5, 300.0), ("bagcert", 13, 150.0),
                                ("ds-column", None, 400.0)):
        common = {"benchmark": "bench", "run_id": "0123456789abcdef", "defense": defense,
                  "param_rf": rf, "batch_size": 16, "n_patch_shapes": 20, "device": "cpu",
                  "load_average": 1.5, "timestamp": "2026-01-01T00:00:00+00:00"}
        rows += [{**common, "metric": "images_per_second", "statistic": "median",
                  "value": median},
                 {**common, "metric": "images_per_second", "statistic": "min", "value": 1.0},
                 {**common, "metric": "certify_seconds", "statistic": "median", "value": 9.0}]
    (results / "bench" / "rows").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(results / "bench" / "rows" / "bench-0123456789abcdef.csv",
                              index=False)
    out = tmp_path / "out"
    result = invoke("report", "--results-dir", str(results), "--out", str(out),
                    "--gallery-images", "0", *STUDY)
    assert result.exit_code == 0, result.output
    talk = pd.read_csv(out / "tables" / "claims.csv").set_index("claim")
    growth = talk.loc["Certification time grows with the receptive field (rf 5 to 13)"]
    assert growth["verdict"] == "holds"
    assert growth["here"] == ("x2.00 (bench run 01234567, batch 16, 20 shapes, cpu, "
                              "load 1.5)")
    # bagcert (rf 5 and rf 13, the newest matching rows) against column smoothing
    little = talk.loc["BagCert certifies a little slower than column smoothing"]
    assert little["here"].startswith("x") and "bagcert / ds-column" in little["here"]
    assert "Block smoothing certifies far slower than column smoothing" not in talk.index


@pytest.mark.parametrize(("cut", "fragment"), [
    ("bytes", "per-image table {path} is unreadable"),
    ("images", "per-image table holds 32 images, its rows say n_images 64"),
])
def test_a_per_image_table_cut_in_half_is_a_one_line_error(built: Built, tmp_path: Path,
                                                           cut: str, fragment: str) -> None:
    """The report checks each per-image table against its rows before writing anything: a
    table cut in half (its gzip truncated, or half its images gone) stops it, one line."""
    results = tmp_path / "results"
    for sub in ("rows", "per_image", "validation"):
        shutil.copytree(built.results / sub, results / sub)
    path = results / "per_image" / "crafted.csv.gz"
    if cut == "bytes":
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
        with pytest.raises(EOFError), gzip.open(path) as f:
            f.read()  # not vacuous: the file really is cut
    else:
        whole = pd.read_csv(path)
        whole.iloc[: len(whole) // 2].to_csv(path, index=False)
    out = tmp_path / "out"
    result = invoke("report", "--results-dir", str(results), "--out", str(out),
                    "--gallery-images", "0")
    assert_one_line_error(result, fragment.format(path=path))
    assert "cell crafted" in result.output
    assert not (out / "report.md").exists()


@pytest.mark.parametrize(("option", "value"), [("--dataset", "cifar10"),
                                               ("--defense", "ds-block,nope")])
def test_a_filter_that_leaves_nothing_is_a_one_line_error(built: Built, tmp_path: Path,
                                                          option: str, value: str) -> None:
    result = invoke("report", "--results-dir", str(built.results), "--out", str(tmp_path),
                    option, value)
    assert_one_line_error(result, "no results in")
    assert "it holds datasets synthetic and defenses bagcert, ds-column" in result.output


@pytest.mark.parametrize("name", ["bagcert", "ds-column", "ds-row", "ds-block"])
def test_patch_positions_reproduce_the_defense_footprints(name: str) -> None:
    """Every position's interval is one of the footprints, and all footprints are reached;
    for BagCert the probed cells of a random network agree with the mapped footprint."""
    params = {"ablation_size": 3} if name != "bagcert" else {"rf": 5, "width": 4}
    defense = get_defense(name).from_params(params)
    for patch in (PatchShape(5, 5), PatchShape(2, 12), PatchShape(28, 1)):
        for axis in (0, 1):
            assert axis_intervals(defense, patch, (28, 28), axis) is not None, (patch, axis)
    if name == "bagcert":
        torch.manual_seed(0)
        model = defense.build_model((1, 28, 28), 3).eval()
        image = torch.rand(1, 1, 28, 28)
        rows = axis_intervals(defense, PatchShape(5, 5), (28, 28), 0)
        cols = axis_intervals(defense, PatchShape(5, 5), (28, 28), 1)
        for top, left in ((0, 0), (11, 7), (23, 23)):
            patched = image.clone()
            patched[..., top:top + 5, left:left + 5] = torch.rand(5, 5)
            with torch.no_grad():
                changed = (model(patched) != model(image)).any(dim=1)[0].nonzero()
            (r0, rn), (c0, cn) = rows[top], cols[left]
            assert changed[:, 0].min() == r0 and changed[:, 0].max() == r0 + rn - 1
            assert changed[:, 1].min() == c0 and changed[:, 1].max() == c0 + cn - 1


def test_worst_footprint_matches_the_certification_core() -> None:
    from patchbench.certify import certify_votes

    generator = torch.Generator().manual_seed(1)
    defense = get_defense("bagcert").from_params({"rf": 5})
    fp = defense.footprints(PatchShape(3, 3), (12, 12))
    votes = torch.rand(200, 4, *fp.map_hw, generator=generator) < 0.3
    core = certify_votes(votes, [fp], ("tight",)).margin["tight"][:, 0]
    for image, stored in zip(votes.numpy(), core.tolist(), strict=True):
        margin = worst_footprint(image, fp)[0]
        assert margin == stored if stored < 0 else margin >= stored


def test_headline_is_the_val_choice_and_goes_into_readme(built: Built, tmp_path: Path) -> None:
    headline = pd.read_csv(built.out / "tables" / "headline.csv")
    accuracy = pd.read_csv(built.out / "tables" / "accuracy.csv")
    # BagCert: the rule's pick on val (rf 7, by VAL); column smoothing has no val rows
    (row,) = headline.to_dict("records")
    assert VAL[7][0] - VAL[5][0] > 0.01  # rf 5 is more than a point below on val clean
    assert row["defense"] == "bagcert" and row["config"] == RF7
    mine = accuracy[(accuracy["config"] == RF7)].set_index("patch")
    assert row["5x5 tight (%)"] == mine.loc["5x5", "tight (%)"] == pytest.approx(
        pct(CRAFTED["5x5"][0]))
    assert row["5x5 global (%)"] == mine.loc["5x5", "global (%)"]
    assert row["2x12 tight (%)"] == mine.loc["2x12", "tight (%)"]
    assert row["12x2 tight (%)"] == mine.loc["12x2", "tight (%)"]
    text = (built.out / "report.md").read_text()
    section = text.split("## Headline")[1].split("\n## ")[0]
    assert "chosen on `val` by the study's rule" in section and "ds-column" not in set(
        headline["defense"])
    assert "ds-column on synthetic: not chosen on val (no `val` rows); not in the headline" in (
        section)

    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nbefore\n<!-- headline:start -->\nstale headline\n"
                      "<!-- headline:end -->\nafter\n")
    result = invoke("report", "--results-dir", str(built.results), "--out", str(built.out),
                    "--gallery-images", "0", "--readme", str(readme))
    assert result.exit_code == 0, result.output
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n<!-- headline:start") and text.endswith(
        "<!-- headline:end -->\nafter\n")
    assert "stale headline" not in text
    assert "| dataset | defense | config | model | images | clean (%) |" in text
    assert f"| synthetic | bagcert | {RF7} | – | 64 | 62.5 [50.3, 73.3] |" in text
    assert text.count("\n| synthetic |") == len(headline)
    assert os.path.relpath(built.out, tmp_path) + "/report.md" in text
    again = invoke("report", "--results-dir", str(built.results), "--out", str(built.out),
                   "--gallery-images", "0", "--readme", str(readme))
    assert again.exit_code == 0 and readme.read_text().count("headline:start") == 1


def test_a_readme_without_the_headline_block_is_a_one_line_error(built: Built,
                                                                 tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# no block here\n")
    result = invoke("report", "--results-dir", str(built.results), "--out",
                    str(tmp_path / "out"), "--gallery-images", "0", "--readme", str(readme))
    assert_one_line_error(result, "has no '<!-- headline:start -->'")
    assert readme.read_text() == "# no block here\n"
    assert not (tmp_path / "out").exists()  # checked before any work


def test_recipe_fields_missing_from_older_rows_take_their_defaults(built: Built) -> None:
    """Rows written before a recipe field existed (no ``precision`` in ``train_config``) are
    named as trained with its default, next to rows that set it."""
    from patchbench.reporting.report import split_and_name
    from patchbench.running.results import metric_of

    rows = built.rows[(built.rows["defense"] == "bagcert") & (built.rows["param_rf"] == 5)]
    recipe = json.loads(rows["train_config"].iloc[0])
    old = {k: v for k, v in recipe.items() if k not in ("precision", "hold_out_val")}
    both = pd.concat([rows.assign(train_config=json.dumps(old), cell="old"),
                      rows.assign(train_config=json.dumps({**recipe, "precision": "bf16"}),
                                  cell="new", checkpoint_sha256="f" * 64)])
    selected = split_and_name(both.assign(metric=metric_of(both)), Path("here"), {}, {})
    assert set(selected.certified["config"]) == {RF5, RF5.replace("train_precision=fp32",
                                                                  "train_precision=bf16")}


# -- every defense family: vote maps beside PatchCleanser (masking) ----------------------------

MASKING_PATCHES = "5x5,2x12"
MASKING_ATTACKED = 16  # a hand-made attack of the PatchCleanser run's first 16 images, at 5x5


MASKING = f"patchcleanser masks_per_axis=3 {RECIPE}"  # the real PatchCleanser run
CRAFTED_MASKING = f"patchcleanser masks_per_axis=4 {RECIPE}"  # a hand-made one, chosen on val
# patch -> (correct, correct and certified) of the hand-made PatchCleanser cell's 64 images:
# a prediction per patch shape, so a clean accuracy per shape
CRAFTED_MASKS = {"5x5": (44, 30), "2x12": (42, 20)}


@dataclass(frozen=True)
class Mixed:
    results: Path
    cache: Path
    out: Path
    result: Result
    masking: pd.DataFrame  # the PatchCleanser run's rows
    per_image: pd.DataFrame  # and its per-image table


def add_masking_attack(results: Path, rows: pd.DataFrame, per_image: pd.DataFrame) -> None:
    """Attack rows for the PatchCleanser run as a generic attack would write them: its first
    16 images at 5x5, none broken, with a per-image table (``prediction_<patch>``)."""
    row = rows[rows["patch"] == "5x5"].iloc[0]
    first = per_image[per_image["index"] < MASKING_ATTACKED]
    correct = first["prediction_5x5"] == first["label"]
    pd.DataFrame({"index": first["index"], "label": first["label"],
                  "prediction_5x5": first["prediction_5x5"], "attacked_5x5": correct,
                  "broken_5x5": False}).to_csv(
        results / "per_image" / "masking-attack.csv.gz", index=False)
    keep = ["defense", "dataset", "split", "params", "checkpoint_sha256", "patch", "patch_h",
            "patch_w", "timestamp"]
    pd.DataFrame([{**row[keep].to_dict(), "cell": "masking-attack", "metric": "empirical",
                   "n_images": MASKING_ATTACKED, "clean_accuracy": float(correct.mean()),
                   "empirical_accuracy": float(correct.mean()), "n_attacked": int(correct.sum()),
                   "n_violations": 0}]).to_csv(results / "rows" / "masking-attack.csv",
                                               index=False)


def add_crafted_masking(results: Path, rows: pd.DataFrame, per_image: pd.DataFrame) -> None:
    """A PatchCleanser cell with 4 x 4 masks and an unknown checkpoint, copied from the real
    one with other numbers (CRAFTED_MASKS) and a per-image table that agrees with them; and
    val rows of both PatchCleanser configurations, on which the rule picks this one."""
    params = {**json.loads(rows["params"].iloc[0]), "masks_per_axis": 4}
    counts = [CRAFTED_MASKS[p] for p in rows["patch"]]
    crafted = rows.assign(params=json.dumps(params, sort_keys=True), param_masks_per_axis=4,
                          cell="crafted-masking", checkpoint_sha256="e" * 64,
                          n_correct=[c for c, _ in counts], n_certified=[k for _, k in counts],
                          clean_accuracy=[c / IMAGES for c, _ in counts],
                          certified_accuracy=[k / IMAGES for _, k in counts])
    crafted.to_csv(results / "rows" / "crafted-masking.csv", index=False)
    crafted_table(per_image["label"], "crafted-masking",
                  {p: c for p, (c, _) in CRAFTED_MASKS.items()},
                  {("masking", p): k for p, (_, k) in CRAFTED_MASKS.items()}, margins=False
                  ).to_csv(results / "per_image" / "crafted-masking.csv.gz", index=False)
    study = results / "validation" / "patchcleanser"
    write_val_rows(study / "real", rows, 0.25, 0.10)
    write_val_rows(study / "crafted", crafted, 0.70, 0.45)


@pytest.fixture(scope="module")
def mixed(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Mixed:
    """The vote-map results of ``built`` (val rows included) and a tiny PatchCleanser run
    (3 x 3 masks) in one folder, with the same checkpoint cache, plus a hand-made attack of
    the PatchCleanser run and a hand-made PatchCleanser cell that val chooses."""
    root = tmp_path_factory.mktemp("mixed")
    results, cache, out = root / "results", built.results.parent / "cache", root / "reports"
    for sub in ("rows", "per_image", "validation"):
        shutil.copytree(built.results / sub, results / sub)
    before = set((results / "rows").iterdir())
    run = invoke("run", "--defense", "patchcleanser", "--patch", MASKING_PATCHES, *TINY,
                 "--masks-per-axis", "3", "--results-dir", str(results), cache=cache)
    assert run.exit_code == 0, run.output
    (new,) = set((results / "rows").iterdir()) - before
    masking = pd.read_csv(new)
    per_image = pd.read_csv(results / "per_image" / f"{new.stem}.csv.gz")
    add_masking_attack(results, masking, per_image)
    add_crafted_masking(results, masking, per_image)
    result = invoke("report", "--results-dir", str(results), "--out", str(out),
                    "--gallery-images", "2", *STUDY, cache=cache)
    return Mixed(results, cache, out, result, masking, per_image)


def without_bounds(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=[c for c in frame if c.endswith((" low", " high"))])


def test_a_mixed_report_has_both_families_in_headline_and_tables(built: Built,
                                                                  mixed: Mixed) -> None:
    assert mixed.result.exit_code == 0, mixed.result.output

    def read(name: str) -> pd.DataFrame:
        return pd.read_csv(mixed.out / "tables" / f"{name}.csv")

    headline = read("headline").set_index("defense")
    assert sorted(headline.index) == ["bagcert", "patchcleanser"]  # ds-column: no val rows
    assert headline.loc["patchcleanser", "config"] == CRAFTED_MASKING
    assert (mixed.masking["condition"] == "masking").all()
    for patch, (_, certified) in CRAFTED_MASKS.items():
        assert headline.loc["patchcleanser", f"{patch} masking (%)"] == pytest.approx(
            pct(certified))
    # a prediction per shape: the headline's clean accuracy is the one at 5x5
    assert headline.loc["patchcleanser", "clean (%)"] == pytest.approx(
        pct(CRAFTED_MASKS["5x5"][0]))
    assert pd.isna(headline.loc["patchcleanser", "5x5 tight (%)"])
    assert pd.isna(headline.loc["bagcert", "5x5 masking (%)"])
    # the vote-map numbers are those of the vote-map report
    alone = table(built, "headline").set_index("defense")
    assert headline.loc[alone.index, alone.columns].equals(alone)

    accuracy = read("accuracy")
    assert [c for c in accuracy.columns if c.endswith("(%)")][-3:] == [
        "tight (%)", "global (%)", "masking (%)"]
    at = mixed.masking.set_index("patch")
    for config, expected in ((MASKING, {p: (r["clean_accuracy"], r["certified_accuracy"])
                                        for p, r in at.iterrows()}),
                             (CRAFTED_MASKING, {p: (c / IMAGES, k / IMAGES)
                                                for p, (c, k) in CRAFTED_MASKS.items()})):
        mine = accuracy[accuracy["config"] == config].set_index("patch")
        assert sorted(mine.index) == sorted(MASKING_PATCHES.split(","))
        for patch, (clean, certified) in expected.items():  # clean per shape, masking
            assert mine.loc[patch, "clean (%)"] == pytest.approx(100 * clean)
            assert mine.loc[patch, "masking (%)"] == pytest.approx(100 * certified)
        assert mine[["tight (%)", "global (%)"]].isna().all(axis=None)
    assert accuracy.loc[accuracy["defense"] != "patchcleanser", "masking (%)"].isna().all()
    vote_maps = without_bounds(accuracy[accuracy["defense"] != "patchcleanser"])
    assert vote_maps.drop(columns="masking (%)").reset_index(drop=True).equals(
        without_bounds(table(built, "accuracy")))

    configs = read("configurations").set_index("config")
    assert configs.loc[CRAFTED_MASKING, "chosen on val"] == "yes"
    assert configs.loc[MASKING, "chosen on val"] == "no"
    text = (mixed.out / "report.md").read_text()
    assert "Certified accuracy (tight, masking) by patch height and width" in text
    assert f"Clean of {CRAFTED_MASKING}" in text  # its clean accuracy depends on the shape
    findings = text.split("## Findings")[1].split("##")[0]
    # each defense's chosen configuration under its primary condition, compared image by
    # image: the first 30 vs the first 26 images, 4 discordant ones, p = 2 / 2**4
    assert (f"of the configurations chosen on val, **{CRAFTED_MASKING}** certifies the most: "
            f"46.9% [35.2, 58.9] (masking; clean 68.8%, 64 images); tied with {RF7} (40.6%, "
            "p = 0.125)") in findings
    sweep = read("rf_sweep")
    assert MASKING in sweep.columns and CRAFTED_MASKING in sweep.columns
    assert "certified 5x5, tight/masking (%)" in set(sweep["measure"])


def test_a_masking_attack_is_compared_under_its_own_condition(mixed: Mixed) -> None:
    """The certified accuracy of the attacked images is recomputed from the PatchCleanser
    run's per-image table (per-shape predictions, certified flags, no margins)."""
    attacks = pd.read_csv(mixed.out / "tables" / "certified_vs_attacked.csv")
    (row,) = attacks[attacks["config"] == MASKING].to_dict("records")
    first = mixed.per_image[mixed.per_image["index"] < MASKING_ATTACKED]
    certified = ((first["prediction_5x5"] == first["label"])
                 & first["certified_masking_5x5"].astype(bool))
    assert row["masking (%)"] == pytest.approx(100 * certified.mean())
    assert pd.isna(row["tight (%)"]) and row["violations"] == 0
    assert row["gap (points)"] == pytest.approx(row["empirical (%)"] - row["masking (%)"])
    assert row["certified by"].endswith(f": {MASKING_ATTACKED} of 64 images")
    findings = (mixed.out / "report.md").read_text().split("## Findings")[1].split("##")[0]
    assert "above the certified (tight or masking) accuracy of the same images" in findings


def test_a_mixed_report_draws_the_masking_gallery(mixed: Mixed) -> None:
    text = (mixed.out / "report.md").read_text()
    linked = re.findall(r"\]\((figures/gallery_[^)]+\.png)\)", text)
    (drawn,) = [p for p in linked if p.endswith(f"_{slug(MASKING)}.png")]
    with Image.open(mixed.out / drawn) as image:
        assert image.format == "PNG" and min(image.size) > 100
        image.verify()
    gallery = pd.read_csv(mixed.out / "tables" / "gallery_masking.csv")
    assert len(gallery) == 2 and (gallery["config"] == MASKING).all()
    assert gallery["matches"].all() and (gallery["patch"] == "5x5").all()
    assert (gallery["pairs"] == 9 * 10 // 2).all()  # 3 x 3 masks, as the run certified
    stored = mixed.per_image.set_index("index")
    for row in gallery.to_dict("records"):
        assert row["certified"] == bool(stored.loc[row["image"], "certified_masking_5x5"])
        assert (row["masks"] == "-") == row["certified"]  # a differing pair iff not certified
    assert "gallery not supported" not in text
    assert set(pd.read_csv(mixed.out / "tables" / "gallery.csv")["config"]) == {RF5, COLUMN}
    assert (f"- {CRAFTED_MASKING}: no gallery, checkpoint {'e' * 12} is neither in"
            in text)


def test_explain_names_the_first_pair_that_differs() -> None:
    """``explain`` agrees with ``certify``, and its pair is the first (i <= j, in mask order)
    whose two-mask prediction differs (a linear model on 12 x 12 images, masks set to 0)."""
    torch.manual_seed(0)
    defense = get_defense("patchcleanser")(masks_per_axis=2, mask_value=0.0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 3)).eval()
    images, patch = torch.rand(8, 1, 12, 12), PatchShape(3, 3)
    cert = defense.certify(model, images, [patch])
    masks = defense.masks(patch, (12, 12))
    pairs = [(i, j) for i in range(len(masks)) for j in range(i, len(masks))]
    seen = set()
    for k, image in enumerate(images):
        ex = defense.explain(model, image, patch)
        assert ex.prediction == int(cert.prediction[k, 0])
        assert ex.certified == bool(cert.certified["masking"][k, 0]) == (ex.pair is None)
        assert ex.one_mask.shape == (2, 2) and ex.pairs == len(pairs) == 10
        with torch.no_grad():
            labels = [int(model(image.masked_fill(masks[i] | masks[j], 0.0)[None]).argmax())
                      for i, j in pairs]
        differ = [pair for pair, label in zip(pairs, labels, strict=True)
                  if label != ex.prediction]
        assert ex.pair == (differ[0] if differ else None)
        if ex.pair is not None:
            assert ex.mask_prediction == labels[pairs.index(ex.pair)] != ex.prediction
            assert [m.tolist() for m in ex.masks] == [masks[p].tolist() for p in ex.pair]
        seen.add(ex.certified)
    assert seen == {True, False}  # not vacuous


def test_a_defense_without_explain_says_the_gallery_is_not_supported(
        mixed: Mixed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(get_defense("patchcleanser"), "explain")
    result = invoke("report", "--results-dir", str(mixed.results), "--out", str(tmp_path),
                    "--defense", "patchcleanser", "--gallery-images", "2", cache=mixed.cache)
    assert result.exit_code == 0, result.output
    text = (tmp_path / "report.md").read_text()
    assert (f"- {MASKING}: gallery not supported by patchcleanser: it lacks explain."
            in text)
    assert "figures/gallery_" not in text
    assert not (tmp_path / "tables" / "gallery_masking.csv").exists()
