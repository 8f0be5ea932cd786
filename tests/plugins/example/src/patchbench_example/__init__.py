"""A dummy defense of the vote-map family: every pixel is a cell that votes through a 1x1
convolution. It has the attack hooks too, so every feature of the harness supports it."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from patchbench.defense import DefenseConfig, TrainStep, VoteMapDefense
from patchbench.footprints import Footprints, clipped_intervals
from patchbench.patches import box_masks


@dataclass
class PixelVoteConfig(DefenseConfig):
    lr: float = 0.01


class PixelVote(VoteMapDefense):
    name = "pixel-vote"
    description = "each pixel votes on its own (example plugin)"
    Config = PixelVoteConfig

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

    def touched_cells(self, image_hw, boxes):
        return box_masks(boxes, image_hw)  # one cell per pixel: the patch's own pixels

    def soft_votes(self, model, images, cells):
        return torch.sigmoid(model(images)) * cells[:, None]

    def optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=self.config.lr)
