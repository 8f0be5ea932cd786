"""(De)Randomized Smoothing: ablation masks, encoding, votes, footprints, loss, registry."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from patchbench.defense import get_defense
from patchbench.defenses.smoothing import (
    BlockSmoothing,
    ColumnSmoothing,
    RowSmoothing,
    SmallCNN,
    Smoothing,
    ablation_masks,
    build_base_classifier,
    encode,
    load_base_classifier,
    smoothed_votes,
    vote_map_hw,
)
from patchbench.patches import PatchShape
from patchbench.running.checkpoint import save_checkpoint

DEFENSES = {"column": ColumnSmoothing, "row": RowSmoothing, "block": BlockSmoothing}


def kept_pixels(mode: str, position: int, hw: tuple[int, int], s: int) -> set[tuple[int, int]]:
    """Kept pixels of one ablation, written out independently of ``ablation_masks``."""
    h, w = hw
    if mode == "column":
        return {(r, (position + k) % w) for r in range(h) for k in range(s)}
    if mode == "row":
        return {((position + k) % h, c) for k in range(s) for c in range(w)}
    i, j = divmod(position, w)
    return {((i + a) % h, (j + b) % w) for a in range(s) for b in range(s)}


def mask_from_pixels(pixels: set[tuple[int, int]], hw: tuple[int, int]) -> torch.Tensor:
    mask = torch.zeros(hw, dtype=torch.bool)
    for r, c in pixels:
        mask[r, c] = True
    return mask


def test_column_mask_wraps_around():
    masks = ablation_masks("column", 2, (3, 5))
    assert masks.shape == (5, 3, 5) and masks.dtype == torch.bool
    assert masks[4].tolist() == [[True, False, False, False, True]] * 3  # columns 4 and 0
    assert masks[1].tolist() == [[False, True, True, False, False]] * 3


def test_row_mask_wraps_around():
    masks = ablation_masks("row", 2, (5, 3))
    assert masks.shape == (5, 5, 3)
    assert masks[4].tolist() == [[True] * 3, [False] * 3, [False] * 3, [False] * 3, [True] * 3]


def test_block_masks_are_row_major_and_wrap_in_both_axes():
    masks = ablation_masks("block", 2, (4, 5))
    assert masks.shape == (20, 4, 5)
    corner = masks[3 * 5 + 4]  # block (3, 4): rows 3, 0 and columns 4, 0
    assert corner.nonzero().tolist() == [[0, 0], [0, 4], [3, 0], [3, 4]]
    assert masks[1 * 5 + 2].nonzero().tolist() == [[1, 2], [1, 3], [2, 2], [2, 3]]


@pytest.mark.parametrize("mode", DEFENSES)
@pytest.mark.parametrize(("hw", "s"), [((4, 5), 2), ((5, 3), 3), ((3, 4), 6)])
def test_masks_match_hand_enumeration(mode, hw, s):
    masks = ablation_masks(mode, s, hw)
    h, w = vote_map_hw(mode, hw)
    assert masks.shape == (h * w, *hw)
    for p in range(h * w):
        assert torch.equal(masks[p], mask_from_pixels(kept_pixels(mode, p, hw, s), hw))
    some = torch.tensor([h * w - 1, 0, h * w - 1])
    assert torch.equal(ablation_masks(mode, s, hw, some), masks[some])


def test_encode_keeps_x_and_one_minus_x_and_blanks_the_rest():
    x = torch.arange(15, dtype=torch.float32).view(1, 1, 3, 5) / 15
    out = encode(x, ablation_masks("column", 2, (3, 5))[4:5])
    assert out.shape == (1, 2, 3, 5)
    for c in range(5):
        kept = c in (4, 0)
        assert torch.equal(out[0, 0, :, c], x[0, 0, :, c] if kept else torch.zeros(3))
        assert torch.equal(out[0, 1, :, c], 1 - x[0, 0, :, c] if kept else torch.zeros(3))


def test_encode_stacks_every_channel():
    x = torch.rand(2, 3, 4, 4)
    mask = torch.ones(4, 4, dtype=torch.bool)
    assert torch.equal(encode(x, mask), torch.cat([x, 1 - x], dim=1))


def position_sensitive_model(in_ch: int, hw: tuple[int, int], classes: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(in_ch * hw[0] * hw[1], classes))
    with torch.no_grad():
        model[1].weight.mul_(20)
    return model.eval()


@pytest.mark.parametrize("mode", DEFENSES)
def test_batched_votes_equal_one_position_at_a_time(mode):
    hw, s, classes, threshold = (4, 5), 2, 4, 0.25
    images = torch.rand(3, 2, *hw, generator=torch.Generator().manual_seed(1))
    model = position_sensitive_model(4, hw, classes)
    h, w = vote_map_hw(mode, hw)
    masks = ablation_masks(mode, s, hw)
    expected = torch.zeros(3, classes, h, w, dtype=torch.bool)
    with torch.no_grad():
        for b in range(3):
            for p in range(h * w):
                probs = model(encode(images[b:b + 1], masks[p])).softmax(dim=1)[0]
                expected[b, :, p // w, p % w] = probs >= threshold
    assert 0 < expected.sum() < expected.numel()  # the threshold splits the votes
    got = smoothed_votes(model, images, mode, s, threshold, max_forward=7)  # uneven chunks
    assert torch.equal(got, expected)
    defense = DEFENSES[mode](ablation_size=s, threshold=threshold)
    assert torch.equal(defense.votes(model, images), expected)


@pytest.mark.parametrize("mode", DEFENSES)
@pytest.mark.parametrize(("hw", "s", "patch"),
                         [((6, 7), 2, (2, 3)), ((5, 5), 3, (1, 1)), ((5, 6), 2, (4, 5)),
                          ((4, 4), 2, (4, 4)), ((7, 5), 1, (3, 2))])
def test_footprints_equal_brute_force(mode, hw, s, patch):
    fp = DEFENSES[mode](ablation_size=s).footprints(PatchShape(*patch), hw)
    h, w = vote_map_hw(mode, hw)
    assert fp.map_hw == (h, w) and fp.cyclic
    kept = [kept_pixels(mode, p, hw, s) for p in range(h * w)]
    expected = set()
    for r in range(hw[0] - patch[0] + 1):
        for q in range(hw[1] - patch[1] + 1):
            touched = {(r + a, q + b) for a in range(patch[0]) for b in range(patch[1])}
            expected.add(frozenset(divmod(p, w) for p in range(h * w) if kept[p] & touched))
    cells = fp.cells()
    assert len(cells) == len(set(cells))
    assert set(cells) == expected
    assert fp.max_size == max(len(c) for c in expected)


def test_global_delta_is_the_published_one():
    patch, hw, s = PatchShape(5, 5), (32, 32), 4
    assert ColumnSmoothing(ablation_size=s).footprints(patch, hw).max_size == 5 + s - 1
    assert BlockSmoothing(ablation_size=s).footprints(patch, hw).max_size == (5 + s - 1) ** 2


@pytest.mark.parametrize("cls", DEFENSES.values())
def test_loss_is_a_finite_scalar_with_gradients(cls):
    defense = cls(width=4)
    model = defense.build_model((1, 8, 8), 3)
    images, labels = torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    loss, predictions = defense.loss(model, images, labels)
    assert loss.dim() == 0 and math.isfinite(loss.item())
    assert predictions.shape == (5,) and predictions.max() < 3
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    optimizer = defense.optimizer(model)
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["weight_decay"] == 5e-4


@pytest.mark.parametrize(("name", "cls"), [("ds-column", ColumnSmoothing),
                                           ("ds-row", RowSmoothing),
                                           ("ds-block", BlockSmoothing)])
def test_registered_by_entry_point(name, cls):
    loaded = get_defense(name)
    assert loaded is cls and loaded.name == name and loaded.description
    defense = loaded.from_params({"ablation_size": "2", "threshold": "0.3"})
    assert defense.config.ablation_size == 2 and defense.config.threshold == 0.3


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="ablation_size"):
        ColumnSmoothing(ablation_size=0)
    with pytest.raises(ValueError, match="threshold"):
        RowSmoothing(threshold=0.0)
    with pytest.raises(ValueError, match="timm"):
        BlockSmoothing(base="no-such-model")
    with pytest.raises(TypeError):
        Smoothing()


def test_small_cnn_takes_2c_channels_of_any_size():
    model = build_base_classifier("small-cnn", (3, 13, 17), 7, width=4)
    assert isinstance(model, SmallCNN)
    assert model(torch.rand(2, 6, 13, 17)).shape == (2, 7)


def test_timm_base_takes_2c_channels_with_a_small_image_stem():
    defense = ColumnSmoothing(base="resnet18")
    model = defense.build_model((1, 28, 28), 10)
    assert model.conv1.in_channels == 2
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert model.eval()(torch.rand(2, 2, 28, 28)).shape == (2, 10)
    assert defense.num_parameters(model) > 10_000_000


def test_load_base_classifier_reads_a_real_checkpoint(tmp_path):
    defense = BlockSmoothing(ablation_size=3, threshold=0.4, width=4)
    model = defense.build_model((1, 8, 8), 2).eval()
    path = tmp_path / "block.pt"
    save_checkpoint(path, defense, model, {"dataset": "synthetic", "in_shape": [1, 8, 8],
                                           "classes": ["a", "b"]})
    base = load_base_classifier(path, threshold=0.4)
    assert base[1:] == (3, 0.4, "block")
    assert not base.model.training
    images = torch.rand(2, 1, 8, 8)
    assert torch.equal(smoothed_votes(base.model, images, base.mode, 3, base.threshold),
                       defense.votes(model, images))


def test_load_base_classifier_holds_the_callers_threshold_not_the_trained_one(tmp_path):
    """The threshold is certification-only: the checkpoint's (0.4, from training) is never
    handed out; the caller's is, checked as the defense checks it."""
    torch.manual_seed(0)
    trained = ColumnSmoothing(ablation_size=2, threshold=0.4, width=4)
    model = trained.build_model((1, 8, 8), 2).eval()
    path = tmp_path / "column.pt"
    save_checkpoint(path, trained, model, {"dataset": "synthetic", "in_shape": [1, 8, 8],
                                           "classes": ["a", "b"]})
    assert load_base_classifier(path)[1:] == (2, None, "column")
    base = load_base_classifier(path, 0.7)
    assert base[1:] == (2, 0.7, "column")
    images = torch.rand(3, 1, 8, 8)
    certified_at = ColumnSmoothing(ablation_size=2, threshold=0.7, width=4)
    votes = smoothed_votes(base.model, images, base.mode, 2, base.threshold)
    assert torch.equal(votes, certified_at.votes(model, images))
    assert not torch.equal(votes, trained.votes(model, images))
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="threshold must be in"):
            load_base_classifier(path, bad)


def test_load_base_classifier_refuses_a_bagcert_checkpoint(tmp_path):
    from patchbench.defenses.bagcert import BagCert

    defense = BagCert(rf=3, width=4)
    path = tmp_path / "bagcert.pt"
    save_checkpoint(path, defense, defense.build_model((1, 8, 8), 2),
                    {"dataset": "synthetic", "in_shape": [1, 8, 8], "classes": ["a", "b"]})
    with pytest.raises(TypeError, match="not a smoothing defense"):
        load_base_classifier(path)
