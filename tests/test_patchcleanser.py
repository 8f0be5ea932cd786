"""PatchCleanser: the mask set covers every patch, double masking matches a slow reference,
and a certified image keeps its prediction under any patch content tried."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from patchbench.defenses.patchcleanser import (
    PatchCleanser,
    apply_masks,
    axis_masks,
    double_masking,
    mask_set,
    mask_tensor,
)
from patchbench.patches import PatchShape, parse_patches

STUDY_GRID = parse_patches(["1x1,2x2,3x3,4x4,5x5,6x6,7x7,8x8,9x9,10x10,"
                            "1x24,2x12,3x8,4x6,6x4,8x3,12x2,24x1"])


@pytest.mark.parametrize("k", [1, 2, *(pytest.param(k, marks=pytest.mark.slow)
                                      for k in (3, 4, 5, 6, 7, 8))])
def test_every_position_of_every_study_shape_lies_inside_one_mask(k):
    """Exhaustive, corners included: for each patch position, some mask contains all of it."""
    image_hw = (28, 28)
    for patch in STUDY_GRID:
        masks = mask_tensor(mask_set(patch, image_hw, k), image_hw)
        assert len(masks) <= k * k
        for top in range(28 - patch.height + 1):
            for left in range(28 - patch.width + 1):
                box = torch.zeros(image_hw, dtype=torch.bool)
                box[top:top + patch.height, left:left + patch.width] = True
                covered = (masks | ~box).all(dim=2).all(dim=1)
                assert covered.any(), (patch, k, top, left)


def test_the_published_mask_set_for_5x5_on_28_pixels():
    assert axis_masks(28, 5, 6) == ((0, 4, 8, 12, 16, 20), 8)  # stride 4, side 8, 36 masks
    assert axis_masks(28, 24, 6) == ((0, 1, 2, 3, 4), 24)  # stride 1: fewer distinct starts
    (rows, row_side), (cols, col_side) = mask_set(PatchShape(2, 12), (28, 28), 6)
    assert (row_side, col_side) == (6, 14) and rows[-1] == 22 and cols[-1] == 14


class LookupModel(nn.Module):
    """A deterministic classifier of masked images with many disagreements: the class is a
    hash of the rounded pixel sums of a few regions (no training, any label pattern)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        regions = [x[:, :, :h // 2, :w // 2], x[:, :, h // 2:, :w // 2],
                   x[:, :, :, w // 2:]]
        code = sum((r.sum(dim=(1, 2, 3)) * 4).round().long() * (i + 1)
                   for i, r in enumerate(regions))
        return nn.functional.one_hot(code % self.num_classes, self.num_classes).float()


def reference_double_masking(model, image, masks, value):
    """The published algorithm, one image, plain loops."""
    def label(*ms):
        combined = torch.zeros_like(masks[0])
        for m in ms:
            combined |= m
        return int(model(apply_masks(image[None], combined[None], value))[0].argmax())

    first = [label(m) for m in masks]
    counts = {c: first.count(c) for c in set(first)}
    majority = min(c for c in counts if counts[c] == max(counts.values()))
    certified = all(label(a, b) == majority for a, b in
                    itertools.combinations_with_replacement(list(masks), 2)) \
        if len(set(first)) == 1 else False
    if len(set(first)) == 1:
        return majority, certified
    for i, m in enumerate(masks):
        if first[i] != majority and all(label(m, other) == first[i] for other in masks):
            return first[i], False
    return majority, False


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 3), classes=st.integers(2, 4),
       ph=st.integers(1, 4), pw=st.integers(1, 4))
def test_double_masking_matches_the_published_loop(seed, k, classes, ph, pw):
    gen = torch.Generator().manual_seed(seed)
    images = (torch.rand(5, 1, 8, 8, generator=gen) * 2).round() / 2  # many exact ties
    model = LookupModel(classes)
    masks = mask_tensor(mask_set(PatchShape(ph, pw), (8, 8), k), (8, 8))
    out = double_masking(model, images, masks, 0.5, classes, max_forward=7)
    for b in range(len(images)):
        prediction, certified = reference_double_masking(model, images[b], masks, 0.5)
        assert int(out.prediction[b]) == prediction
        assert bool(out.certified[b]) == certified


@pytest.mark.slow  # many masked passes
def test_a_certified_image_keeps_its_prediction_under_patches():
    """Soundness on a random (untrained) network: every position, extreme and random content."""
    torch.manual_seed(0)
    defense = PatchCleanser(masks_per_axis=3, width=4)
    model = defense.build_model((1, 10, 10), 3).eval()
    images = torch.rand(40, 1, 10, 10)
    patch = PatchShape(3, 2)
    cert = defense.certify(model, images, [patch])
    assert cert.certified["masking"].any()
    for b in cert.certified["masking"][:, 0].nonzero().flatten().tolist()[:4]:
        for top in range(10 - patch.height + 1):
            for left in range(10 - patch.width + 1):
                for fill in (torch.zeros(3, 2), torch.ones(3, 2), torch.rand(3, 2)):
                    patched = images[b:b + 1].clone()
                    patched[0, 0, top:top + 3, left:left + 2] = fill
                    got = defense.defended_prediction(model, patched, patch)
                    assert int(got) == int(cert.prediction[b, 0])


def test_shapes_with_the_same_mask_set_share_one_pass():
    defense = PatchCleanser(masks_per_axis=2, width=4)
    model = defense.build_model((1, 12, 12), 3).eval()
    shapes = [PatchShape(5, 5), PatchShape(6, 6), PatchShape(5, 6)]
    assert mask_set(shapes[0], (12, 12), 2) != mask_set(shapes[1], (12, 12), 2)
    cert = defense.certify(model, torch.rand(6, 1, 12, 12), shapes)
    assert cert.prediction.shape == (6, 3) and cert.certified["masking"].shape == (6, 3)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="masks_per_axis"):
        PatchCleanser(masks_per_axis=0)
    with pytest.raises(ValueError, match="train_patch_min"):
        PatchCleanser(train_patch_min=5, train_patch_max=2)
    with pytest.raises(ValueError, match="timm"):
        PatchCleanser(base="no-such-model")


def test_training_masks_are_two_masks_of_one_shape_set():
    defense = PatchCleanser(train_patch_min=5, train_patch_max=5)
    masks = defense.random_masks(64, (28, 28), torch.device("cpu"))
    allowed = mask_tensor(mask_set(PatchShape(5, 5), (28, 28), 6), (28, 28))
    unions = {tuple((a | b).flatten().tolist()) for a in allowed for b in allowed}
    assert all(tuple(m.flatten().tolist()) in unions for m in masks)


def test_a_timm_base_classifier_builds_and_certifies():
    defense = PatchCleanser(base="resnet10t", masks_per_axis=2)
    model = defense.build_model((1, 16, 16), 4).eval()
    cert = defense.certify(model, torch.rand(2, 1, 16, 16), [PatchShape(3, 3)])
    assert cert.prediction.shape == (2, 1)
