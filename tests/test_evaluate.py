"""certify_split: one vote map per image for all shapes, and the certify escape hatch."""

from __future__ import annotations

import torch
from torch import nn

from patchbench.certify import Certificate, certify_votes
from patchbench.data import load_dataset
from patchbench.defenses.bagcert import BagCert
from patchbench.evaluate import certify_split, summarize
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
