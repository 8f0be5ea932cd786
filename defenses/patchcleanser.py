"""PatchCleanser (Xiang, Mahloujifar & Mittal, USENIX Security 2022): double masking.

No vote map: the certificate comes from a base classifier's predictions on masked images.

* **Mask set** (``axis_masks``, ``mask_set``): per image axis of ``n`` pixels, for a patch side
  ``p`` and ``k`` masks, stride ``s = ceil((n - p + 1) / k)``, mask side ``m = min(p + s - 1,
  n)``, starts ``0, s, 2s, ...`` with the last one flush with the border (at ``n - m``); the 2-D
  masks are the product of the two axes (rectangular patches use their own side per axis).
  Every patch of that shape lies wholly inside at least one mask (tested exhaustively).
* **Inference** (``double_masking``): predict with every single mask. Unanimous: that label.
  Otherwise, for each mask whose label disagrees with the majority, in mask order, predict with
  every pair (that mask, j); the first such mask whose pairs all agree with its label gives the
  prediction. Else the majority. Ties: the majority of the one-mask labels is the most frequent
  label, ties to the smallest class index; the base classifier's argmax ties to the smallest
  index; among disagreeing masks that pass, the first in mask order (row-major over the mask
  grid) wins, as in the published loop.
* **Certification**: certified iff every two-mask prediction (i <= j, i = j included) equals
  the prediction. The mask that covers the patch removes it from every prediction the argument
  uses, so no patch of that shape can change a certified prediction.

Masked pixels get ``mask_value``. Training is Cutout-style: two random masks of the mask set of
a random patch shape per image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from patchbench.certify import Certificate
from patchbench.defense import Defense, DefenseConfig, ParameterError, TrainStep
from patchbench.defenses.bases import SMALL_CNN, check_base, timm_classifier
from patchbench.patches import PatchShape, box_masks, check_fits

CONDITION = "masking"
# Masked images per forward pass in certification (bounds memory: 4096 * 28 * 28 floats).
MAX_FORWARD = 4096

AxisMasks = tuple[tuple[int, ...], int]  # (starts, side) of the masks along one axis


@dataclass
class PatchCleanserConfig(DefenseConfig):
    masks_per_axis: int = 6  # k: masks per image axis at certification (k * k per shape)
    mask_value: float = 0.5  # what masked pixels are set to (images are in [0, 1])
    base: str = SMALL_CNN  # base classifier: "small-cnn" or any timm model name
    width: int = 48  # channels of the first small-CNN layer (doubled twice)
    train_patch_min: int = 1  # training draws each patch side uniformly from this range
    train_patch_max: int = 8  # (sides drawn from [train_patch_min, train_patch_max])
    train_masks_per_axis: int = 6  # k of the mask sets that training draws from
    lr: float = 1e-3  # AdamW learning rate (cosine schedule)
    weight_decay: float = 5e-4  # AdamW weight decay


def axis_masks(n: int, patch: int, k: int) -> AxisMasks:
    """The mask starts and side along one axis of ``n`` pixels for a patch side ``patch``."""
    if not 1 <= patch <= n:
        raise ValueError(f"patch side {patch} does not fit an axis of {n} pixels")
    if k < 1:
        raise ValueError(f"need at least one mask per axis, got {k}")
    stride = math.ceil((n - patch + 1) / k)
    side = min(patch + stride - 1, n)
    starts = sorted({min(i * stride, n - side) for i in range(k)})
    return tuple(starts), side


def mask_set(patch: PatchShape, image_hw: tuple[int, int], k: int
             ) -> tuple[AxisMasks, AxisMasks]:
    """The per-axis masks (rows, columns) for one patch shape; their product is the set."""
    return (axis_masks(image_hw[0], patch.height, k), axis_masks(image_hw[1], patch.width, k))


def mask_tensor(masks: tuple[AxisMasks, AxisMasks], image_hw: tuple[int, int],
                device: torch.device | str | None = None) -> Tensor:
    """Bool (M, H, W): True on the masked pixels of each mask, row-major over the mask grid."""
    (row_starts, row_side), (col_starts, col_side) = masks
    rows = torch.arange(image_hw[0], device=device)
    cols = torch.arange(image_hw[1], device=device)
    in_rows = torch.stack([(rows >= r) & (rows < r + row_side) for r in row_starts])
    in_cols = torch.stack([(cols >= c) & (cols < c + col_side) for c in col_starts])
    return (in_rows[:, None, :, None] & in_cols[None, :, None, :]).flatten(0, 1)


def apply_masks(images: Tensor, masks: Tensor, value: float) -> Tensor:
    """``images`` (N, C, H, W) with the pixels of ``masks`` (N, H, W) set to ``value``."""
    return images.masked_fill(masks[:, None], value)


class SmallCNN(nn.Module):
    """A base classifier for small images that runs ~30,000 28x28 images/s on two CPU cores:
    certification needs k^2 (k^2 + 1) / 2 forward passes per image and patch shape."""

    def __init__(self, in_ch: int, num_classes: int, width: int) -> None:
        super().__init__()
        chans = [in_ch, width, 2 * width, 4 * width]
        layers: list[nn.Module] = []
        for i, kernel in enumerate((4, 3, 3)):
            layers += [nn.Conv2d(chans[i], chans[i + 1], kernel, 2, 1, bias=False),
                       nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(chans[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def build_base_classifier(base: str, in_shape: tuple[int, int, int], num_classes: int,
                          width: int) -> nn.Module:
    if base == SMALL_CNN:
        return SmallCNN(in_shape[0], num_classes, width)
    return timm_classifier(base, in_shape[0], num_classes, max(in_shape[1:]))


def predict(model: nn.Module, images: Tensor, masks: Tensor, value: float) -> Tensor:
    """Labels (N,) of ``images`` (N, C, H, W) under ``masks`` (N, H, W), argmax ties to the
    smallest index, in forward blocks of at most ``MAX_FORWARD``."""
    out = [model(apply_masks(images[lo:lo + MAX_FORWARD], masks[lo:lo + MAX_FORWARD],
                             value)).float().argmax(dim=1)
           for lo in range(0, len(images), MAX_FORWARD)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=images.device)


def majority(labels: Tensor, num_classes: int) -> Tensor:
    """Most frequent label per row of ``labels`` (B, M), ties to the smallest class index."""
    counts = F.one_hot(labels, num_classes).sum(dim=1)
    return counts.argmax(dim=1)


def pair_order(n_masks: int, device: torch.device | str | None = None) -> Tensor:
    """Every unordered pair (i, j), i < j, as (P, 2), interleaved so that each block of pairs
    spans the whole image (a disagreement is found early, and an image stops early)."""
    i, j = torch.triu_indices(n_masks, n_masks, offset=1, device=device)
    perm = torch.randperm(len(i), generator=torch.Generator().manual_seed(0)).to(i.device)
    return torch.stack([i, j], dim=1)[perm]


@dataclass
class MaskingOutcome:
    """Double masking on a batch for one mask set."""

    prediction: Tensor  # (B,) int64
    certified: Tensor  # (B,) bool
    one_mask: Tensor  # (B, M) first-round labels
    forward_passes: int  # base-classifier passes spent


def double_masking(model: nn.Module, images: Tensor, masks: Tensor, value: float,
                   num_classes: int, certify: bool = True,
                   max_forward: int = MAX_FORWARD) -> MaskingOutcome:
    """Double-masking prediction and certificate of ``images`` (B, C, H, W) for ``masks``
    (M, H, W) bool; see the module doc. Pairs run in blocks of at most ``max_forward`` passes,
    and an image stops as soon as a pair disagrees (it cannot be certified then)."""
    batch, n_masks = images.shape[0], masks.shape[0]
    device = images.device
    passes = batch * n_masks
    per = max(1, max_forward // n_masks)  # images per first-round block
    first = torch.cat([
        predict(model, images[lo:lo + per].repeat_interleave(n_masks, dim=0),
                masks.repeat(len(images[lo:lo + per]), 1, 1), value)
        for lo in range(0, batch, per)]).view(batch, n_masks)
    vote = majority(first, num_classes)
    unanimous = (first == vote[:, None]).all(dim=1)
    prediction = vote.clone()
    certified = unanimous.clone()
    if certify and n_masks > 1:
        pairs = pair_order(n_masks, device)
        alive = unanimous.nonzero().flatten()
        passes += _check_pairs(model, images, masks, value, pairs, alive, vote, certified,
                               max_forward)
    # second round: disagreeing masks in mask order; the first whose pairs all agree wins
    split = (~unanimous).nonzero().flatten()
    if len(split):
        candidates = (first[split] != vote[split, None]).nonzero()  # (K, 2): row, mask
        image_of, mask_i = split[candidates[:, 0]], candidates[:, 1]
        label = first[image_of, mask_i]
        agree = torch.ones(len(image_of), dtype=torch.bool, device=device)
        per_block = max(1, max_forward // n_masks)
        for lo in range(0, len(image_of), per_block):
            b, i = image_of[lo:lo + per_block], mask_i[lo:lo + per_block]
            j = torch.arange(n_masks, device=device).repeat(len(b))
            pair = masks[i.repeat_interleave(n_masks)] | masks[j]
            got = predict(model, images[b.repeat_interleave(n_masks)], pair, value)
            agree[lo:lo + per_block] = (got.view(len(b), n_masks) == label[lo:lo + per_block,
                                                                            None]).all(dim=1)
            passes += len(b) * n_masks
        # the first passing candidate of each image (candidates are sorted by image, then mask)
        passing = agree.nonzero().flatten()
        first_pass = torch.full((batch,), len(image_of), dtype=torch.long, device=device)
        first_pass.scatter_reduce_(0, image_of[passing], passing, reduce="amin")
        found = first_pass < len(image_of)
        prediction[found] = label[first_pass[found]]
    return MaskingOutcome(prediction, certified, first, passes)


def _check_pairs(model: nn.Module, images: Tensor, masks: Tensor, value: float, pairs: Tensor,
                 alive: Tensor, label: Tensor, certified: Tensor, max_forward: int) -> int:
    """Clear ``certified`` for each image of ``alive`` with a pair whose label differs from
    ``label``; return the passes spent. Blocks of pairs over all alive images at once."""
    passes = 0
    lo = 0
    while len(alive) and lo < len(pairs):
        step = max(1, max_forward // len(alive))
        block = pairs[lo:lo + step]
        lo += step
        b = alive.repeat_interleave(len(block))
        pair = (masks[block[:, 0]] | masks[block[:, 1]]).repeat(len(alive), 1, 1)
        got = predict(model, images[b], pair, value).view(len(alive), len(block))
        passes += got.numel()
        bad = (got != label[alive, None]).any(dim=1)
        certified[alive[bad]] = False
        alive = alive[~bad]
    return passes


class PatchCleanser(Defense):
    name = "patchcleanser"
    description = "double masking of a base classifier (Xiang, Mahloujifar & Mittal 2022)"
    Config = PatchCleanserConfig
    config: PatchCleanserConfig
    conditions = (CONDITION,)
    # defaults: the Fashion-MNIST study's choice on val (fmnist-patchcleanser-w48-30ep)
    train_defaults = {"epochs": 30, "batch_size": 128, "crop_padding": 2, "hold_out_val": True}
    certify_params = frozenset({"masks_per_axis"})  # one model serves every k
    label_params = ("masks_per_axis",)

    def __init__(self, config: PatchCleanserConfig | None = None, **params) -> None:
        super().__init__(config, **params)
        c = self.config
        for name in ("masks_per_axis", "train_masks_per_axis"):
            k = getattr(c, name)
            if k < 2:  # one mask per axis has the side of the image: it masks everything
                raise ParameterError(name, f"{name} must be at least 2, got {k}" + (
                    ": a single mask per axis covers the whole image" if k == 1 else ""))
        if not 1 <= c.train_patch_min <= c.train_patch_max:
            raise ValueError("need 1 <= train_patch_min <= train_patch_max")
        if c.width < 1:
            raise ParameterError("width", f"width must be at least 1, got {c.width}")
        check_base(c.base)

    def check(self, in_shape: tuple[int, int, int]) -> None:
        """Training patches must fit in the image (larger sides would be cut to the image,
        whose masks cover whole sides)."""
        _, height, width = in_shape
        if self.config.train_patch_min > min(height, width):
            raise ParameterError("train_patch_min", f"train_patch_min "
                                 f"{self.config.train_patch_min} does not fit in the "
                                 f"{height}x{width} images")

    def build_model(self, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
        return build_base_classifier(self.config.base, in_shape, num_classes, self.config.width)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        c = self.config
        return torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)

    def loss(self, model: nn.Module, images: Tensor, labels: Tensor,
             step: TrainStep | None = None) -> tuple[Tensor, Tensor]:
        """Cross-entropy on each image under two random masks of the mask set of a random
        patch shape (sides uniform in [train_patch_min, train_patch_max], capped by the
        image), the union of the two masks as at certification."""
        masks = self.random_masks(images.shape[0], images.shape[-2:], images.device)
        logits = model(apply_masks(images, masks, self.config.mask_value))
        return F.cross_entropy(logits, labels), logits.detach().argmax(dim=1)

    def random_masks(self, n: int, image_hw: Sequence[int], device: torch.device) -> Tensor:
        """Bool (n, H, W): per image the union of two random masks of a random shape's set."""
        c = self.config
        height, width = int(image_hw[0]), int(image_hw[1])
        out = torch.zeros(n, height, width, dtype=torch.bool, device=device)
        sides = torch.randint(c.train_patch_min, c.train_patch_max + 1, (n, 2))
        sides[:, 0].clamp_(max=height)
        sides[:, 1].clamp_(max=width)
        for ph, pw in torch.unique(sides, dim=0).tolist():
            pick = ((sides[:, 0] == ph) & (sides[:, 1] == pw)).nonzero().flatten().to(device)
            masks = mask_tensor(mask_set(PatchShape(ph, pw), (height, width),
                                         c.train_masks_per_axis), (height, width), device)
            which = torch.randint(0, len(masks), (len(pick), 2), device=device)
            out[pick] = masks[which[:, 0]] | masks[which[:, 1]]
        return out

    def masks(self, patch: PatchShape, image_hw: tuple[int, int],
              device: torch.device | str | None = None) -> Tensor:
        """Bool (M, H, W) mask set of ``patch``."""
        return mask_tensor(mask_set(patch, image_hw, self.config.masks_per_axis), image_hw,
                           device)

    def certify(self, model: nn.Module, images: Tensor, patches: Sequence[PatchShape],
                conditions: Sequence[str] = (CONDITION,)) -> Certificate:
        """Double masking per patch shape; shapes whose mask sets coincide share one pass."""
        image_hw = (images.shape[-2], images.shape[-1])
        check_fits(list(patches), image_hw)
        num_classes = self._num_classes(model, images)
        prediction = torch.empty(len(images), len(patches), dtype=torch.long,
                                 device=images.device)
        certified = torch.empty_like(prediction, dtype=torch.bool)
        for key, shapes in _shared(patches, image_hw, self.config.masks_per_axis):
            with torch.no_grad():
                outcome = double_masking(model, images, mask_tensor(key, image_hw,
                                                                    images.device),
                                         self.config.mask_value, num_classes)
            prediction[:, shapes] = outcome.prediction[:, None]
            certified[:, shapes] = outcome.certified[:, None]
        return Certificate(prediction=prediction,
                           certified={cond: certified.clone() for cond in conditions})

    @staticmethod
    def _num_classes(model: nn.Module, images: Tensor) -> int:
        with torch.no_grad():
            return int(model(images[:1]).shape[1])

    # -- attack -------------------------------------------------------------------------------
    def defended_prediction(self, model: nn.Module, images: Tensor, patch: PatchShape
                            ) -> Tensor:
        """The real double-masking prediction (N,) for ``patch``'s mask set: the attack's
        judge."""
        image_hw = (images.shape[-2], images.shape[-1])
        with torch.no_grad():
            return double_masking(model, images, self.masks(patch, image_hw, images.device),
                                  self.config.mask_value, self._num_classes(model, images),
                                  certify=False).prediction

    def attack_surrogate(self, model: nn.Module, images: Tensor, prediction: Tensor,
                         boxes: Tensor, patch: PatchShape) -> Tensor:
        """Differentiable objective (N,) of a patched image: over the one-mask images whose
        mask does not cover the patch (those it can influence), the mean of the logit margin
        ``max_{c != y} z_c - z_y``; ascending it pushes the first round away from ``y``."""
        image_hw = (images.shape[-2], images.shape[-1])
        masks = self.masks(patch, image_hw, images.device)
        n, m = images.shape[0], masks.shape[0]
        logits = model(apply_masks(images.repeat_interleave(m, dim=0), masks.repeat(n, 1, 1),
                                   self.config.mask_value)).float().view(n, m, -1)
        own = logits.gather(2, prediction[:, None, None].expand(n, m, 1)).squeeze(2)
        rival = logits.scatter(2, prediction[:, None, None].expand(n, m, 1),
                               float("-inf")).amax(dim=2)
        # a mask covers a box where it holds all of the box's pixels (from the mask set itself)
        inside = box_masks(boxes, image_hw).flatten(1).float() @ masks.flatten(1).float().T
        covers = inside >= boxes[:, 2:].prod(dim=1, keepdim=True).float()
        weight = (~covers).float()
        return ((rival - own) * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1)

    # -- bench --------------------------------------------------------------------------------
    def forward_passes(self, model: nn.Module, images: Tensor, patches: Sequence[PatchShape],
                       max_forward: int = MAX_FORWARD, max_prebuilt_bytes: int = 1 << 30
                       ) -> tuple[Callable[[], object], int]:
        """Bench (a): a callable running the bare forward passes that certifying ``images`` for
        ``patches`` needs, without early exit and without the decision (predictions only):
        every two-mask image (i <= j: k^2 (k^2 + 1) / 2 per image and distinct mask set) in
        blocks of ``max_forward``; and the number of model inputs per image. The masked inputs
        are built beforehand (up to ``max_prebuilt_bytes``; beyond, built blocks are reused: a
        convolution's cost does not depend on the pixel values), so the callable leaves out
        building them."""
        image_hw = (images.shape[-2], images.shape[-1])
        check_fits(list(patches), image_hw)
        pair_masks = []
        for key, _ in _shared(patches, image_hw, self.config.masks_per_axis):
            masks = mask_tensor(key, image_hw, images.device)
            i, j = torch.triu_indices(len(masks), len(masks), device=images.device)
            pair_masks.append(masks[i] | masks[j])
        pairs = torch.cat(pair_masks)
        n_pairs, total = len(pairs), len(images) * len(pairs)

        def build(lo: int) -> Tensor:
            flat = torch.arange(lo, min(lo + max_forward, total), device=images.device)
            return apply_masks(images[flat // n_pairs], pairs[flat % n_pairs],
                               self.config.mask_value)

        n_full = total // max_forward
        block_bytes = max_forward * images[0].numel() * images.element_size()
        kept = [build(b * max_forward)
                for b in range(min(n_full, max(1, max_prebuilt_bytes // block_bytes)))]
        last = build(n_full * max_forward) if total % max_forward else None

        def run() -> None:
            for b in range(n_full):
                model(kept[b % len(kept)]).argmax(dim=1)
            if last is not None:
                model(last).argmax(dim=1)
        return run, n_pairs

    def reference_certify(self, model: nn.Module, images: Tensor,
                          patches: Sequence[PatchShape]):  # -> bench.ReferenceResult
        """Bench (r): the published code's way (``bench.reference_patchcleanser``)."""
        from patchbench.running.bench import reference_patchcleanser

        return reference_patchcleanser(model, images, patches, self.config.masks_per_axis,
                                       self.config.mask_value)

    # -- gallery ------------------------------------------------------------------------------
    def explain(self, model: nn.Module, image: Tensor, patch: PatchShape):  # -> Explanation
        """Why ``image`` (C, H, W) is (not) certified for ``patch`` (``gallery.Explanation``):
        its one-mask labels on the mask grid and the first two-mask prediction (i <= j, in
        mask order) that differs from the defended prediction, None where it is certified."""
        from patchbench.reporting.gallery import Explanation

        image_hw = (image.shape[-2], image.shape[-1])
        check_fits([patch], image_hw)
        images = image[None]
        (row_starts, _), (col_starts, _) = grid = mask_set(patch, image_hw,
                                                            self.config.masks_per_axis)
        masks = mask_tensor(grid, image_hw, image.device)
        value = self.config.mask_value
        with torch.no_grad():
            outcome = double_masking(model, images, masks, value,
                                     self._num_classes(model, images))
            i, j = torch.triu_indices(len(masks), len(masks), device=image.device)
            labels = predict(model, images.expand(len(i), -1, -1, -1), masks[i] | masks[j],
                             value)
        prediction = int(outcome.prediction[0])
        differ = (labels != prediction).nonzero().flatten()
        first = int(differ[0]) if len(differ) else None
        pair = None if first is None else (int(i[first]), int(j[first]))
        return Explanation(
            image=image.float().cpu().numpy(), patch=patch, prediction=prediction,
            certified=bool(outcome.certified[0]),
            one_mask=outcome.one_mask[0].view(len(row_starts), len(col_starts)).cpu().numpy(),
            pair=pair, masks=() if pair is None else tuple(masks[p].cpu().numpy() for p in pair),
            mask_prediction=None if first is None else int(labels[first]), pairs=len(i),
            mask_value=value)


def _shared(patches: Sequence[PatchShape], image_hw: tuple[int, int], k: int
            ) -> Iterator[tuple[tuple[AxisMasks, AxisMasks], list[int]]]:
    """Mask sets with the indices of the shapes that have each one."""
    groups: dict[tuple[AxisMasks, AxisMasks], list[int]] = {}
    for s, patch in enumerate(patches):
        groups.setdefault(mask_set(patch, image_hw, k), []).append(s)
    yield from groups.items()
