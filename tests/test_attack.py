"""The patch attack: sound certificates survive it, it has teeth, and a wrong certificate is
caught (so the soundness check can fail). Tiny models on 12 x 12 stripes keep it fast."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from patchbench.certify import CONDITIONS
from patchbench.cli import cli
from patchbench.defense import Defense, get_defense
from patchbench.patches import PatchShape
from patchbench.running.attack import AttackBudget, SoundnessError, attack_split, summarize_attack
from patchbench.running.checkpoint import save_checkpoint
from patchbench.running.data import SYNTHETIC_CLASSES, ImageData, TensorImages, make_stripes
from patchbench.running.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models train faster on one thread

SIDE = 12
DEFENSES = {"bagcert": {"rf": 5, "width": 8, "patch_min": 1, "patch_max": 3, "lr": 3e-3,
                        "cell_loss": "ce"},
            "ds-column": {"width": 8, "ablation_size": 3},
            "ds-row": {"width": 8, "ablation_size": 3},
            "ds-block": {"width": 8, "ablation_size": 4}}
PATCHES = [PatchShape(1, 1), PatchShape(2, 3)]
# the corner positions and the 3 most vulnerable ones
QUICK = AttackBudget(steps=3, restarts=1, position_stride=SIDE, worst_positions=3)
STRONG = dataclasses.replace(QUICK, steps=5)


def stripes(n: int, seed: int) -> ImageData:
    images, labels = make_stripes(n, size=SIDE, seed=seed)
    return ImageData("synthetic", "test", TensorImages(images, labels), (1, SIDE, SIDE),
                     SYNTHETIC_CLASSES)


@functools.cache
def trained_model(name: str) -> tuple[Defense, torch.nn.Module]:
    """(defense, model) trained in a few seconds: accurate, most images certified for 1 x 1
    patches, about half for 2 x 3, none for 7 x 7."""
    torch.manual_seed(0)
    defense = get_defense(name)(**DEFENSES[name])
    model, _ = train(defense, stripes(512, seed=0),
                     TrainConfig(epochs=3, batch_size=32, crop_padding=0), show_progress=False)
    return defense, model


@pytest.fixture(params=list(DEFENSES))
def trained(request) -> tuple[Defense, torch.nn.Module]:
    return trained_model(request.param)


@pytest.mark.slow  # probes every pixel of every defense
def test_touched_cells_are_the_footprints(trained):
    """The attack's own geometry (``touched_cells``) and the certificate's agree exactly."""
    defense, _ = trained
    for patch in PATCHES + [PatchShape(5, 2)]:
        tops, lefts = torch.meshgrid(torch.arange(SIDE - patch.height + 1),
                                     torch.arange(SIDE - patch.width + 1), indexing="ij")
        boxes = torch.stack([tops.flatten(), lefts.flatten(),
                             torch.full_like(tops.flatten(), patch.height),
                             torch.full_like(tops.flatten(), patch.width)], dim=1)
        touched = {frozenset(map(tuple, cells.nonzero().tolist()))
                   for cells in defense.touched_cells((SIDE, SIDE), boxes)}
        assert touched == set(defense.footprints(patch, (SIDE, SIDE)).cells())


@pytest.mark.slow  # trains a model of every defense
def test_certified_images_survive_the_attack(trained):
    """Zero violations for both conditions (global implies tight), on images of which some
    are certified, so the check is not vacuous."""
    defense, model = trained
    result = attack_split(defense, model, stripes(12, seed=1), PATCHES, QUICK,
                          show_progress=False)
    result.check()
    table = result.per_image
    assert (table["margin_tight_1x1"] >= 0).any()
    for patch in PATCHES:
        for cond in CONDITIONS:
            certified = table[f"margin_{cond}_{patch}"] >= 0
            assert table.loc[certified, f"attacked_{patch}"].all()
            assert not table.loc[certified, f"broken_{patch}"].any()
    summary = summarize_attack(result, PATCHES)
    assert (summary["empirical_accuracy"] >= summary["certified_accuracy_tight"]).all()
    assert (summary["certified_accuracy_tight"] >= summary["certified_accuracy_global"]).all()


@pytest.mark.slow  # trains a model of every defense
def test_the_attack_breaks_uncertified_images(trained):
    """A 7 x 7 patch: the attack flips correct, uncertified images, and the witness it reports
    changes the prediction."""
    defense, model = trained
    patch = PatchShape(7, 7)
    result = attack_split(defense, model, stripes(12, seed=1), [patch], STRONG,
                          show_progress=False)
    table = result.per_image
    broken = table[f"broken_{patch}"]
    correct = table["prediction"] == table["label"]
    assert (broken & correct & (table[f"margin_tight_{patch}"] < 0)).any()
    assert (table.loc[broken, f"adv_prediction_{patch}"] != table.loc[broken, "prediction"]).all()
    assert (table.loc[broken, f"adv_top_{patch}"] >= 0).all()


@pytest.mark.slow  # trains a model of every defense
def test_a_wrong_certificate_is_caught(trained, monkeypatch):
    """Certify 7 x 7 patches with the footprints of 1 x 1 ones: the attack must find
    certified images it breaks, and ``check`` must say which."""
    defense, model = trained
    small = defense.footprints
    monkeypatch.setattr(defense, "footprints",
                        lambda patch, image_hw: small(PatchShape(1, 1), image_hw))
    result = attack_split(defense, model, stripes(12, seed=1), [PatchShape(7, 7)], STRONG,
                          show_progress=False)
    assert result.violations
    first = result.violations[0]
    assert first.adv_prediction != first.prediction and "tight" in first.conditions
    assert first.counts_after != first.counts_before
    with pytest.raises(SoundnessError, match=rf"image {first.index}, patch 7x7 at \(top "):
        result.check()


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), env={"COLUMNS": "200"})


def write_checkpoint(name: str) -> Path:
    """A model above as a checkpoint for ``synthetic`` (28 x 28 stripes: the networks are
    fully convolutional, so a model of 12 x 12 stripes votes on them as well)."""
    defense, model = trained_model(name)
    save_checkpoint(f"{name}.pt", defense, model, {
        "dataset": "synthetic", "in_shape": [1, SIDE, SIDE], "classes": list(SYNTHETIC_CLASSES)})
    return Path(f"{name}.pt").resolve()


@pytest.fixture()
def checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return write_checkpoint("bagcert")


ATTACK = ["attack", "--defense", "bagcert", "--dataset", "synthetic", "--n-images", "6",
          "--steps", "2", "--restarts", "1", "--position-stride", "9"]


@pytest.mark.slow  # trains
def test_cli_attack_writes_empirical_rows(checkpoint: Path):
    result = invoke(*ATTACK, "--patch", "2x2,3x5", "--checkpoint", str(checkpoint))
    assert result.exit_code == 0, result.output
    rows = pd.concat(pd.read_csv(p) for p in Path("results/rows").glob("*.csv"))
    assert list(rows["patch"]) == ["2x2", "3x5"]
    assert set(rows["metric"]) == {"empirical"} and (rows["n_violations"] == 0).all()
    assert {"empirical_accuracy", "certified_accuracy_tight", "attack_steps", "cell",
            "checkpoint_sha256"} <= set(rows.columns)
    assert len(list(Path("results/per_image").glob("*.csv.gz"))) == 1


@pytest.mark.slow  # trains
def test_cli_attack_skips_a_finished_cell_unless_forced(checkpoint: Path):
    """A study re-run resumes: a finished attack is not attacked again; --force redoes it,
    and a different budget is another cell."""
    args = [*ATTACK, "--patch", "2x2", "--checkpoint", str(checkpoint)]
    assert invoke(*args).exit_code == 0
    (rows,) = Path("results/rows").glob("*.csv")
    written = rows.read_bytes()
    again = invoke(*args)
    assert again.exit_code == 0 and f"skipped: attack cell {rows.stem} is finished" in again.output
    assert rows.read_bytes() == written
    forced = invoke(*args, "--force")
    assert forced.exit_code == 0 and "skipped" not in forced.output
    assert "images attacked in" in forced.output
    assert invoke(*args, "--steps", "1").exit_code == 0
    assert len(list(Path("results/rows").glob("*.csv"))) == 2


@pytest.mark.slow  # trains
def test_cli_attack_exits_4_on_a_violation(checkpoint: Path, monkeypatch: pytest.MonkeyPatch):
    """A wrong certificate (1 x 1 footprints for a 20 x 20 patch): exit code 4, one line naming
    the first violation, and the results still written."""
    bagcert = get_defense("bagcert")
    small = bagcert.footprints
    monkeypatch.setattr(bagcert, "footprints",
                        lambda self, patch, image_hw: small(self, PatchShape(1, 1), image_hw))
    result = invoke(*ATTACK, "--patch", "20x20", "--steps", "5", "--checkpoint", str(checkpoint))
    assert result.exit_code == 4, result.output
    assert "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if "soundness violation" in line]
    assert "first: image " in line and "patch 20x20 at (top " in line
    assert len(list(Path("results/rows").glob("*.csv"))) == 1


def test_cli_attack_without_a_trained_model_is_one_line(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(*ATTACK, "--patch", "2x2")
    assert result.exit_code == 1
    assert "no trained model" in result.output and "Traceback" not in result.output


@pytest.mark.slow  # trains
def test_cli_attack_applies_a_certify_only_threshold(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
    """As for ``run``: a smoothing threshold differing from training is no clash."""
    monkeypatch.chdir(tmp_path)
    path = write_checkpoint("ds-column")
    result = invoke(*ATTACK[:2], "ds-column", *ATTACK[3:], "--patch", "2x2", "--checkpoint",
                    str(path), "--threshold", "0.3")
    assert result.exit_code == 0, result.output
    (rows,) = [pd.read_csv(p) for p in Path("results/rows").glob("*.csv")]
    assert rows["param_threshold"].tolist() == [0.3]
    result = invoke(*ATTACK[:2], "ds-column", *ATTACK[3:], "--patch", "2x2", "--checkpoint",
                    str(path), "--ablation-size", "5")
    assert result.exit_code == 2 and "was trained with ablation_size=3" in result.output
