"""(De)Randomized Smoothing (Levine & Feizi, NeurIPS 2020): block, column and row ablation.

A base classifier only ever sees one ablation of the image: a band of ``s`` columns (or rows),
or an ``s x s`` block, wrapping around the border, everything else blanked. Each ablation
position is one cell of the vote map and votes for every class whose softmax reaches the
threshold. A patch can only change the ablations whose kept pixels it meets, so its footprint
is a cyclic interval of cells on each ablated axis (``footprints.cyclic_intervals``).

Ablated pixels must be distinguishable from black ones, so the image is encoded as 2C
channels: ``(x, 1 - x)`` where kept and ``(0, 0)`` where ablated (images are in [0, 1]).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from patchbench.defense import DefenseConfig, ParameterError, TrainStep, VoteMapDefense
from patchbench.defenses.bases import SMALL_CNN, check_base, timm_classifier
from patchbench.footprints import Footprints, cyclic_intervals
from patchbench.patches import PatchShape, box_masks

# Which axes each mode ablates: (rows, columns).
ABLATED_AXES = {"column": (False, True), "row": (True, False), "block": (True, True)}
# Most encoded images per forward pass in ``smoothed_votes`` (block smoothing needs H*W each).
MAX_FORWARD = 4096
# Encoded input per forward block: about this much on a CPU (cache-sized, at least
# CPU_MIN_BLOCK images), at most this much on an accelerator (see ``forward_block_size``).
CPU_BLOCK_BYTES = 1 << 17
CPU_MIN_BLOCK = 16
MAX_BLOCK_BYTES = 256 << 20
# The masks of all positions are built once where they take at most this much.
MAX_MASK_BYTES = 64 << 20


@dataclass
class SmoothingConfig(DefenseConfig):
    ablation_size: int = 4  # s: band width in pixels, or block side
    threshold: float = 0.2  # theta: a class gets a cell's vote iff its softmax >= theta
    base: str = SMALL_CNN  # base classifier: "small-cnn" or any timm model name
    width: int = 32  # channels of the first small-CNN layer (doubled twice)
    lr: float = 0.1  # SGD learning rate (cosine schedule)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # SGD weight decay


def vote_map_hw(mode: str, image_hw: tuple[int, int]) -> tuple[int, int]:
    """Vote-map size: one cell per ablation position, a singleton axis where nothing is ablated."""
    rows, cols = ABLATED_AXES[mode]
    return (image_hw[0] if rows else 1, image_hw[1] if cols else 1)


def ablation_masks(mode: str, size: int, image_hw: tuple[int, int],
                   positions: Tensor | None = None,
                   device: torch.device | str | None = None) -> Tensor:
    """Kept-pixel masks, bool (P, H, W), of the ablations at ``positions``.

    Positions are flat vote-map cell indices (row-major, so block (i, j) is ``i * W + j``);
    all of them, in vote-map order, by default. Ablation (i, j) keeps rows ``i .. i+s-1`` and
    columns ``j .. j+s-1`` (mod H, W) of the axes ``mode`` ablates, and the whole other axis.
    Built by broadcasting, so a chunk of positions costs no Python loop.
    """
    height, width = image_hw
    map_h, map_w = vote_map_hw(mode, image_hw)
    if positions is None:
        positions = torch.arange(map_h * map_w, device=device)
    rows_ablated, cols_ablated = ABLATED_AXES[mode]
    row_band = size if rows_ablated else height
    col_band = size if cols_ablated else width
    rows = torch.arange(height, device=positions.device)
    cols = torch.arange(width, device=positions.device)
    keep_rows = (rows[None, :] - (positions // map_w)[:, None]) % height < row_band
    keep_cols = (cols[None, :] - (positions % map_w)[:, None]) % width < col_band
    return keep_rows[:, :, None] & keep_cols[:, None, :]


def encode(images: Tensor, masks: Tensor) -> Tensor:
    """(N, 2C, H, W) base-classifier input: ``(x, 1 - x)`` on kept pixels, ``(0, 0)`` elsewhere.

    ``masks`` is (N, H, W) or (H, W), bool or 0/1, broadcast against ``images`` (N, C, H, W).
    """
    keep = masks.to(images.dtype).unsqueeze(-3)
    return torch.cat([images * keep, (1 - images) * keep], dim=1)


def forward_block_size(images: Tensor, max_forward: int = MAX_FORWARD) -> int:
    """How many encoded images go through the base classifier at once.

    At most ``max_forward``; on a CPU, about ``CPU_BLOCK_BYTES`` of encoded input (at least
    ``CPU_MIN_BLOCK`` images), because a block whose activations stay in cache runs up to twice
    as fast per image as a large one; elsewhere at most ``MAX_BLOCK_BYTES`` of encoded input.
    """
    per_input = 2 * images[0].numel() * images.element_size()
    if images.device.type == "cpu":
        return max(1, min(max_forward, max(CPU_MIN_BLOCK, CPU_BLOCK_BYTES // per_input)))
    return max(1, min(max_forward, MAX_BLOCK_BYTES // per_input))


def ablated_blocks(images: Tensor, mode: str, size: int,
                   max_forward: int = MAX_FORWARD) -> Iterator[Tensor]:
    """The base classifier's inputs ``encode(image, mask)`` for every (image, position) pair,
    image-major and in vote-map order, in blocks of at most ``forward_block_size`` images.

    No gather and no Python loop over positions: a block holds whole images times all their
    positions (one broadcast product of ``(x, 1 - x)`` with the masks), or, where one image has
    more positions than a block holds, a range of positions of one image.
    """
    batch = images.shape[0]
    image_hw = (images.shape[-2], images.shape[-1])
    map_h, map_w = vote_map_hw(mode, image_hw)
    n_positions = map_h * map_w
    block = forward_block_size(images, max_forward)
    both = torch.cat([images, 1 - images], dim=1)  # (B, 2C, H, W)
    if n_positions * images[0, 0].numel() * images.element_size() <= MAX_MASK_BYTES:
        all_masks = ablation_masks(mode, size, image_hw, device=images.device)
        all_masks = all_masks.to(images.dtype).unsqueeze(1)  # (P, 1, H, W)
    else:  # built per block
        all_masks = None

    def masks(lo: int, hi: int) -> Tensor:
        if all_masks is not None:
            return all_masks[lo:hi]
        positions = torch.arange(lo, hi, device=images.device)
        return ablation_masks(mode, size, image_hw, positions).to(images.dtype).unsqueeze(1)

    if n_positions <= block:
        per = block // n_positions
        keep = masks(0, n_positions)
        for lo in range(0, batch, per):
            yield (both[lo:lo + per, None] * keep).flatten(0, 1)
        return
    for i in range(batch):
        for lo in range(0, n_positions, block):
            yield both[i] * masks(lo, min(lo + block, n_positions))


@torch.no_grad()
def smoothed_votes(model: nn.Module, images: Tensor, mode: str, size: int, threshold: float,
                   max_forward: int = MAX_FORWARD) -> Tensor:
    """Vote map, bool (B, classes, h, w): softmax >= threshold for every ablation position.

    All (image, position) pairs go through the model in blocks (``ablated_blocks``), so memory
    stays bounded even for block smoothing.
    """
    batch = images.shape[0]
    map_h, map_w = vote_map_hw(mode, (images.shape[-2], images.shape[-1]))
    chunks = [model(inputs).float().softmax(dim=1) >= threshold
              for inputs in ablated_blocks(images, mode, size, max_forward)]
    votes = torch.cat(chunks).view(batch, map_h * map_w, -1)
    return votes.transpose(1, 2).reshape(batch, -1, map_h, map_w)


class SmallCNN(nn.Module):
    """Base classifier sized for 28x28 inputs: cheap enough to run H*W ablations per image on
    a CPU; global pooling makes it accept any input size."""

    def __init__(self, in_ch: int, num_classes: int, width: int) -> None:
        super().__init__()
        chans = [in_ch, width, 2 * width, 4 * width]
        layers: list[nn.Module] = []
        for i, stride in enumerate((1, 2, 2)):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride, 1, bias=False),
                       nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(chans[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def build_base_classifier(base: str, in_shape: tuple[int, int, int], num_classes: int,
                          width: int) -> nn.Module:
    """A fresh base classifier taking the 2C-channel encoding of ``in_shape`` (C, H, W) images."""
    in_ch = 2 * in_shape[0]
    if base == SMALL_CNN:
        return SmallCNN(in_ch, num_classes, width)
    return timm_classifier(base, in_ch, num_classes, max(in_shape[1:]))


class Smoothing(VoteMapDefense):
    """Shared implementation; subclasses only pick the ablation ``mode``."""

    mode: ClassVar[str] = ""
    max_forward: int = MAX_FORWARD  # lower it on an instance for large images or base models
    Config = SmoothingConfig
    config: SmoothingConfig
    train_defaults = {"epochs": 12, "batch_size": 128, "crop_padding": 2}
    certify_params = frozenset({"threshold"})  # softmax cut-off: applied after training
    label_params = ("ablation_size", "threshold")

    def __init__(self, config: SmoothingConfig | None = None, **params) -> None:
        super().__init__(config, **params)
        if self.mode not in ABLATED_AXES:
            raise TypeError(f"{type(self).__name__} sets no ablation mode; use a subclass")
        c = self.config
        if c.ablation_size < 1:
            raise ParameterError("ablation_size",
                                 f"ablation_size must be at least 1, got {c.ablation_size}")
        if not 0 < c.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {c.threshold}")
        if c.width < 1:
            raise ParameterError("width", f"width must be at least 1, got {c.width}")
        check_base(c.base)

    def check(self, in_shape: tuple[int, int, int]) -> None:
        """An ablation must be narrower than the image on each axis it ablates: a band (or a
        block side) of the whole height or width keeps that axis entire, so every patch meets
        every ablation along it."""
        _, height, width = in_shape
        rows, cols = ABLATED_AXES[self.mode]
        n, axis = min((n, axis) for n, axis, ablated in ((height, "height", rows),
                                                         (width, "width", cols)) if ablated)
        size = self.config.ablation_size
        if size >= n:
            raise ParameterError("ablation_size", f"ablation_size {size} covers the whole {axis} "
                                 f"of the {height}x{width} images: {self.name} needs "
                                 f"ablation_size < {n}")

    def build_model(self, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
        return build_base_classifier(self.config.base, in_shape, num_classes, self.config.width)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        c = self.config
        return torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum,
                               weight_decay=c.weight_decay)

    def loss(self, model: nn.Module, images: Tensor, labels: Tensor,
             step: TrainStep | None = None) -> tuple[Tensor, Tensor]:
        """Cross-entropy of the base classifier on one random ablation per image."""
        image_hw = (images.shape[-2], images.shape[-1])
        map_h, map_w = vote_map_hw(self.mode, image_hw)
        positions = torch.randint(0, map_h * map_w, (images.shape[0],), device=images.device)
        masks = ablation_masks(self.mode, self.config.ablation_size, image_hw, positions)
        logits = model(encode(images, masks))
        return F.cross_entropy(logits, labels), logits.detach().argmax(dim=1)

    def votes(self, model: nn.Module, images: Tensor) -> Tensor:
        c = self.config
        return smoothed_votes(model, images, self.mode, c.ablation_size, c.threshold,
                              self.max_forward)

    def touched_cells(self, image_hw: tuple[int, int], boxes: Tensor) -> Tensor:
        """Ablations whose kept pixels meet each patch box (top, left, height, width): bool
        (N, h, w), from the ablation masks themselves rather than through ``footprints``, so
        that the patch attack can check the two against each other."""
        kept = ablation_masks(self.mode, self.config.ablation_size, image_hw,
                              device=boxes.device).flatten(1).float()
        patch = box_masks(boxes, image_hw).flatten(1).float()
        return (patch @ kept.T > 0).view(-1, *vote_map_hw(self.mode, image_hw))

    def soft_votes(self, model: nn.Module, images: Tensor, cells: Tensor) -> Tensor:
        """``sigmoid(log softmax - log theta)`` on the ablations in ``cells`` (bool N, h, w), 0
        elsewhere: the vote ``softmax >= theta`` relaxed for the patch attack's gradient. Only
        the asked ablations are run, so a patch costs the ablations it touches, not all."""
        n, _, height, width = images.shape
        which, positions = cells.reshape(n, -1).nonzero(as_tuple=True)
        masks = ablation_masks(self.mode, self.config.ablation_size, (height, width), positions)
        logits = model(encode(images[which], masks)).float()
        soft = torch.sigmoid(F.log_softmax(logits, dim=1) - math.log(self.config.threshold))
        flat = soft.new_zeros(cells.numel(), soft.shape[1]).index_put(
            (which * cells[0].numel() + positions,), soft)
        return flat.view(*cells.shape, -1).permute(0, 3, 1, 2)

    def footprints(self, patch: PatchShape, image_hw: tuple[int, int]) -> Footprints:
        rows_ablated, cols_ablated = ABLATED_AXES[self.mode]
        s = self.config.ablation_size
        return Footprints(
            map_hw=vote_map_hw(self.mode, image_hw),
            rows=cyclic_intervals(image_hw[0], patch.height, s) if rows_ablated else ((0, 1),),
            cols=cyclic_intervals(image_hw[1], patch.width, s) if cols_ablated else ((0, 1),),
            cyclic=True)


# Each mode's defaults are the Fashion-MNIST study's choice on val (its shipped model).
@dataclass
class ColumnConfig(SmoothingConfig):
    ablation_size: int = 6
    threshold: float = 0.25
    width: int = 48


@dataclass
class RowConfig(SmoothingConfig):
    ablation_size: int = 6
    threshold: float = 0.3


@dataclass
class BlockConfig(SmoothingConfig):
    ablation_size: int = 14
    threshold: float = 0.4
    width: int = 16


STUDY_RECIPE = {"batch_size": 128, "crop_padding": 2, "hold_out_val": True, "precision": "bf16"}


class ColumnSmoothing(Smoothing):
    name = "ds-column"
    description = "votes of a base classifier on every band of s columns (Levine & Feizi 2020)"
    mode = "column"
    Config = ColumnConfig
    train_defaults = {"epochs": 28, **STUDY_RECIPE}  # fmnist-column-s6


class RowSmoothing(Smoothing):
    name = "ds-row"
    description = "votes of a base classifier on every band of s rows (Levine & Feizi 2020)"
    mode = "row"
    Config = RowConfig
    train_defaults = {"epochs": 24, **STUDY_RECIPE}  # fmnist-row-s6


class BlockSmoothing(Smoothing):
    name = "ds-block"
    description = "votes of a base classifier on every s x s block (Levine & Feizi 2020)"
    mode = "block"
    Config = BlockConfig
    train_defaults = {"epochs": 24, **STUDY_RECIPE}  # fmnist-block-s14


class BaseClassifier(NamedTuple):
    """What a smoothing checkpoint holds, for use outside the harness, and the threshold the
    caller certifies at."""

    model: nn.Module  # eval mode; takes ``encode(images, masks)``
    ablation_size: int
    threshold: float | None  # the caller's certification threshold; None where none was given
    mode: str  # "column", "row" or "block"


def load_base_classifier(path: str | Path, threshold: float | None = None) -> BaseClassifier:
    """Load the base classifier and its ablation settings from a smoothing checkpoint.

    ``threshold`` is the θ the caller certifies at (a class gets an ablation's vote iff its
    softmax >= θ); the returned ``threshold`` holds it, checked as the defense checks it
    (0 < θ <= 1), or None where it is not given. It is never the checkpoint's: θ is a
    certification-only parameter (``Smoothing.certify_params``), so the value stored with the
    weights is only the one they were trained with, and one model is certified at many (a
    sweep over ``--threshold`` reuses it); a tool that took it would certify at the wrong θ.
    To reproduce a results row, pass the threshold of its ``params``.

    For reuse outside patchbench: ``ablation_masks(mode, ablation_size, (H, W))`` and
    ``encode`` rebuild its inputs, and ``smoothed_votes(model, images, mode, ablation_size,
    threshold)`` its vote map.
    """
    from patchbench.running.checkpoint import load_checkpoint  # lazy: keeps this module standalone

    checkpoint = load_checkpoint(path)
    defense = checkpoint.defense
    if not isinstance(defense, Smoothing):
        raise TypeError(f"{path} holds a {defense.name!r} model, not a smoothing defense")
    if threshold is not None:  # the certify-time override, validated by the defense itself
        defense = type(defense).from_params({**defense.params(), "threshold": threshold})
    return BaseClassifier(checkpoint.model.eval(), defense.config.ablation_size,
                          None if threshold is None else defense.config.threshold, defense.mode)
