"""UNO's reference resize rule (no ComfyUI needed)."""

from __future__ import annotations

import pytest
import torch

from umo_core.backbones.references import reference_long_side, resize_reference


@pytest.mark.parametrize(("count", "expected"), [(1, 512), (2, 320), (4, 320)])
def test_uno_long_side_rule(count, expected):
    assert reference_long_side(count) == expected
    assert reference_long_side(count, override=256) == 256


@pytest.mark.parametrize(("height", "width", "long_side", "expected"), [
    (250, 250, 512, (512, 512)),
    (886, 1280, 320, (208, 320)),  # 221.5 -> 221 -> cropped to 208
    (1280, 886, 512, (512, 352)),  # width 354.4 -> 354 -> cropped to 352
])
def test_resize_and_centre_crop_to_multiples_of_16(height, width, long_side, expected):
    image = torch.rand(height, width, 3)
    resized = resize_reference(image, long_side)
    assert tuple(resized.shape[:2]) == expected and resized.shape[2] == 3
    assert 0 <= resized.min() and resized.max() <= 1
