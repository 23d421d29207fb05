"""How images are resized for a backbone: UNO's and OmniGen2's reference rules and the cover-and-crop rule
of the trainer's aspect-ratio buckets, on one set of machinery.

Sides end as multiples of MULTIPLE (16) so an image packs into 2x2 patches of the 8x-downsampled VAE
latent. Scaling with a crop is LANCZOS on the uint8 image (as PIL does it), then a centred crop.

- UNO (FLUX; UNO, arXiv 2504.02160): each reference's long side goes to 512 px when there is one
  reference and 320 px when there are several, then the image is centre-cropped to multiples of 16.
- OmniGen2: each reference is scaled (area) to about OMNIGEN2_REFERENCE_PIXELS, sides rounded to
  multiples of 16, as the official OmniGen2 graph does.
- Cover: scaled so that it covers a target size, then centre-cropped to it (no squashing).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from ..errors import UMOError
from ..images import ImageLike, float_image, to_rgb_uint8

MULTIPLE = 16
SINGLE_REFERENCE_LONG_SIDE = 512
MULTI_REFERENCE_LONG_SIDE = 320
OMNIGEN2_REFERENCE_PIXELS = 1024 * 1024  # the official OmniGen2 graph scales references to 1 megapixel


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


def reference_long_side(reference_count: int, override: int | None = None) -> int:
    """UNO's long side for `reference_count` references, unless `override` (> 0) is given."""
    if override:
        return override
    return SINGLE_REFERENCE_LONG_SIDE if reference_count <= 1 else MULTI_REFERENCE_LONG_SIDE


def resized_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(height, width) after UNO's scaling of the long side to `long_side`, before the crop."""
    if width >= height:
        return int(long_side / width * height), long_side
    return long_side, int(long_side / height * width)


def reference_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(height, width) of a height x width reference after UNO's rule: scaled, then cropped to multiples of 16."""
    scaled_h, scaled_w = resized_shape(height, width, long_side)
    return scaled_h // MULTIPLE * MULTIPLE, scaled_w // MULTIPLE * MULTIPLE


def resize_reference(image: ImageLike, long_side: int) -> torch.Tensor:
    """One reference image (float [H,W,3] in 0..1, RGB uint8 [H,W,3] as load_image gives it, or anything
    `to_rgb_uint8` reads) -> UNO's float [h,w,3]: long side `long_side`, centre-cropped to multiples of 16."""
    array = to_rgb_uint8(image)[0]
    scaled = resized_shape(*array.shape[:2], long_side)
    if min(scaled) < MULTIPLE:
        raise UMOError(f"reference image {array.shape[1]}x{array.shape[0]} is too elongated for long side {long_side}")
    return resize_and_crop(array, scaled, reference_shape(*array.shape[:2], long_side))


def resize_omnigen2_reference(image: torch.Tensor, pixels: int) -> torch.Tensor:
    """One reference image [H,W,3] float -> OmniGen2's [h,w,3]: about `pixels` pixels (area scaling), sides
    multiples of 16. `pixels`: OMNIGEN2_REFERENCE_PIXELS, or fewer where a test keeps the encode short."""
    h, w = image.shape[:2]
    scale = math.sqrt(pixels / (h * w))
    size = (nearest_multiple(h * scale), nearest_multiple(w * scale))
    resized = torch.nn.functional.interpolate(image.permute(2, 0, 1)[None], size=size, mode="area")
    return resized[0].permute(1, 2, 0)
