"""The attack on a defense without a vote map (PatchCleanser): sound certificates survive it,
a mask set with a hole is caught, and a defense without the attack hooks says so."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from torch import Tensor, nn

from patchbench.certify import Certificate
from patchbench.cli import cli
from patchbench.defense import Defense
from patchbench.defenses.patchcleanser import CONDITION, PatchCleanser, double_masking
from patchbench.patches import PatchShape
from patchbench.running.attack import (
    AttackBudget,
    AttackUnsupportedError,
    SoundnessError,
    attack_split,
    central_order,
    summarize_attack,
)
from patchbench.running.checkpoint import save_checkpoint
from patchbench.running.data import SYNTHETIC_CLASSES, ImageData, TensorImages, load_dataset
from patchbench.running.train import TrainConfig, train

SIDE = 12
CORNER_PATCH = PatchShape(3, 3)
# k = 3 on 12 x 12 for 3 x 3 patches: mask starts 0, 4, 6 per axis, side 6; only the first
# mask (rows and columns 0-5) holds pixel (0, 0)
CORNER = {"masks_per_axis": 3, "mask_value": 0.0, "width": 1}
QUICK = AttackBudget(steps=4, restarts=1, position_stride=SIDE)


class CornerPixel(nn.Module):
    """Class 1 iff pixel (0, 0) is above 1/2, else class 0: no training needed, and only a
    patch over the corner can change it."""

    def forward(self, x: Tensor) -> Tensor:
        z = 10 * (x[:, 0, 0, 0] - 0.5)
        return torch.stack([-z, z], dim=1)


class Uncovered(PatchCleanser):
    """PatchCleanser with a hole in its mask set: the first mask (the one that holds the
    corner) is dropped, so a patch on the corner lies in no mask; certification uses it too."""

    name = "patchcleanser-uncovered"

    def masks(self, patch: PatchShape, image_hw: tuple[int, int],
              device: torch.device | str | None = None) -> Tensor:
        return super().masks(patch, image_hw, device)[1:]

    def certify(self, model: nn.Module, images: Tensor, patches: Sequence[PatchShape],
                conditions: Sequence[str] = (CONDITION,)) -> Certificate:
        image_hw = (images.shape[-2], images.shape[-1])
        outcomes = [double_masking(model, images, self.masks(p, image_hw, images.device),
                                   self.config.mask_value, self._num_classes(model, images))
                    for p in patches]
        certified = torch.stack([o.certified for o in outcomes], dim=1)
        return Certificate(prediction=torch.stack([o.prediction for o in outcomes], dim=1),
                           certified={cond: certified.clone() for cond in conditions})


def corner_images(n: int) -> ImageData:
    """Dark corners (class 0) under random content elsewhere."""
    images = torch.rand(n, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    images[:, :, 0, 0] = 0.2
    return ImageData("synthetic", "test", TensorImages(images, torch.zeros(n, dtype=torch.long)),
                     (1, SIDE, SIDE), SYNTHETIC_CLASSES[:2])


def test_central_order_is_the_grid_centre_first():
    boxes = central_order((SIDE, SIDE), CORNER_PATCH, 4)
    assert sorted(map(tuple, boxes[:, :2].tolist())) == sorted(
        (t, u) for t in (0, 4, 8, 9) for u in (0, 4, 8, 9))
    assert boxes[0, :2].tolist() == [4, 4] and (boxes[:, 2:] == 3).all()


def test_a_sound_mask_set_survives_the_corner_attack():
    """The full mask set: every image certified, the corner patch flips the one-mask labels
    of the masks that do not hold it, and double masking still says 0."""
    result = attack_split(PatchCleanser(**CORNER), CornerPixel(), corner_images(4),
                          [CORNER_PATCH], QUICK, show_progress=False)
    result.check()
    table = result.per_image
    assert table[f"certified_{CONDITION}_3x3"].all() and table["attacked_3x3"].all()
    assert not table["broken_3x3"].any() and (table["adv_top_3x3"] == -1).all()
    summary = summarize_attack(result, [CORNER_PATCH])
    assert summary[["empirical_accuracy", f"certified_accuracy_{CONDITION}"]].values.tolist() \
        == [[1.0, 1.0]]


def test_a_hole_in_the_mask_set_is_caught():
    """Without the corner's mask a certificate is wrong, and the attack finds the one
    position that shows it."""
    result = attack_split(Uncovered(**CORNER), CornerPixel(), corner_images(4),
                          [CORNER_PATCH], QUICK, show_progress=False)
    table = result.per_image
    assert table[f"certified_{CONDITION}_3x3"].all()
    assert len(result.violations) == 4 and table["broken_3x3"].all()
    first = result.violations[0]
    assert (first.top, first.left, first.conditions) == (0, 0, (CONDITION,))
    assert (first.prediction, first.adv_prediction, first.margin) == (0, 1, None)
    assert (table["adv_prediction_3x3"] == 1).all()
    with pytest.raises(SoundnessError, match=r"image 0, patch 3x3 at \(top 0, left 0\): "
                                             r"certified \(masking\) but the prediction "
                                             r"changed 0 -> 1$"):
        result.check()
    summary = summarize_attack(result, [CORNER_PATCH])
    assert summary["n_violations"].tolist() == [4] and summary["empirical_accuracy"][0] == 0


class Bare(Defense):
    name = "bare"
    conditions = ("exact",)

    def build_model(self, in_shape, num_classes):
        return nn.Flatten()

    def loss(self, model, images, labels, step):
        raise NotImplementedError

    def certify(self, model, images, patches, conditions):
        raise NotImplementedError


def test_a_defense_without_the_hooks_is_unsupported():
    with pytest.raises(AttackUnsupportedError, match=r"^attack not supported by bare: it lacks "
                                                     r"attack_surrogate, defended_prediction$"):
        attack_split(Bare(), nn.Flatten(), corner_images(2), [CORNER_PATCH], QUICK,
                     show_progress=False)


@functools.cache
def trained_patchcleanser() -> tuple[PatchCleanser, nn.Module]:
    torch.manual_seed(0)
    defense = PatchCleanser(width=8)
    model, _ = train(defense, load_dataset("fashion-mnist", "train").subset(3000),
                     TrainConfig(epochs=2, batch_size=64), show_progress=False)
    return defense, model


@pytest.mark.slow
def test_trained_patchcleanser_certificates_survive_the_attack():
    """Fashion-MNIST, 5x5 and 2x12: zero violations, on images of which some are certified."""
    defense, model = trained_patchcleanser()
    patches = [PatchShape(5, 5), PatchShape(2, 12)]
    budget = AttackBudget(steps=3, restarts=1, position_stride=12)
    result = attack_split(defense, model, load_dataset("fashion-mnist", "test").subset(30),
                          patches, budget, show_progress=False)
    result.check()
    table = result.per_image
    for patch in patches:
        certified = table[f"certified_{CONDITION}_{patch}"].astype(bool)
        assert certified.any()
        assert table.loc[certified, f"attacked_{patch}"].all()
        broken = table[f"broken_{patch}"]
        assert (table.loc[broken, f"adv_prediction_{patch}"]
                != table.loc[broken, f"prediction_{patch}"]).all()
    summary = summarize_attack(result, patches)
    assert (summary["empirical_accuracy"] >= summary[f"certified_accuracy_{CONDITION}"]).all()
    assert (summary["clean_accuracy"] >= summary["empirical_accuracy"]).all()


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), env={"COLUMNS": "200"})


ATTACK = ["attack", "--defense", "patchcleanser", "--dataset", "synthetic", "--n-images", "2",
          "--patch", "5x5", "--steps", "1", "--restarts", "1", "--position-stride", "28"]


@pytest.fixture()
def checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An untrained small PatchCleanser for ``synthetic``."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    defense = PatchCleanser(width=2, masks_per_axis=2)
    model = defense.build_model((1, 28, 28), len(SYNTHETIC_CLASSES)).eval()
    save_checkpoint("pc.pt", defense, model, {
        "dataset": "synthetic", "in_shape": [1, 28, 28], "classes": list(SYNTHETIC_CLASSES)})
    return Path("pc.pt").resolve()


def test_cli_attacks_patchcleanser(checkpoint: Path):
    result = invoke(*ATTACK, "--checkpoint", str(checkpoint))
    assert result.exit_code == 0, result.output
    assert "certified (masking)" in result.output
    (rows,) = [pd.read_csv(p) for p in Path("results/rows").glob("*.csv")]
    assert rows["patch"].tolist() == ["5x5"] and rows["n_violations"].tolist() == [0]
    assert {"certified_accuracy_masking", "empirical_accuracy"} <= set(rows.columns)
    assert "certified_accuracy_tight" not in rows.columns


def test_cli_attack_of_an_unsupported_defense_is_one_line(checkpoint: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(PatchCleanser, "attack_surrogate", None)
    result = invoke(*ATTACK, "--checkpoint", str(checkpoint))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip() == ("Error: attack not supported by patchcleanser: it lacks "
                                     "attack_surrogate")
