"""BagCert (Metzen & Yatsura, ICLR 2021): a BagNet-type network votes per cell and class.

Each cell of the score map sees only a small input window (its receptive field), the vote is
the Heaviside ``V = [s > 0]`` of its score, and a patch can only flip the cells whose window it
meets. Training is end to end: Heaviside forward, sigmoid gradient backward, and a hinge on the
tight certification margin for a randomly drawn patch (see ``BagCert.loss``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from patchbench.defense import DefenseConfig, ParameterError, TrainStep, VoteMapDefense
from patchbench.footprints import Footprints, clipped_intervals
from patchbench.patches import PatchShape

CELL_LOSSES = ("none", "bce", "ce")
Geometry = tuple[int, int, int]  # (kernel, stride, padding) of one layer on the main path


@dataclass
class BagCertConfig(DefenseConfig):
    rf: int = 9  # receptive field in pixels; sets how many of the convolutions are 3x3
    width: int = 48  # channels of every block
    blocks_1x1: int = 1  # residual 1x1 blocks after the (rf - 1) / 2 blocks with a 3x3 conv
    stride: int = 1  # 1 for small images; 8 gives ImageNet-scale BagNet-like maps
    padding: int = 1  # zero padding of each 3x3 convolution (the footprints follow it)
    temperature: float = 1.0  # sigmoid temperature of the straight-through gradient
    margin: float = 0.5  # hinge margin M on the normalised tight margin
    patch_min: int = 3  # training patch sides are drawn uniformly from [patch_min, patch_max]
    patch_max: int = 7
    reduction: str = "max"  # hinge on the worst rival class ("max") or on all rivals ("mean")
    margin_weight: float = 1.0  # weight of the margin hinge
    cell_loss: str = "none"  # extra per-cell loss: "none", "bce" (per class) or "ce" (softmax)
    cell_weight: float = 1.0  # weight of the per-cell loss
    vote_threshold: float = 0.0  # > 0: score = log softmax - log(threshold), so a cell votes
    #                              for every class whose softmax reaches the threshold
    lr: float = 1e-3  # Adam learning rate (cosine schedule)


class Heaviside(torch.autograd.Function):
    """[s > 0] forward; the gradient of sigmoid(s / T) backward (straight-through)."""

    @staticmethod
    def forward(ctx, scores: Tensor, temperature: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(scores)
        ctx.temperature = temperature
        return (scores > 0).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (scores,) = ctx.saved_tensors
        sig = torch.sigmoid(scores / ctx.temperature)
        return grad * sig * (1 - sig) / ctx.temperature, None


class Block(nn.Module):
    """Residual block: k x k conv, 1 x 1 conv, skip cropped to the valid region."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.geometry: Geometry = (kernel, stride, padding)
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel, stride, padding, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.crop = (kernel - 1) // 2 - padding
        self.skip = (nn.Identity() if stride == 1 and in_ch == out_ch else
                     nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False),
                                   nn.BatchNorm2d(out_ch)))

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        c = self.crop  # align the skip with the valid region: crop, or zero-pad if negative
        shortcut = (x[:, :, c:x.shape[2] - c, c:x.shape[3] - c] if c > 0 else
                    F.pad(x, (-c,) * 4) if c < 0 else x)
        shortcut = self.skip(shortcut)
        return F.relu(out + shortcut[:, :, :out.shape[2], :out.shape[3]])


class BagNet(nn.Module):
    """Score map (B, classes, h, w): one logit per class per cell, small receptive field."""

    def __init__(self, in_ch: int, num_classes: int, rf: int, width: int, blocks_1x1: int,
                 stride: int, padding: int, vote_threshold: float = 0.0) -> None:
        super().__init__()
        self.vote_threshold = vote_threshold
        self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.blocks = nn.Sequential(*[
            Block(width, width, *layer) for layer in block_geometry(rf, blocks_1x1, stride,
                                                                     padding)])
        self.head = nn.Conv2d(width, num_classes, 1)

    def geometry(self) -> list[Geometry]:
        """Layers of the main path, in order, for receptive-field arithmetic."""
        return [(1, 1, 0)] + [b.geometry for b in self.blocks] + [(1, 1, 0)]

    def forward(self, x: Tensor) -> Tensor:
        logits = self.head(self.blocks(self.stem(x)))
        if self.vote_threshold > 0:  # positive iff the cell's softmax reaches the threshold
            return F.log_softmax(logits, dim=1) - math.log(self.vote_threshold)
        return logits


