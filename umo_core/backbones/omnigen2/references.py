"""OmniGen2's reference rule: each reference is scaled (area) to about OMNIGEN2_REFERENCE_PIXELS, sides rounded to
multiples of 16, as the official OmniGen2 graph does."""

from __future__ import annotations

import math

import torch

from ..references import nearest_multiple

OMNIGEN2_REFERENCE_PIXELS = 1024 * 1024  # the official OmniGen2 graph scales references to 1 megapixel


def resize_omnigen2_reference(image: torch.Tensor, pixels: int | None = None) -> torch.Tensor:
    """One reference image [H,W,3] float -> OmniGen2's [h,w,3]: about `pixels` pixels (area scaling), sides
    multiples of 16. `pixels`: OMNIGEN2_REFERENCE_PIXELS (read at call time, so a test may lower it to keep the
    encode short), or an explicit count."""
    pixels = OMNIGEN2_REFERENCE_PIXELS if pixels is None else pixels
    h, w = image.shape[:2]
    scale = math.sqrt(pixels / (h * w))
    size = (nearest_multiple(h * scale), nearest_multiple(w * scale))
    resized = torch.nn.functional.interpolate(image.permute(2, 0, 1)[None], size=size, mode="area")
    return resized[0].permute(1, 2, 0)
