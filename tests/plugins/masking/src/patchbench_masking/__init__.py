"""A defense of the masking family (no vote map): PatchCleanser's double masking with a fixed
grid of 2 x 2 masks per patch shape over a tiny CNN, certified under a condition of its own.

Sound for the same reason as PatchCleanser: the masks of a shape's set cover every placement
of that patch, so the mask that covers the patch removes it from every two-mask prediction the
certificate checks (``double_masking`` of the built-in). It offers the attack hooks, but not
the bench (``forward_passes``, ``reference_certify``) or gallery (``explain``) ones, so those
features say "not supported by quad-mask: it lacks ...".
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from patchbench.certify import Certificate
from patchbench.defense import Defense, DefenseConfig, TrainStep
from patchbench.defenses.patchcleanser import apply_masks, double_masking, mask_set, mask_tensor
from patchbench.patches import PatchShape, box_masks, check_fits

MASKS_PER_AXIS = 2


@dataclass
class QuadMaskConfig(DefenseConfig):
    width: int = 8  # channels of the one convolution
    mask_value: float = 0.5  # what masked pixels are set to
    train_patch: int = 5  # training masks are those of this square patch's set
    lr: float = 0.01


class QuadMask(Defense):
    name = "quad-mask"
    description = "double masking with 2 x 2 masks over a tiny CNN (masking example plugin)"
    Config = QuadMaskConfig
    conditions = ("quad",)
    train_defaults = {"epochs": 1, "batch_size": 64}

    def build_model(self, in_shape, num_classes):
        return nn.Sequential(nn.Conv2d(in_shape[0], self.config.width, 3, 2, 1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(self.config.width, num_classes))

    def optimizer(self, model):
        return torch.optim.Adam(model.parameters(), lr=self.config.lr)

    def masks(self, patch, image_hw, device=None):
        """Bool (4, H, W): the mask set of ``patch``."""
        return mask_tensor(mask_set(patch, image_hw, MASKS_PER_AXIS), image_hw, device)

    def loss(self, model, images, labels, step: TrainStep):
        """Cross-entropy under the union of two random masks of the training patch's set."""
        image_hw = tuple(images.shape[-2:])
        side = min(self.config.train_patch, *image_hw)
        masks = self.masks(PatchShape(side, side), image_hw, images.device)
        pick = torch.randint(0, len(masks), (len(images), 2), device=images.device)
        logits = model(apply_masks(images, masks[pick[:, 0]] | masks[pick[:, 1]],
                                   self.config.mask_value))
        return F.cross_entropy(logits, labels), logits.detach().argmax(dim=1)

    def _double_masking(self, model, images, patch, certify):
        with torch.no_grad():
            num_classes = model(images[:1]).shape[1]
            return double_masking(model, images, self.masks(patch, tuple(images.shape[-2:]),
                                                            images.device),
                                  self.config.mask_value, num_classes, certify=certify)

    def certify(self, model, images, patches, conditions=("quad",)):
        """Per patch shape its own mask set, so a prediction (B, S) and flags (B, S)."""
        check_fits(list(patches), tuple(images.shape[-2:]))
        outcomes = [self._double_masking(model, images, patch, certify=True)
                    for patch in patches]
        prediction = torch.stack([o.prediction for o in outcomes], dim=1)
        certified = torch.stack([o.certified for o in outcomes], dim=1)
        return Certificate(prediction, {cond: certified.clone() for cond in conditions})

    # -- attack -------------------------------------------------------------------------------
    def defended_prediction(self, model, images, patch):
        """The real double-masking prediction (N,): what judges a patched image."""
        return self._double_masking(model, images, patch, certify=False).prediction

    def attack_surrogate(self, model, images, prediction, boxes, patch):
        """Mean logit margin ``max_{c != y} z_c - z_y`` (N,) over the one-mask images whose
        mask does not cover the patch box (the only ones the patch can change)."""
        image_hw = tuple(images.shape[-2:])
        masks = self.masks(patch, image_hw, images.device)  # (M, H, W)
        n, m = len(images), len(masks)
        logits = model(apply_masks(images.repeat_interleave(m, dim=0), masks.repeat(n, 1, 1),
                                   self.config.mask_value)).float().view(n, m, -1)
        index = prediction[:, None, None].expand(n, m, 1)
        own = logits.gather(2, index).squeeze(2)
        rival = logits.scatter(2, index, float("-inf")).amax(dim=2)
        in_box = box_masks(boxes, image_hw)  # (N, H, W); boxes (N, 4): top, left, h, w
        covered = (in_box[:, None] <= masks[None]).flatten(2).all(dim=2)  # (N, M)
        weight = (~covered).float()
        return ((rival - own) * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1)
