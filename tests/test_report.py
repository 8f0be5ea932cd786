"""``patchbench report``: a results folder made by real (tiny) runs in; Markdown, CSV, LaTeX and
PNG out, every number traceable to the rows, and one-line errors for bad folders and filters.

Two tiny models are trained and certified once for the module (BagCert rf 5 and column
smoothing, 64 synthetic images). Tiny models certify little, so a hand-made cell (BagCert
rf 7, distinct numbers, an unknown checkpoint) and attack rows for it are added beside them:
they exercise the receptive-field sweep, the tight-vs-global gains, the empirical column and
the gallery's "checkpoint not found" note.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image

from patchbench.cli import cli
from patchbench.defense import get_defense
from patchbench.gallery import axis_intervals, worst_footprint
from patchbench.patches import PatchShape

PATCHES = "3x3,5x5,2x12,12x2"
TINY = ["--dataset", "synthetic", "--n-images", "64", "--width", "8", "--epochs", "1",
        "--max-train-images", "256", "--device", "cpu"]
CRAFTED = {  # patch -> (tight, global, empirical) accuracy of the hand-made rf 7 cell
    "3x3": (0.50, 0.45, 0.55), "5x5": (0.40, 0.30, 0.45), "2x12": (0.30, 0.20, 0.40),
    "12x2": (0.35, 0.20, 0.42)}
UNKNOWN_SHA = "f" * 64


def invoke(*args: str, cache: Path | None = None) -> Result:
    env = {"COLUMNS": "200", **({"PATCHBENCH_CACHE": str(cache)} if cache else {})}
    return CliRunner().invoke(cli, list(args), env=env)


def assert_one_line_error(result: Result, fragment: str) -> None:
    escaped = result.exception if not isinstance(result.exception, SystemExit) else None
    assert escaped is None, f"uncaught {type(escaped).__name__}: {escaped}"
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert fragment in lines[0], lines[0]


@dataclass(frozen=True)
class Built:
    results: Path
    out: Path
    result: Result
    rows: pd.DataFrame  # every rows file of the results folder, as written


def add_crafted_cell(results: Path) -> None:
    """A BagCert rf 7 cell copied from the real rf 5 one with other numbers, plus attack rows
    (``metric`` = empirical) for it; the real files keep having no ``metric`` column."""
    real = pd.concat([pd.read_csv(p) for p in (results / "rows").glob("*.csv")])
    rows = real[real["defense"] == "bagcert"].copy()
    params = json.loads(rows["params"].iloc[0])
    rows = rows.assign(params=json.dumps({**params, "rf": 7}, sort_keys=True), param_rf=7,
                       cell="crafted", checkpoint_sha256=UNKNOWN_SHA, n_parameters=123456,
                       certify_seconds=2.0, forward_seconds=1.5, clean_accuracy=0.6,
                       metric="certified")
    rows["certified_accuracy"] = [CRAFTED[p][0 if c == "tight" else 1]
                                  for p, c in zip(rows["patch"], rows["condition"], strict=True)]
    rows.to_csv(results / "rows" / "crafted.csv", index=False)
    attack = rows[rows["condition"] == "tight"].assign(
        metric="empirical", cell="crafted-attack",
        robust_accuracy=[CRAFTED[p][2] for p in rows.loc[rows["condition"] == "tight", "patch"]])
    attack.to_csv(results / "rows" / "crafted-attack.csv", index=False)


def add_failed_cell(results: Path) -> None:
    """A failure record as the sweep leaves it for a cell that raised (no rows)."""
    record = {"cell": "deadbeef", "identity": {"defense": "ds-row", "dataset": "synthetic"},
              "reason": "RuntimeError: out of memory\nmore", "traceback": "",
              "host": "here", "timestamp": "2026-01-01T00:00:00+00:00"}
    (results / "failed").mkdir(exist_ok=True)
    (results / "failed" / "deadbeef.json").write_text(json.dumps(record))


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on a shared CPU: a second torch thread only adds waiting (3x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("report")
    results, cache, out = root / "results", root / "cache", root / "reports"
    for defense, extra in (("bagcert", ["--rf", "5"]), ("ds-column", [])):
        run = invoke("run", "--defense", defense, "--patch", PATCHES, *TINY, *extra,
                     "--results-dir", str(results), cache=cache)
        assert run.exit_code == 0, run.output
    add_crafted_cell(results)
    add_failed_cell(results)
    result = invoke("report", "--results-dir", str(results), "--out", str(out), cache=cache)
    rows = pd.concat([pd.read_csv(p) for p in (results / "rows").glob("*.csv")],
                     ignore_index=True)
    return Built(results, out, result, rows)


def table(built: Built, name: str) -> pd.DataFrame:
    return pd.read_csv(built.out / "tables" / f"{name}.csv")


def test_report_writes_markdown_figures_and_tables(built: Built) -> None:
    assert built.result.exit_code == 0, built.result.output
    report = built.out / "report.md"
    assert built.result.output.strip() == str(report)
    text = report.read_text()
    for name in ("bagcert rf=5", "bagcert rf=7", "ds-column"):
        assert name in text
    for section in ("## Findings", "## Certified accuracy", "## Patch shapes",
                    "## Receptive-field sweep", "## Tight vs global",
                    "## Certification time vs parameters", "## Gallery"):
        assert section in text
    linked = re.findall(r"\]\((figures/[^)]+\.png)\)", text)
    assert {"figures/certified_vs_patch_size.png", "figures/patch_shapes.png",
            "figures/time_vs_parameters.png"} <= set(linked)
    assert len([p for p in linked if "gallery" in p]) == 2  # rf 7 has no checkpoint
    for path in linked:
        with Image.open(built.out / path) as image:
            assert image.format == "PNG" and min(image.size) > 100
            image.verify()
    for name in ("accuracy", "configurations", "rf_sweep", "tight_vs_global", "gallery"):
        assert f"(tables/{name}.csv)" in text
        tex = (built.out / "tables" / f"{name}.tex").read_text()
        assert tex.startswith("\\begin{tabular}") and "\\bottomrule" in tex


def test_accuracy_table_matches_the_rows(built: Built) -> None:
    accuracy = table(built, "accuracy")
    assert len(accuracy) == 3 * 4  # three configurations, four shapes
    certified = built.rows[built.rows["metric"].fillna("certified") == "certified"]
    for row in certified.itertuples():
        rf = json.loads(row.params).get("rf")
        config = f"bagcert rf={rf}" if row.defense == "bagcert" else row.defense
        mine = accuracy[(accuracy["config"] == config) & (accuracy["patch"] == row.patch)]
        assert len(mine) == 1
        assert mine[f"{row.condition} (%)"].iloc[0] == pytest.approx(
            100 * row.certified_accuracy)
        assert mine["clean (%)"].iloc[0] == pytest.approx(100 * row.clean_accuracy)
    empirical = accuracy.set_index(["config", "patch"])["empirical (%)"]
    for patch, (_, _, attacked) in CRAFTED.items():
        assert empirical[("bagcert rf=7", patch)] == pytest.approx(100 * attacked)
    assert empirical.drop("bagcert rf=7", level="config").isna().all()


def test_gain_sweep_and_configuration_tables(built: Built) -> None:
    gains = table(built, "tight_vs_global").set_index(["config", "patch"])
    assert gains["gain (points)"].to_numpy() == pytest.approx(
        (gains["tight (%)"] - gains["global (%)"]).to_numpy())
    for patch, (tight, global_, _) in CRAFTED.items():
        assert gains.loc[("bagcert rf=7", patch), "gain (points)"] == pytest.approx(
            100 * (tight - global_))

    sweep = table(built, "rf_sweep").set_index("measure")
    assert list(sweep.columns) == ["bagcert rf=5", "bagcert rf=7", "ds-column"]
    assert float(sweep.loc["certified 5x5, tight (%)", "bagcert rf=7"]) == pytest.approx(40.0)
    assert float(sweep.loc["cert. time, 10,000 images (s)", "bagcert rf=7"]) == pytest.approx(
        2.0 / 64 * 10_000)
    assert int(sweep.loc["parameters", "bagcert rf=7"]) == 123456

    configs = table(built, "configurations").set_index("config")
    assert sorted(configs.index) == ["bagcert rf=5", "bagcert rf=7", "ds-column"]
    real = built.rows.drop_duplicates("cell").set_index("checkpoint_sha256")
    for config in ("bagcert rf=5", "ds-column"):
        row = real.loc[real.index.str.startswith(configs.loc[config, "checkpoint"])].iloc[0]
        assert configs.loc[config, "s per 10,000 images"] == pytest.approx(
            row["certify_seconds"] / 64 * 10_000)
        assert configs.loc[config, "parameters"] == row["n_parameters"]


def test_findings_are_computed_from_the_tables(built: Built) -> None:
    text = (built.out / "report.md").read_text()
    findings = text.split("## Findings")[1].split("##")[0]
    assert "At 5x5 on synthetic, **bagcert rf=7** certifies the most: 40.0%" in findings
    gains = table(built, "tight_vs_global")
    at_5x5 = gains.loc[gains["patch"] == "5x5", "gain (points)"].mean()
    assert (f"certifies {at_5x5:.1f} points more than the global one on average at 5x5"
            in findings)
    gap = sum(e - t for t, _, e in CRAFTED.values()) / len(CRAFTED) * 100
    assert f"keep {gap:.1f} points more accuracy than is certified" in findings
    assert "Across receptive fields 5, 7, rf 7 certifies the most at 5x5 (40.0%" in findings
    assert "Patch orientation matters most to **bagcert rf=7**: 30.0% at 2x12" in findings


def test_gallery_finds_the_worst_patch_and_agrees_with_the_run(built: Built) -> None:
    gallery = table(built, "gallery")
    assert sorted(set(gallery["config"])) == ["bagcert rf=5", "ds-column"]
    assert (gallery.groupby("config").size() == 3).all()
    assert (gallery["patch"] == "5x5").all()
    assert gallery["votes match"].all()
    assert (gallery["patch at"] != "-").all()
    # the run's tight margin is exact when negative and a lower bound otherwise
    assert (gallery["margin"] >= gallery["stored margin"]).all()
    negative = gallery["stored margin"] < 0
    assert (gallery.loc[negative, "margin"] == gallery.loc[negative, "stored margin"]).all()
    text = (built.out / "report.md").read_text()
    assert f"bagcert rf=7: no gallery, checkpoint {UNKNOWN_SHA[:12]} is neither in" in text


def test_filters_keep_only_what_was_asked(built: Built) -> None:
    out = built.out.parent / "filtered"
    result = invoke("report", "--results-dir", str(built.results), "--out", str(out),
                    "--defense", "ds-column", "--gallery-images", "0")
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    assert "bagcert" not in text and "## Failed cells" not in text
    assert "_No configuration has a receptive-field (`rf`) parameter._" in text
    assert list(pd.read_csv(out / "tables" / "configurations.csv")["config"]) == ["ds-column"]
    assert len(pd.read_csv(out / "tables" / "accuracy.csv")) == 4


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
              "certified_accuracy,params\n")
    good = "bagcert,synthetic,5x5,5,5,tight,8,0.5,0.25,{}\n"
    if case == "empty folder":
        folder.mkdir()
    elif case == "empty rows folder":
        (folder / "rows").mkdir(parents=True)
    elif case == "garbage":
        write_rows(folder, 'a,b\n1,2,3,4\n"unclosed\n')
    elif case == "empty file":
        write_rows(folder, "")
    elif case == "missing columns":
        write_rows(folder, "defense,dataset,patch,condition,n_images,clean_accuracy,"
                           "certified_accuracy\nbagcert,synthetic,5x5,tight,8,0.5,0.25\n")
    elif case == "text in a number column":
        write_rows(folder, header + good.replace("0.25", "lots"))
    elif case == "malformed params":
        write_rows(folder, header + good.replace("{}", '"{rf: 7"'))
    result = invoke("report", "--results-dir", str(folder), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out" / "report.md").exists()


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
