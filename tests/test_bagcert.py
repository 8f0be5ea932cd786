"""BagCert: footprints from receptive-field arithmetic agree with probing the network."""

from __future__ import annotations

import pytest
import torch

from patchbench.defenses.bagcert import BagCert, Heaviside, receptive_field
from patchbench.patches import PatchShape
from patchbench.running.checkpoint import load_checkpoint, save_checkpoint
from patchbench.running.data import load_dataset
from patchbench.running.train import TrainConfig, train

CONFIGS = [dict(rf=rf, padding=p) for rf in (5, 7, 9, 11, 13) for p in (0, 1)] + [
    dict(rf=7, padding=2),
    dict(rf=17, stride=8, padding=1), dict(rf=17, blocks_1x1=0, stride=8, padding=0)]


def probed_support(model: torch.nn.Module, in_shape: tuple[int, int, int],
                   trials: int = 2) -> torch.Tensor:
    """(h, w, H, W) bool: which input pixels move each output cell.

    One batched forward per random base image: every pixel perturbed on its own.
    """
    gen = torch.Generator().manual_seed(0)
    _, height, width = in_shape
    support = None
    with torch.no_grad():
        for trial in range(trials):
            base = torch.rand(1, *in_shape, generator=gen, dtype=torch.float64)
            probes = base.repeat(height * width + 1, 1, 1, 1)
            pixels = torch.arange(height * width)
            probes[pixels + 1, :, pixels // width, pixels % width] += 5.0 if trial % 2 else -5.0
            scores = model.double()(probes)
            changed = (scores[1:] - scores[:1]).abs().sum(1) > 1e-9  # (H*W, h, w)
            changed = changed.permute(1, 2, 0).reshape(*changed.shape[1:], height, width)
            support = changed if support is None else support | changed
    return support


def patch_footprints(support: torch.Tensor, patch: PatchShape) -> set[frozenset]:
    """Every set of cells that one placement of `patch` reaches, according to `support`."""
    side_h, side_w = support.shape[2:]
    cells = set()
    for r in range(side_h - patch.height + 1):
        for c in range(side_w - patch.width + 1):
            hit = support[:, :, r:r + patch.height, c:c + patch.width].flatten(2).any(2)
            cells.add(frozenset(map(tuple, hit.nonzero().tolist())))
    return cells


@pytest.mark.parametrize("params", [  # the fast subset probes the small receptive fields
    pytest.param(c, id="-".join(f"{k}{v}" for k, v in c.items()),
                 marks=[pytest.mark.slow] if c["rf"] > 5 else []) for c in CONFIGS])
def test_footprints_match_probing(params, monkeypatch):
    """The claimed footprints equal the structural support and cover the real network's.

    With ReLU replaced by the identity the network is affine, so probing finds exactly the
    structural receptive field (no dead unit can hide a pixel); the real network may reach
    fewer cells, never more.
    """
    torch.manual_seed(0)
    defense = BagCert(width=8, **params)
    side = 40 if params.get("stride", 1) > 1 else 20
    in_shape = (1, side, side)
    model = defense.build_model(in_shape, 2).eval()
    assert receptive_field(model.geometry())[0] == params["rf"]
    real = probed_support(model, in_shape)
    with monkeypatch.context() as patched:
        patched.setattr(torch.nn.functional, "relu", lambda x, inplace=False: x)
        structural = probed_support(model, in_shape, trials=1)
    assert not (real & ~structural).any()
    for patch in (PatchShape(1, 1), PatchShape(3, 2), PatchShape(5, 5)):
        fp = defense.footprints(patch, (side, side))
        assert fp.map_hw == tuple(structural.shape[:2])
        claimed = set(fp.cells())
        assert patch_footprints(structural, patch) == claimed
        assert all(any(cells <= big for big in claimed) for cells in patch_footprints(real, patch))


def test_straight_through_votes_are_binary_with_sigmoid_gradient():
    scores = torch.tensor([-2.0, -0.1, 0.0, 0.3, 4.0], requires_grad=True)
    votes = Heaviside.apply(scores, 0.5)
    assert votes.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    votes.sum().backward()
    sig = torch.sigmoid(scores.detach() / 0.5)
    assert torch.allclose(scores.grad, sig * (1 - sig) / 0.5)


def test_trained_checkpoint_reloads_to_identical_votes(tmp_path):
    data = load_dataset("synthetic", "train")
    defense = BagCert(rf=5, width=8)
    model, metrics = train(defense, data, TrainConfig(epochs=1, max_images=256, batch_size=64),
                           show_progress=False)
    path = tmp_path / "m.pt"
    sha = save_checkpoint(path, defense, model, {"dataset": "synthetic",
                                                 "in_shape": list(data.in_shape),
                                                 "classes": list(data.classes), "train": metrics})
    loaded = load_checkpoint(path, defense="bagcert", dataset="synthetic")
    assert loaded.sha256 == sha and loaded.defense.params() == defense.params()
    images = load_dataset("synthetic", "test").subset(32).dataset[torch.arange(32)][0]
    with torch.no_grad():
        assert torch.equal(defense.votes(model, images), loaded.defense.votes(loaded.model,
                                                                              images))


@pytest.mark.slow  # trains
def test_margin_training_certifies_on_synthetic_stripes():
    data = load_dataset("synthetic", "train")
    defense = BagCert(rf=5, width=16, margin=0.3, patch_max=4)
    model, _ = train(defense, data, TrainConfig(epochs=2, batch_size=64), show_progress=False)
    images, labels = load_dataset("synthetic", "test").subset(128).dataset[torch.arange(128)]
    cert = defense.certify(model, images, [PatchShape(3, 3)])
    correct = cert.prediction == labels
    assert correct.float().mean() > 0.8
    assert (correct & cert.certified["tight"][:, 0]).float().mean() > 0.5


@pytest.mark.slow  # trains
def test_bf16_training_learns_keeps_fp32_weights_and_reloads(tmp_path):
    """Mixed precision changes the arithmetic, not the model: weights stay fp32 and a saved
    model reloads to the same votes in plain fp32 evaluation."""
    data = load_dataset("synthetic", "train")
    defense = BagCert(rf=5, width=16, margin=0.3, patch_max=4)
    model, metrics = train(defense, data, TrainConfig(epochs=2, batch_size=64, precision="bf16"),
                           show_progress=False)
    assert metrics["train_precision"] == "bf16"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    images, labels = load_dataset("synthetic", "test").subset(128).dataset[torch.arange(128)]
    cert = defense.certify(model, images, [PatchShape(3, 3)])
    assert (cert.prediction == labels).float().mean() > 0.8
    path = tmp_path / "m.pt"
    save_checkpoint(path, defense, model, {"dataset": "synthetic", "in_shape": list(data.in_shape),
                                           "classes": list(data.classes), "train": metrics})
    loaded = load_checkpoint(path, defense="bagcert", dataset="synthetic")
    with torch.no_grad():
        assert torch.equal(defense.votes(model, images), loaded.defense.votes(loaded.model,
                                                                              images))


def test_unknown_training_precision_is_refused():
    with pytest.raises(ValueError, match="training precision must be one of"):
        train(BagCert(rf=5, width=8), load_dataset("synthetic", "train"),
              TrainConfig(epochs=1, precision="fp8"), show_progress=False)


def test_readme_main_job_finds_the_shipped_checkpoint():
    """Changing BagCert's defaults or recipe without retraining would make the README's first
    command train for an hour instead of certifying the shipped model."""
    from patchbench.running.cache import SHIPPED, find_checkpoint, model_key

    defense = BagCert()
    path = find_checkpoint(model_key(defense, "fashion-mnist",
                                     TrainConfig(**BagCert.train_defaults)))
    assert path is not None and path.parent == SHIPPED
    loaded = load_checkpoint(path, defense="bagcert", dataset="fashion-mnist")
    assert loaded.defense.params() == defense.params()
