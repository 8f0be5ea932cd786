"""Defenses that import fine but fail later: building the model, or returning votes that
break the contract (float instead of bool, one class too many)."""

import torch
import torch.nn.functional as F
from torch import nn

from patchbench.defense import TrainStep, VoteMapDefense
from patchbench.footprints import Footprints, clipped_intervals


class PixelDefense(VoteMapDefense):
    """Each pixel is a cell (a 1x1 convolution): trains in a blink."""

    def build_model(self, in_shape, num_classes):
        return nn.Conv2d(in_shape[0], num_classes, 1)

    def loss(self, model, images, labels, step: TrainStep):
        scores = model(images).mean(dim=(2, 3))
        return F.cross_entropy(scores, labels), scores.argmax(1)

    def votes(self, model, images):
        return model(images) > 0

    def footprints(self, patch, image_hw):
        h, w = image_hw
        return Footprints((h, w), clipped_intervals(h, patch.height, 1, 1, 0, h),
                          clipped_intervals(w, patch.width, 1, 1, 0, w), cyclic=False)


class BuildFails(PixelDefense):
    name = "build-fails"
    description = "raises when its model is built"

    def build_model(self, in_shape, num_classes):
        raise RuntimeError("CUDA out of memory (pretend)")


class FloatVotes(PixelDefense):
    name = "float-votes"
    description = "returns float votes"

    def votes(self, model, images):
        return model(images).sigmoid()


class ExtraClass(PixelDefense):
    name = "extra-class"
    description = "votes for one class more than the dataset has"

    def votes(self, model, images):
        votes = model(images) > 0
        return torch.cat([votes, votes[:, :1]], dim=1)
