"""How images are resized for a backbone: the machinery every rule shares (nearest multiples, centred crops,
cover-and-crop). Each backbone's own reference rule is in its folder (`<name>/references.py`); the trainer's
aspect-ratio buckets use the cover rule.

Sides end as multiples of MULTIPLE (16) so an image packs into 2x2 patches of the 8x-downsampled VAE latent.
Scaling with a crop is LANCZOS on the uint8 image (as PIL does it), then a centred crop.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..images import float_image

MULTIPLE = 16


def nearest_multiple(length: float) -> int:
    """`length` rounded to the nearest multiple of MULTIPLE, at least MULTIPLE."""
    return max(MULTIPLE, round(length / MULTIPLE) * MULTIPLE)


def centre_corner(shape: tuple[int, int], crop: tuple[int, int]) -> tuple[int, int]:
    """(left, top) of a crop of `crop` (height, width) centred in an image of `shape` (height, width); an odd
    margin leaves its extra pixel at the bottom or right."""
    return (shape[1] - crop[1]) // 2, (shape[0] - crop[0]) // 2


def resize_and_crop(image: np.ndarray, scaled: tuple[int, int], crop: tuple[int, int]) -> torch.Tensor:
    """RGB uint8 [H,W,3] -> float [h,w,3] in 0..1: scaled to `scaled` (height, width; LANCZOS), then the centred
    `crop` (h, w)."""
    resized = Image.fromarray(image).resize((scaled[1], scaled[0]), resample=Image.LANCZOS)
    left, top = centre_corner(scaled, crop)
    return float_image(resized.crop((left, top, left + crop[1], top + crop[0])))


def cover_shape(image_hw: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) that an image of image_hw is scaled to so that it covers `size` (height, width)."""
    height, width = size
    scale = max(height / image_hw[0], width / image_hw[1])
    return max(height, round(image_hw[0] * scale)), max(width, round(image_hw[1] * scale))