def halvings(stride: int) -> int:
    """log2 of a power-of-two stride."""
    n = stride.bit_length() - 1
    if stride < 1 or 1 << n != stride:
        raise ValueError(f"stride must be a power of two, got {stride}")
    return n


def count_3x3(rf: int, stride: int) -> int:
    """How many 3x3 convolutions give receptive field ``rf`` when the last log2(stride) of
    them have stride 2: rf = 2 * (n - m) + 2^(m + 1) - 1 for n convs and m halvings."""
    m = halvings(stride)
    smallest = (1 << (m + 1)) - 1
    if rf < smallest or (rf - smallest) % 2:
        raise ValueError(f"receptive field {rf} is not reachable at stride {stride}: "
                         f"use an odd value of at least {smallest}")
    return (rf - smallest) // 2 + m


def block_geometry(rf: int, blocks_1x1: int, stride: int, padding: int) -> list[Geometry]:
    """(kernel, stride, padding) of each residual block of the BagNet, without building it:
    the 3x3 blocks (the last log2(stride) of them halving), then the 1x1 ones."""
    n3, m = count_3x3(rf, stride), halvings(stride)
    return ([(3, 1, padding)] * (n3 - m) + [(3, 2, padding)] * m
            + [(1, 1, 0)] * blocks_1x1)


def receptive_field(geometry: list[Geometry]) -> tuple[int, int, int]:
    """(rf, stride, padding) of the stack: output cell i covers input pixels
    [i*stride - padding, i*stride - padding + rf - 1]."""
    rf, jump, offset = 1, 1, 0
    for kernel, stride, padding in geometry:
        offset += padding * jump
        rf += (kernel - 1) * jump
        jump *= stride
    return rf, jump, offset


def map_size(geometry: list[Geometry], n: int) -> int:
    for kernel, stride, padding in geometry:
        n = (n + 2 * padding - kernel) // stride + 1
    return n


