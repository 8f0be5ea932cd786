"""certify_split: one vote map per image for all shapes, and the certify escape hatch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from patchbench.certify import Certificate, certify_votes
from patchbench.data import batches, load_dataset
from patchbench.defense import get_defense
from patchbench.defenses.bagcert import BagCert
from patchbench.defenses.smoothing import ColumnSmoothing
from patchbench.evaluate import certify_split, for_inference, loader_options, summarize
from patchbench.patches import PatchShape

PATCHES = [PatchShape(2, 2), PatchShape(2, 12)]


class CountingBagCert(BagCert):
    """A BagCert that counts vote-map computations."""

    calls = 0

    def votes(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return super().votes(model, images)


class OwnCertificate(BagCert):
    """Overrides certify (the escape hatch): never certifies anything."""

    def certify(self, model, images, patches, conditions=("tight", "global")) -> Certificate:
        base = certify_votes(self.votes(model, images),
                             [self.footprints(p, images.shape[-2:]) for p in patches],
                             conditions)
        return Certificate(base.prediction, base.counts,
                           {c: torch.full_like(m, -7) for c, m in base.margin.items()})


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


def test_a_defense_that_overrides_certify_is_certified_its_own_way():
    data = load_dataset("synthetic", "test").subset(8)
    defense = OwnCertificate(rf=5, width=4)
    assert not defense.certifies_from_votes and BagCert().certifies_from_votes
    model = defense.build_model(data.in_shape, data.num_classes)
    evaluation = certify_split(defense, model, data, PATCHES, ["tight"], show_progress=False)
    assert (evaluation.per_image["margin_tight_2x2"] == -7).all()
    assert evaluation.forward_seconds == 0


class DataDependent(nn.Module):
    """Control flow on values: torch.fx cannot trace it, so it must run unfolded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y


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
