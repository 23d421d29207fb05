"""The resize rules: UNO's and OmniGen2's references, cover-and-crop (no ComfyUI needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from umo_core.backbones.flux1.references import reference_long_side, reference_shape, resize_reference
from umo_core.backbones.omnigen2.references import resize_omnigen2_reference
from umo_core.backbones.references import centre_corner, cover_shape, nearest_multiple, resize_and_crop
from umo_core.images import float_image, load_image


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
    assert reference_shape(height, width, long_side) == expected  # known from the file's size alone



def test_a_uint8_photo_and_its_float_twin_give_the_same_reference(photos):
    """The trainer and `generate` hand load_image's uint8 array straight in; ComfyUI hands float images."""
    photo = load_image(photos / "Rob_Lowe_0001.jpg")
    assert torch.equal(resize_reference(photo, 320), resize_reference(float_image(photo), 320))

def test_omnigen2_references_keep_the_pixel_count_with_sides_multiples_of_16():
    image = torch.full((100, 200, 3), 0.25)
    resized = resize_omnigen2_reference(image, 128 * 128)
    assert tuple(resized.shape) == (96, 176, 3)  # 90.5 x 181 rounded to multiples of 16
    assert torch.allclose(resized, torch.tensor(0.25))  # area scaling keeps a flat image flat


@pytest.mark.parametrize(("length", "expected"), [(3, 16), (23, 16), (25, 32), (1000.5, 1008)])
def test_nearest_multiple_of_16(length, expected):
    assert nearest_multiple(length) == expected


def test_cover_scales_to_cover_and_the_crop_is_centred():
    assert cover_shape((100, 300), (64, 96)) == (64, 192)  # the height decides; the width overflows
    assert cover_shape((300, 100), (64, 96)) == (288, 96)
    assert centre_corner((64, 192), (64, 96)) == (48, 0)
    assert centre_corner((7, 10), (4, 7)) == (1, 1)  # an odd margin: the extra pixel at the bottom and right
    image = np.zeros((100, 300, 3), np.uint8)
    image[:, 100:200] = 255
    cropped = resize_and_crop(image, (64, 192), (64, 96))
    assert cropped.shape == (64, 96, 3) and cropped[:, 24:72].min() > 0.99 and cropped[:, :8].max() < 0.01
