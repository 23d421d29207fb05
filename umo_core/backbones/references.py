"""UNO's reference-image preparation (UNO, arXiv 2504.02160): the resize rule.

Each reference's long side goes to 512 px when there is one reference and 320 px when there
are several (LANCZOS), then the image is centre-cropped to multiples of 16 so it packs into
2x2 patches of the 8x-downsampled VAE latent.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..errors import UMOError

SINGLE_REFERENCE_LONG_SIDE = 512
MULTI_REFERENCE_LONG_SIDE = 320
MULTIPLE = 16


def reference_long_side(reference_count: int, override: int | None = None) -> int:
    """UNO's long side for `reference_count` references, unless `override` (> 0) is given."""
    if override:
        return override
    return SINGLE_REFERENCE_LONG_SIDE if reference_count <= 1 else MULTI_REFERENCE_LONG_SIDE


def resized_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(height, width) after scaling the long side to `long_side`, before the crop."""
    if width >= height:
        return int(long_side / width * height), long_side
    return long_side, int(long_side / height * width)


def resize_reference(image: torch.Tensor, long_side: int) -> torch.Tensor:
    """One reference image [H,W,3] float 0..1 -> resized and centre-cropped [h,w,3], h and w multiples of 16."""
    array = (image.detach().float().cpu().clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
    new_h, new_w = resized_shape(*array.shape[:2], long_side)
    if new_h < MULTIPLE or new_w < MULTIPLE:
        raise UMOError(f"reference image {array.shape[1]}x{array.shape[0]} is too elongated for long side {long_side}")
    resized = Image.fromarray(array).resize((new_w, new_h), resample=Image.LANCZOS)
    target_h, target_w = new_h // MULTIPLE * MULTIPLE, new_w // MULTIPLE * MULTIPLE
    top, left = (new_h - target_h) // 2, (new_w - target_w) // 2
    cropped = resized.crop((left, top, left + target_w, top + target_h))
    return torch.from_numpy(np.asarray(cropped).copy()).float().div(255.0)
