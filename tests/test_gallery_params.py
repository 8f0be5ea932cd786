"""The gallery redraws a cell with the parameters it was certified with, not the checkpoint's.

One column-smoothing model is trained at threshold 0.15 (``patchbench train``, into the
checkpoint cache; 512 synthetic images, 3 epochs, about 2 s) and certified by ``patchbench
run`` at threshold 0.3, which reuses that cached model because the threshold is a
certification-only parameter, once in fp32 and once in bf16. Between the two thresholds the
vote counts, and so the margins, of some test images differ, so a gallery that rebuilt the
defense from the checkpoint would disagree with the per-image table it shows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner, Result

from patchbench.cli import cli
from patchbench.reporting import gallery
from patchbench.reporting.gallery import Example, gallery_examples
from patchbench.reporting.report import build_report
from patchbench.running.checkpoint import load_checkpoint
from patchbench.running.evaluate import for_inference

TRAINED, CERTIFIED = 0.15, 0.3  # smoothing thresholds: of the checkpoint, of the cells
N_IMAGES = 8
# A column-smoothing model that votes for the right class on most ablations of the first
# test images (the one-epoch models of test_report are near uniform in eval mode).
RECIPE = ["--defense", "ds-column", "--dataset", "synthetic", "--width", "8", "--epochs", "3",
          "--train-batch-size", "32", "--crop-padding", "0", "--max-train-images", "512",
          "--seed", "0", "--ablation-size", "4", "--hold-out-val", "no", "--train-precision",
          "fp32", "--device", "cpu"]


def invoke(cache: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env={"COLUMNS": "200",
                                                   "PATCHBENCH_CACHE": str(cache)})


@dataclass(frozen=True)
class Runs:
    cache: Path
    checkpoint: Path
    fp32: Path  # results folder of the cell certified at CERTIFIED in fp32
    bf16: Path  # the same cell certified in bf16


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # trains and builds reports


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("gallery-params")
    cache = root / "cache"
    trained = invoke(cache, "train", *RECIPE, "--threshold", str(TRAINED))
    assert trained.exit_code == 0, trained.output
    checkpoint = Path(trained.stdout.strip())
    folders = {}
    for precision in ("fp32", "bf16"):
        folders[precision] = root / precision
        run = invoke(cache, "run", *RECIPE, "--threshold", str(CERTIFIED), "--patch", "5x5",
                     "--n-images", str(N_IMAGES), "--precision", precision,
                     "--results-dir", str(folders[precision]))
        assert run.exit_code == 0, run.output
        assert "saved" not in run.stderr  # the cached model of threshold TRAINED, not a new one
    return Runs(cache, checkpoint, folders["fp32"], folders["bf16"])


def cell_row(results: Path) -> pd.Series:
    (path,) = (results / "rows").glob("*.csv")
    rows = pd.read_csv(path)
    return rows[rows["condition"] == "tight"].iloc[0]


def examples(runs: Runs, results: Path, monkeypatch: pytest.MonkeyPatch) -> list[Example]:
    monkeypatch.setenv("PATCHBENCH_CACHE", str(runs.cache))
    _, found = gallery_examples(results, cell_row(results), ["5x5"], N_IMAGES, {})
    assert len(found) == N_IMAGES and all(isinstance(ex, Example) for ex in found)
    return found


def assert_reproduced(found: list[Example], per_image: pd.DataFrame) -> None:
    """Each example's votes are the stored ones, and its exact margin is the stored margin
    (which, where it is >= 0, is a lower bound of the exact one; both certify alike)."""
    stored = per_image.set_index("index")
    for ex in found:
        assert ex.votes_match, ex.index
        assert ex.prediction == stored.loc[ex.index, "prediction"], ex.index
        assert ex.stored_margin == stored.loc[ex.index, "margin_tight_5x5"]
        if ex.stored_margin < 0:
            assert ex.margin == ex.stored_margin, ex.index
        else:
            assert ex.margin >= ex.stored_margin, ex.index


def test_the_cells_are_certified_at_another_threshold_than_trained(
        runs: Runs, monkeypatch: pytest.MonkeyPatch) -> None:
    """The premise: the checkpoint says TRAINED, the rows CERTIFIED, and the cell read at
    TRAINED has other votes and margins on some of the images."""
    assert load_checkpoint(runs.checkpoint).defense.config.threshold == TRAINED
    for results in (runs.fp32, runs.bf16):
        row = cell_row(results)
        assert json.loads(row["params"])["threshold"] == CERTIFIED
        assert row["checkpoint_sha256"] == load_checkpoint(runs.checkpoint).sha256
    assert cell_row(runs.bf16)["precision"] == "bf16"
    monkeypatch.setenv("PATCHBENCH_CACHE", str(runs.cache))
    row = cell_row(runs.fp32)
    at_trained = row.copy()
    at_trained["params"] = json.dumps({**json.loads(row["params"]), "threshold": TRAINED})
    _, found = gallery_examples(runs.fp32, at_trained, ["5x5"], N_IMAGES, {})
    assert not all(ex.votes_match for ex in found)
    assert any(ex.margin < 0 <= ex.stored_margin for ex in found)  # certified, drawn broken


def test_the_gallery_redraws_a_cell_at_its_own_threshold(runs: Runs,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    (path,) = (runs.fp32 / "per_image").glob("*.csv.gz")
    per_image = pd.read_csv(path)
    found = examples(runs, runs.fp32, monkeypatch)
    assert_reproduced(found, per_image)
    # the threshold matters here: images certified at CERTIFIED, not at TRAINED
    assert any(ex.margin >= 0 for ex in found)


def test_the_gallery_redraws_a_cell_at_its_own_precision(runs: Runs,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The votes are computed by ``for_inference`` at the row's precision, as certify_split
    computed them (bf16 changes none of this model's votes on these images, so the
    reproduction alone cannot tell the precisions apart)."""
    asked = []

    def recording(model: torch.nn.Module, precision: str = "fp32") -> torch.nn.Module:
        asked.append(precision)
        return for_inference(model, precision)

    monkeypatch.setattr(gallery, "for_inference", recording)
    (path,) = (runs.bf16 / "per_image").glob("*.csv.gz")
    assert_reproduced(examples(runs, runs.bf16, monkeypatch), pd.read_csv(path))
    assert asked == ["bf16"]


def test_the_report_has_no_note_of_differing_votes(runs: Runs, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATCHBENCH_CACHE", str(runs.cache))
    text = build_report(runs.fp32, tmp_path / "report", gallery_images=3).read_text()
    assert "## Gallery" in text and "figures/gallery_1_" in text
    assert "differ from the stored ones" not in text
    gallery = pd.read_csv(tmp_path / "report" / "tables" / "gallery.csv")
    assert len(gallery) == 3 and gallery["votes match"].all()
    negative = gallery["stored margin"] < 0
    assert (gallery.loc[negative, "margin"] == gallery.loc[negative, "stored margin"]).all()
    assert (gallery.loc[~negative, "margin"] >= gallery.loc[~negative, "stored margin"]).all()
