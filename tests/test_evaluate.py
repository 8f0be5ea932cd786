"""certify_split: one vote map per image for all shapes; a defense of another family that
certifies on its own, and its malformed certificates refused."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from patchbench.certify import Certificate
from patchbench.defense import Defense, TrainStep, VoteMapDefense, get_defense
from patchbench.defenses.bagcert import BagCert
from patchbench.defenses.smoothing import ColumnSmoothing
from patchbench.patches import PatchShape
from patchbench.running.data import batches, load_dataset
from patchbench.running.evaluate import (
    certify_split,
    check_certificate,
    for_inference,
    loader_options,
    summarize,
)

PATCHES = [PatchShape(2, 2), PatchShape(2, 12)]


class CountingBagCert(BagCert):
    """A BagCert that counts vote-map computations."""

    calls = 0

    def votes(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return super().votes(model, images)


class Plain(Defense):
    """Not a vote map: a 1x1 convolution whose pooled scores are the prediction; one condition
    of its own that certifies nothing (trivially sound), and a margin of -7 for a second."""

    name = "plain"
    conditions = ("never", "scored")

    def build_model(self, in_shape, num_classes):
        return nn.Conv2d(in_shape[0], num_classes, 1)

    def loss(self, model, images, labels, step: TrainStep):
        scores = model(images).mean(dim=(2, 3))
        return F.cross_entropy(scores, labels), scores.argmax(1)

    def certify(self, model, images, patches, conditions=conditions) -> Certificate:
        prediction = model(images).mean(dim=(2, 3)).argmax(1)
        per_shape = torch.stack([prediction + s for s in range(len(patches))], dim=1) % 4
        never = torch.zeros(len(images), len(patches), dtype=torch.bool)
        flags = {"never": never, "scored": never.clone()}
        return Certificate(per_shape, {c: flags[c] for c in conditions},
                           margin={"scored": torch.full(never.shape, -7)}
                           if "scored" in conditions else {})


class Malformed(Plain):
    """Returns whatever certificate ``make`` builds from a well-formed one."""

    def __init__(self, make: Callable[[Certificate], Certificate]) -> None:
        super().__init__()
        self.make = make

    def certify(self, model, images, patches, conditions=Plain.conditions) -> Certificate:
        return self.make(super().certify(model, images, patches, conditions))


def test_one_vote_map_per_batch_for_every_shape_and_condition():
    data = load_dataset("synthetic", "test").subset(40)
    defense = CountingBagCert(rf=5, width=4)
    model = defense.build_model(data.in_shape, data.num_classes)
    evaluation = certify_split(defense, model, data, PATCHES, ["tight", "global"],
                               batch_size=16, show_progress=False)
    assert CountingBagCert.calls == 3  # 40 images in batches of 16
    assert len(evaluation.per_image) == 40
    assert 0 < evaluation.forward_seconds <= evaluation.certify_seconds
    summary = summarize(evaluation, PATCHES, ["tight", "global"])
    assert len(summary) == 4
    assert (summary["certified_accuracy"] <= summary["clean_accuracy"]).all()


def test_a_defense_of_another_family_is_certified_its_own_way():
    data = load_dataset("synthetic", "test").subset(8)
    defense = Plain()
    assert not isinstance(defense, VoteMapDefense)
    model = defense.build_model(data.in_shape, data.num_classes)
    evaluation = certify_split(defense, model, data, PATCHES, ["never", "scored"],
                               batch_size=5, show_progress=False)
    table = evaluation.per_image
    assert list(table.columns) == ["index", "label", "prediction_2x2", "prediction_2x12",
                                   "certified_never_2x2", "certified_never_2x12",
                                   "margin_scored_2x2", "margin_scored_2x12"]
    assert table["index"].tolist() == list(range(8))
    assert ((table["prediction_2x12"] - table["prediction_2x2"]) % 4 == 1).all()
    assert (table["certified_never_2x2"] == 0).all() and (table["margin_scored_2x12"] == -7).all()
    assert math.isnan(evaluation.forward_seconds) and evaluation.certify_seconds > 0
    summary = summarize(evaluation, PATCHES, ["never", "scored"])
    assert len(summary) == 4 and (summary["certified_accuracy"] == 0).all()
    clean = summary.set_index(["patch", "condition"])["clean_accuracy"]
    for patch in PATCHES:
        assert clean[(str(patch), "never")] == (table[f"prediction_{patch}"]
                                                == table["label"]).mean()


def test_a_defense_without_certify_cannot_be_built():
    class NoCertify(Defense):
        def build_model(self, in_shape, num_classes):
            return nn.Identity()

        def loss(self, model, images, labels, step):
            raise NotImplementedError

    with pytest.raises(TypeError, match="certify"):
        NoCertify()


def _bool(shape) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.bool)


@pytest.mark.parametrize(("make", "fragment"), [
    (lambda c: Certificate(c.prediction[:1], c.certified, c.margin), "prediction of shape (1, 2)"),
    (lambda c: Certificate(c.prediction, {"never": c.certified["never"]}, c.margin),
     "conditions ['never'] instead of ['never', 'scored']"),
    (lambda c: Certificate(c.prediction, {**c.certified, "never": c.certified["never"].int()},
                           c.margin), "certified['never'] torch.int32 (8, 2)"),
    (lambda c: Certificate(c.prediction, {**c.certified, "never": _bool((8, 3))}, c.margin),
     "certified['never'] torch.bool (8, 3)"),
    (lambda c: Certificate(c.prediction, c.certified, {"scored": torch.zeros(8, 2)}),
     "margin['scored'] that disagrees with its certified flags"),
], ids=["prediction", "missing condition", "int flags", "flags of the wrong shape",
        "margin against flags"])
def test_a_malformed_certificate_is_rejected_clearly(make, fragment):
    data = load_dataset("synthetic", "test").subset(8)
    defense = Malformed(make)
    model = defense.build_model(data.in_shape, data.num_classes)
    with torch.no_grad():
        good = Plain().certify(model, next(iter(batches(data, 8)))[0], PATCHES)
    check_certificate(good, 8, ["never", "scored"], len(PATCHES), "plain")  # passes
    with pytest.raises(ValueError, match="malformed certificate") as raised:
        check_certificate(make(good), 8, ["never", "scored"], len(PATCHES), "plain")
    assert fragment in str(raised.value) and "'plain'" in str(raised.value)
    # and certify_split checks every batch of a defense that certifies on its own
    with pytest.raises(ValueError, match=r"defense 'plain' returned a malformed certificate"):
        certify_split(defense, model, data, PATCHES, ["never", "scored"], show_progress=False)


class DataDependent(nn.Module):
    """Control flow on values: torch.fx cannot trace it, so it must run unfolded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y


