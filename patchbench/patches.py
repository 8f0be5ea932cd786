"""Patch shapes: the attacker's rectangle, written ``HxW`` in pixels."""

from __future__ import annotations

import re
from typing import NamedTuple

import torch
from torch import Tensor

_SHAPE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


class PatchShape(NamedTuple):
    """An axis-aligned patch of ``height x width`` pixels."""

    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.height}x{self.width}"

    @property
    def area(self) -> int:
        return self.height * self.width


def parse_patch(token: str) -> PatchShape:
    """Parse one ``HxW`` token; raise ValueError with a one-line reason otherwise."""
    match = _SHAPE.match(token)
    if not match:
        raise ValueError(f"malformed patch shape {token!r}: expected HxW with positive "
                         "integers, e.g. 5x5")
    height, width = int(match.group(1)), int(match.group(2))
    if height == 0 or width == 0:
        raise ValueError(f"patch shape {token!r} has a zero side; both sides must be at least 1")
    return PatchShape(height, width)


def parse_patches(text: str | list[str] | tuple[str, ...]) -> list[PatchShape]:
    """Parse ``"5x5,2x12"`` (or several such strings) into unique shapes, order kept."""
    texts = [text] if isinstance(text, str) else list(text)
    shapes: list[PatchShape] = []
    for part in texts:
        for token in part.split(","):
            if not token.strip():
                raise ValueError(f"empty patch shape in {part!r}")
            shape = parse_patch(token)
            if shape not in shapes:
                shapes.append(shape)
    if not shapes:
        raise ValueError("no patch shape given")
    return shapes


def check_fits(shapes: list[PatchShape], image_hw: tuple[int, int]) -> None:
    """Raise ValueError if a patch cannot be placed inside an image of ``image_hw``."""
    height, width = image_hw
    for shape in shapes:
        if shape.height > height or shape.width > width:
            raise ValueError(f"patch {shape} does not fit in the {height}x{width} images")


def box_masks(boxes: Tensor, image_hw: tuple[int, int]) -> Tensor:
    """Pixel masks, bool (N, H, W), of patches placed at ``boxes`` (N, 4): top, left, height,
    width, one placement per row (the attack and the defenses' ``touched_cells`` share it)."""
    rows = torch.arange(image_hw[0], device=boxes.device)
    cols = torch.arange(image_hw[1], device=boxes.device)
    top, left, height, width = boxes.T[:, :, None]
    in_rows = (rows >= top) & (rows < top + height)
    in_cols = (cols >= left) & (cols < left + width)
    return in_rows[:, :, None] & in_cols[:, None, :]
