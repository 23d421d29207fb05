"""FLUX.2's reference rule, as Flux2Pipeline and Flux2KleinPipeline prepare a reference image: a photo of more than
`pixels` pixels (REFERENCE_PIXELS, one megapixel, in the pipelines) is scaled (LANCZOS) to about that many, keeping
its aspect ratio; then both sides are cut down to multiples of 16 by a centred crop. Smaller photos are not scaled.
The placement is the position ids' first axis (runtime.image_ids)."""

from __future__ import annotations

import math

import torch

from ...errors import UMOError
from ...images import ImageLike, to_rgb_uint8
from ..references import MULTIPLE, resize_and_crop

REFERENCE_PIXELS = 1024 * 1024


def scaled_shape(height: int, width: int, pixels: int = REFERENCE_PIXELS) -> tuple[int, int]:
    """(height, width) before the crop: scaled to about `pixels` when larger (the pipelines truncate)."""
    if height * width <= pixels:
        return height, width
    scale = math.sqrt(pixels / (height * width))
    return int(height * scale), int(width * scale)


def reference_shape(height: int, width: int, pixels: int = REFERENCE_PIXELS) -> tuple[int, int]:
    """(height, width) of a height x width reference after the rule."""
    scaled_h, scaled_w = scaled_shape(height, width, pixels)
    return scaled_h // MULTIPLE * MULTIPLE, scaled_w // MULTIPLE * MULTIPLE


def resize_reference(image: ImageLike, pixels: int = REFERENCE_PIXELS) -> torch.Tensor:
    """One reference image (uint8 or float [H,W,3], or anything `to_rgb_uint8` reads) -> float [h,w,3] 0..1."""
    array = to_rgb_uint8(image)[0]
    crop = reference_shape(*array.shape[:2], pixels)
    if min(crop) < MULTIPLE:
        raise UMOError(f"reference image {array.shape[1]}x{array.shape[0]} is too small or too elongated for "
                       f"FLUX.2 (each side needs {MULTIPLE} px after scaling to {pixels} pixels)")
    return resize_and_crop(array, scaled_shape(*array.shape[:2], pixels), crop)