@pytest.mark.slow  # builds timm models
@pytest.mark.parametrize("name", ["bagcert", "ds-column", "resnet18", "untraceable"])
def test_for_inference_is_the_same_function_without_batchnorm(name: str) -> None:
    torch.manual_seed(0)
    if name == "untraceable":
        model = DataDependent()
    elif name == "resnet18":
        model = ColumnSmoothing(base="resnet18").build_model((1, 28, 28), 10)
    else:
        model = get_defense(name)().build_model((1, 28, 28), 10)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1)  # statistics unlike the identity init
        bn.running_var.uniform_(0.5, 2)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = for_inference(model)
    x = torch.rand(8, 2 if name != "bagcert" else 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model.eval()(x), rtol=1e-4, atol=1e-5)
    folded = not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert folded == (name != "untraceable")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_gpu_is_fed_pinned_batches_by_workers_and_a_cpu_in_process() -> None:
    assert loader_options(torch.device("cpu")) == {}
    gpu = loader_options(torch.device("cuda", 0))  # a device object needs no GPU
    assert gpu["pin_memory"] is True and 1 <= gpu["num_workers"] <= 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs CUDA")
def test_pinned_batches_hold_the_same_images() -> None:
    data = load_dataset("synthetic", split="test").subset(20)
    for (a, y), (b, z) in zip(batches(data, 8), batches(data, 8, pin_memory=True), strict=True):
        assert b.is_pinned() and torch.equal(a, b) and torch.equal(y, z)
