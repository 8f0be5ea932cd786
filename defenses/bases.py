"""timm base classifiers shared by the defenses that wrap one (smoothing, PatchCleanser)."""

from __future__ import annotations

from torch import nn

SMALL_CNN = "small-cnn"
# timm ResNets get a CIFAR-style stem on images up to this side.
SMALL_IMAGE_SIDE = 64


def check_base(base: str) -> None:
    """``base`` must be the defense's own small CNN or a timm model name."""
    if base != SMALL_CNN:
        import timm  # slow to import; only timm bases need it

        if not timm.is_model(base):
            raise ValueError(f"base must be {SMALL_CNN!r} or a timm model name, got {base!r}")


def timm_classifier(name: str, in_ch: int, num_classes: int, image_side: int) -> nn.Module:
    """A fresh timm model; ResNets on small images get a CIFAR-style stem."""
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_ch)
    if isinstance(model, timm.models.ResNet) and image_side <= SMALL_IMAGE_SIDE:
        _small_image_stem(model)
    return model


def _small_image_stem(model: nn.Module) -> None:
    """CIFAR-style ResNet stem (3x3 stride-1 conv, no max pool): the ImageNet stem would shrink
    a 28-32 pixel image 4x before the first block."""
    stem = model.conv1
    if isinstance(stem, nn.Conv2d):
        model.conv1 = nn.Conv2d(stem.in_channels, stem.out_channels, 3, 1, 1, bias=False)
    else:  # deep stem ("c", "d", "t" variants): a stack whose first conv strides
        stem[0].stride = (1, 1)
    model.maxpool = nn.Identity()
