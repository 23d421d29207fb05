"""UNO's reference rule (FLUX.1; UNO, arXiv 2504.02160): each reference's long side goes to 512 px when there is one
reference and 320 px when there are several, then the image is centre-cropped to multiples of 16. The placement is
UNO's diagonal position ids (uno.py)."""

from __future__ import annotations

import torch

from ...errors import UMOError
from ...images import ImageLike, to_rgb_uint8
from ..references import MULTIPLE, resize_and_crop

SINGLE_REFERENCE_LONG_SIDE = 512
MULTI_REFERENCE_LONG_SIDE = 320


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
