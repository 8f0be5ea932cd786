"""A dummy defense: every pixel is a cell that votes through a 1x1 convolution."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from patchbench.defense import Defense, DefenseConfig
from patchbench.footprints import Footprints, clipped_intervals


@dataclass
class PixelVoteConfig(DefenseConfig):
    lr: float = 0.01


class PixelVote(Defense):
    name = "pixel-vote"
    description = "each pixel votes on its own (example plugin)"
    Config = PixelVoteConfig

    def build_model(self, in_shape, num_classes):
        return nn.Conv2d(in_shape[0], num_classes, 1)

    def loss(self, model, images, labels):
        scores = model(images).mean(dim=(2, 3))
        return F.cross_entropy(scores, labels), scores.argmax(1)

    def votes(self, model, images):
        return model(images) > 0

    def footprints(self, patch, image_hw):
        h, w = image_hw
        return Footprints((h, w), clipped_intervals(h, patch.height, 1, 1, 0, h),
                          clipped_intervals(w, patch.width, 1, 1, 0, w), cyclic=False)

    def optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=self.config.lr)