class BagCert(VoteMapDefense):
    name = "bagcert"
    description = "BagNet votes clipped by a Heaviside, margin-trained (Metzen & Yatsura 2021)"
    Config = BagCertConfig
    config: BagCertConfig
    # defaults: the Fashion-MNIST study's choice on val (shipped as fmnist-bagcert-rf9)
    train_defaults = {"epochs": 8, "batch_size": 128, "crop_padding": 2, "hold_out_val": True,
                      "precision": "bf16"}
    label_params = ("rf",)

    def __init__(self, config: BagCertConfig | None = None, **params) -> None:
        super().__init__(config, **params)
        c = self.config
        for name, check in (("stride", lambda: halvings(c.stride)),
                            ("rf", lambda: count_3x3(c.rf, c.stride))):
            try:
                check()
            except ValueError as err:
                raise ParameterError(name, str(err)) from None
        if c.width < 1:
            raise ParameterError("width", f"width must be at least 1, got {c.width}")
        if c.blocks_1x1 < 0:
            raise ParameterError("blocks_1x1", f"blocks_1x1 must be >= 0, got {c.blocks_1x1}")
        if c.padding < 0:
            raise ParameterError("padding", f"padding must be >= 0, got {c.padding}")
        if not c.temperature > 0:
            raise ParameterError("temperature",
                                 f"temperature must be positive, got {c.temperature}")
        if not 1 <= c.patch_min <= c.patch_max:
            raise ValueError("need 1 <= patch_min <= patch_max")
        if c.cell_loss not in CELL_LOSSES:
            raise ValueError(f"cell_loss must be one of {CELL_LOSSES}, got {c.cell_loss!r}")
        if not 0 <= c.vote_threshold < 1:
            raise ValueError(f"vote_threshold must be in [0, 1), got {c.vote_threshold}")
        if c.reduction not in ("max", "mean"):
            raise ValueError(f"reduction must be 'max' or 'mean', got {c.reduction!r}")

    @functools.cached_property
    def _geometry(self) -> list[Geometry]:
        """The main path's layers, as ``BagNet.geometry`` gives them, without a model."""
        c = self.config
        return [(1, 1, 0), *block_geometry(c.rf, c.blocks_1x1, c.stride, c.padding), (1, 1, 0)]

    def check(self, in_shape: tuple[int, int, int]) -> None:
        """A cell must see less than a whole side of the image (which, padding being >= 0,
        also leaves the score map at least one cell), and training patches must fit."""
        _, height, width = in_shape
        c, side = self.config, min(height, width)
        if c.rf >= side:
            raise ParameterError("rf", f"rf {c.rf} covers a whole side of the {height}x{width} "
                                 f"images: bagcert needs rf < {side}")
        if c.patch_min > side:
            raise ParameterError("patch_min", f"patch_min {c.patch_min} does not fit in the "
                                 f"{height}x{width} images")

    def build_model(self, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
        c = self.config
        return BagNet(in_shape[0], num_classes, c.rf, c.width, c.blocks_1x1, c.stride,
                      c.padding, c.vote_threshold)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=self.config.lr)

    def votes(self, model: nn.Module, images: Tensor) -> Tensor:
        return model(images) > 0

    def footprints(self, patch: PatchShape, image_hw: tuple[int, int]) -> Footprints:
        rf, stride, padding = receptive_field(self._geometry)
        h, w = (map_size(self._geometry, n) for n in image_hw)
        return Footprints(
            map_hw=(h, w),
            rows=clipped_intervals(image_hw[0], patch.height, rf, stride, padding, h),
            cols=clipped_intervals(image_hw[1], patch.width, rf, stride, padding, w),
            cyclic=False)

    def loss(self, model: nn.Module, images: Tensor, labels: Tensor,
             step: TrainStep | None = None) -> tuple[Tensor, Tensor]:
        """Hinge on the tight margin of one random patch per image.

        With straight-through votes v (B, C, h, w), N = h*w cells, a footprint R drawn by
        drawing a patch side uniformly from [patch_min, patch_max] and a position uniformly:

            m_c = ((n_y - a_y(R)) - (n_c - a_c(R)) - |R|) / N,    c != y
            loss = mean_b  reduce_c  relu(M - m_c)

        where n_c sums v over all cells, a_c over R, and reduce is max or mean over rivals.
        m_c > 0 for every c is exactly the tight certificate for that footprint.
        """
        c = self.config
        scores = model(images)
        votes = Heaviside.apply(scores, c.temperature)
        batch, n_classes, h, w = votes.shape
        image_hw = (images.shape[2], images.shape[3])
        inside = self._random_footprint_mask(batch, image_hw, images.device)
        outside_votes = (votes * (1 - inside)).sum(dim=(2, 3))  # n_c - a_c(R), (B, C)
        size = inside.sum(dim=(1, 2, 3))  # |R|
        own = outside_votes.gather(1, labels[:, None])
        margins = (own - outside_votes - size[:, None]) / (h * w)
        hinge = F.relu(c.margin - margins)
        rivals = torch.ones_like(hinge, dtype=torch.bool).scatter_(1, labels[:, None], False)
        if c.reduction == "max":
            per_image = hinge.masked_fill(~rivals, float("-inf")).amax(dim=1)
        else:
            per_image = (hinge * rivals).sum(dim=1) / max(1, n_classes - 1)
        loss = c.margin_weight * per_image.mean()
        if c.cell_loss == "bce":
            target = F.one_hot(labels, n_classes).to(scores.dtype)[:, :, None, None]
            loss = loss + c.cell_weight * F.binary_cross_entropy_with_logits(
                scores, target.expand_as(scores))
        elif c.cell_loss == "ce":
            cell_labels = labels[:, None, None].expand(batch, h, w)
            loss = loss + c.cell_weight * F.cross_entropy(scores, cell_labels)
        predictions = votes.detach().sum(dim=(2, 3)).argmax(dim=1)
        return loss, predictions

    def _random_footprint_mask(self, batch: int, image_hw: tuple[int, int],
                               device: torch.device) -> Tensor:
        """(B, 1, h, w) 0/1 mask of the footprint of one random patch per image."""
        c = self.config
        side = torch.randint(c.patch_min, min(c.patch_max, *image_hw) + 1, (batch,),
                             device=device)
        top, left = ((torch.rand(batch, device=device) * (n_pixels - side + 1)).floor().long()
                     for n_pixels in image_hw)
        boxes = torch.stack([top, left, side, side], dim=1)
        return self.touched_cells(image_hw, boxes)[:, None].float()

    def touched_cells(self, image_hw: tuple[int, int], boxes: Tensor) -> Tensor:
        """Cells whose input window meets each patch box (top, left, height, width): bool
        (N, h, w), by receptive-field arithmetic per cell rather than through ``footprints``,
        so that the patch attack can check the two against each other."""
        rf, stride, padding = receptive_field(self._geometry)
        hits = []
        for axis, n_pixels in enumerate(image_hw):
            first_pixel = torch.arange(map_size(self._geometry, n_pixels),
                                       device=boxes.device) * stride - padding
            start, side = boxes[:, axis, None], boxes[:, axis + 2, None]
            hits.append((first_pixel <= start + side - 1) & (first_pixel + rf - 1 >= start))
        rows, cols = hits
        return rows[:, :, None] & cols[:, None, :]

    def soft_votes(self, model: nn.Module, images: Tensor, cells: Tensor) -> Tensor:
        """``sigmoid(scores / T)`` on ``cells`` (bool N, h, w), 0 elsewhere: the votes relaxed
        as in training, for the patch attack's gradient.

        Each image is cropped to the pixels its asked cells see (aligned to the stride, and
        ending at the image border where their windows leave it), so their scores are exact
        and a small patch costs a fraction of a full forward pass.
        """
        rf, stride, padding = receptive_field(self._geometry)
        n = images.shape[0]
        starts, index = [], []
        for axis, n_pixels in enumerate(images.shape[2:]):
            hit = cells.any(dim=2 - axis)  # (N, cells on this axis)
            first = hit.int().argmax(dim=1)
            last = hit.shape[1] - 1 - hit.flip(1).int().argmax(dim=1)
            lo = (first * stride - padding).clamp(min=0)
            hi = (last * stride - padding + rf).clamp(max=n_pixels)
            need = int((hi - lo).max()) + stride - 1
            size = n_pixels - max(0, (n_pixels - need) // stride) * stride
            start = torch.minimum(lo // stride * stride, torch.full_like(lo, n_pixels - size))
            starts.append(start // stride)
            index.append(start[:, None] + torch.arange(size, device=images.device))
        rows, cols = index
        crops = images[torch.arange(n, device=images.device)[:, None, None], :,
                       rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        soft = torch.sigmoid(model(crops) / self.config.temperature)
        for axis, start in enumerate(starts):  # crop cell i - start is full-map cell i
            dim, n_full = 2 + axis, cells.shape[1 + axis]
            crop_cell = torch.arange(n_full, device=images.device) - start[:, None]
            inside = (crop_cell >= 0) & (crop_cell < soft.shape[dim])
            shape = [n, 1, 1, 1]
            shape[dim] = n_full
            gather = crop_cell.clamp(0, soft.shape[dim] - 1).view(shape)
            size = list(soft.shape)
            size[dim] = n_full
            soft = soft.gather(dim, gather.expand(size)) * inside.view(shape)
        return soft * cells[:, None]
