"""Image decoding: every PIL mode against its 8-bit RGB twin, animated files, the pixel limit.

Each file is made from a real fixture photo and written in a real format (PNG, TIFF, GIF, WebP);
its twin is the 8-bit RGB image it stands for, computed here with numpy. Decoded pixels must be
within 1/255 of the twin, and the fixture face model must find the same face with the same embedding.
"""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image, features

from tests.image_files import huge_png
from umo_core.errors import UMOError
from umo_core.images import MAX_PIXELS, float_image, load_image, pixel_limit, save_image, to_rgb_uint8


@pytest.fixture(scope="module")
def photo(photos) -> np.ndarray:
    return np.asarray(Image.open(photos / "Rob_Lowe_0001.jpg").convert("RGB"))


def _grey(photo: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(photo).convert("L"))


def _rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2)


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[:, :, None].astype(np.float64) / 255.0
    return (rgb * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)


def _alpha(shape: tuple[int, int]) -> np.ndarray:
    """Opaque, with a transparent band at the top and a half-transparent one at the bottom (off the face)."""
    alpha = np.full(shape, 255, np.uint8)
    alpha[:30] = 0
    alpha[-30:] = 128
    return alpha


def _sixteen_bit_grey_png(photo, folder):
    Image.fromarray(_grey(photo).astype(np.uint16) * 257).save(folder / "grey16.png")
    return folder / "grey16.png", "I;16", _rgb(_grey(photo))


def _sixteen_bit_big_endian_tiff(photo, folder):
    tifffile.imwrite(folder / "grey16be.tif", (_grey(photo).astype(np.uint16) * 257).astype(">u2"))
    return folder / "grey16be.tif", "I;16B", _rgb(_grey(photo))


def _sixteen_bit_rgb_png(photo, folder):
    cv2.imwrite(str(folder / "rgb48.png"), photo[:, :, ::-1].astype(np.uint16) * 257)  # OpenCV writes BGR
    return folder / "rgb48.png", "RGB", photo


def _sixteen_bit_rgba_png(photo, folder):
    alpha = _alpha(photo.shape[:2])
    bgra = np.dstack([photo[:, :, ::-1], alpha]).astype(np.uint16) * 257
    cv2.imwrite(str(folder / "rgba64.png"), bgra)
    return folder / "rgba64.png", "RGBA", _over_white(photo, alpha)


def _sixteen_bit_rgb_tiff(photo, folder):
    tifffile.imwrite(folder / "rgb48.tif", photo.astype(np.uint16) * 257, photometric="rgb")
    return folder / "rgb48.tif", "RGB", photo


def _float_tiff_0_to_1(photo, folder):
    tifffile.imwrite(folder / "float01.tif", (_grey(photo) / 255.0).astype(np.float32))
    return folder / "float01.tif", "F", _rgb(_grey(photo))


def _float_tiff_0_to_255(photo, folder):
    Image.fromarray(photo).convert("L").convert("F").save(folder / "float255.tif")  # PIL's own float scale
    return folder / "float255.tif", "F", _rgb(_grey(photo))


def _float_tiff_0_to_65535(photo, folder):
    Image.fromarray(_grey(photo).astype(np.uint16) * 257).convert("F").save(folder / "float65535.tif")
    return folder / "float65535.tif", "F", _rgb(_grey(photo))


def _int32_tiff_16_bit_values(photo, folder):
    tifffile.imwrite(folder / "int32.tif", _grey(photo).astype(np.int32) * 257)
    return folder / "int32.tif", "I", _rgb(_grey(photo))


def _int32_tiff_8_bit_values(photo, folder):
    Image.fromarray(photo).convert("L").convert("I").save(folder / "int32_8bit.tif")
    return folder / "int32_8bit.tif", "I", _rgb(_grey(photo))


def _palette_png(photo, folder):
    image = Image.fromarray(photo).quantize(256)
    image.save(folder / "palette.png")
    palette = np.asarray(image.getpalette(), np.uint8).reshape(-1, 3)
    return folder / "palette.png", "P", palette[np.asarray(image)]


def _palette_png_with_transparency(photo, folder):
    image = Image.fromarray(photo).quantize(255)
    indices = np.asarray(image).copy()
    indices[:30] = 255  # a palette entry of its own, made transparent
    transparent = Image.fromarray(indices, "P")
    transparent.putpalette(image.getpalette()[: 255 * 3] + [0, 0, 0])
    transparent.save(folder / "palette_transparent.png", transparency=255)
    palette = np.asarray(transparent.getpalette(), np.uint8).reshape(-1, 3)
    twin = palette[indices]
    twin[indices == 255] = 255
    return folder / "palette_transparent.png", "P", twin


def _grey_alpha_png(photo, folder):
    alpha = _alpha(photo.shape[:2])
    Image.fromarray(np.dstack([_grey(photo), alpha]), "LA").save(folder / "grey_alpha.png")
    return folder / "grey_alpha.png", "LA", _over_white(_rgb(_grey(photo)), alpha)


def _rgba_png(photo, folder):
    alpha = _alpha(photo.shape[:2])
    Image.fromarray(np.dstack([photo, alpha]), "RGBA").save(folder / "rgba.png")
    return folder / "rgba.png", "RGBA", _over_white(photo, alpha)


def _cmyk_tiff(photo, folder):
    cyan_magenta_yellow = 255 - photo
    cmyk = np.dstack([cyan_magenta_yellow, np.zeros(photo.shape[:2], np.uint8)])
    Image.fromarray(cmyk, "CMYK").save(folder / "cmyk.tif")
    return folder / "cmyk.tif", "CMYK", photo


def _bilevel_png(photo, folder):
    image = Image.fromarray(photo).convert("1")
    image.save(folder / "bilevel.png")
    return folder / "bilevel.png", "1", _rgb(np.where(np.asarray(image), 255, 0).astype(np.uint8))


def _grey_png(photo, folder):
    Image.fromarray(_grey(photo)).save(folder / "grey.png")
    return folder / "grey.png", "L", _rgb(_grey(photo))


MODES = [_sixteen_bit_grey_png, _sixteen_bit_big_endian_tiff, _sixteen_bit_rgb_png, _sixteen_bit_rgba_png,
         _sixteen_bit_rgb_tiff, _float_tiff_0_to_1, _float_tiff_0_to_255, _float_tiff_0_to_65535,
         _int32_tiff_16_bit_values, _int32_tiff_8_bit_values, _palette_png, _palette_png_with_transparency,
         _grey_alpha_png, _rgba_png, _cmyk_tiff, _bilevel_png, _grey_png]


def _same_faces(face_model, decoded: np.ndarray, twin: np.ndarray) -> int:
    """The fixture model finds the same faces with the same embeddings in both; returns how many."""
    got, expected = face_model.analyse([decoded, twin])
    assert len(got.faces) == len(expected.faces)
    if len(expected.faces):
        np.testing.assert_allclose(got.faces.boxes, expected.faces.boxes, atol=1.0)
        assert (got.embeddings * expected.embeddings).sum(dim=1).min() > 0.99
    return len(expected.faces)


@pytest.mark.parametrize("make", MODES, ids=[m.__name__.strip("_") for m in MODES])
def test_every_mode_decodes_like_its_8_bit_rgb_twin(make, photo, face_model, tmp_path):
    path, mode, twin = make(photo, tmp_path)
    assert Image.open(path).mode == mode  # the file really is in the mode under test
    decoded = load_image(path)
    assert decoded.dtype == np.uint8 and decoded.shape == twin.shape
    assert np.abs(decoded.astype(int) - twin.astype(int)).max() <= 1
    faces = _same_faces(face_model, decoded, twin)
    if mode != "1":  # a dithered bilevel picture need not show a face at all
        assert faces == 1
    with Image.open(path) as image:  # an opened PIL image is read the same way
        np.testing.assert_array_equal(to_rgb_uint8(image)[0], decoded)


def test_sixteen_bit_grey_is_not_washed_out(photo, tmp_path):
    """The bug this fixes: PIL's own I;16 -> RGB clips at 255, turning most of the photo white."""
    path, _, twin = _sixteen_bit_grey_png(photo, tmp_path)
    assert (np.asarray(Image.open(path).convert("RGB")) == 255).mean() > 0.5
    assert (load_image(path) == 255).mean() == pytest.approx((twin == 255).mean(), abs=0.01)


def test_float_and_int_images_without_a_known_scale_are_refused(photo, tmp_path):
    tifffile.imwrite(tmp_path / "hdr.tif", (_grey(photo) * 1000.0).astype(np.float32))
    with pytest.raises(UMOError, match=r"hdr\.tif.*32-bit F image with values from 0 to 255000.*8- or 16-bit"):
        load_image(tmp_path / "hdr.tif")
    tifffile.imwrite(tmp_path / "negative.tif", _grey(photo).astype(np.int32) - 128)
    with pytest.raises(UMOError, match=r"negative\.tif.*32-bit I image with values from -128"):
        load_image(tmp_path / "negative.tif")


def test_tensors_and_arrays(photo):
    """ComfyUI IMAGE tensors and numpy arrays, as before: float 0..1 and uint8, grey and RGBA."""
    tensor = torch.from_numpy(photo).float().div(255.0)
    np.testing.assert_array_equal(to_rgb_uint8(tensor[None].repeat(2, 1, 1, 1))[1], photo)
    np.testing.assert_array_equal(to_rgb_uint8(tensor)[0], photo)
    np.testing.assert_array_equal(to_rgb_uint8(photo)[0], photo)
    np.testing.assert_array_equal(to_rgb_uint8(_grey(photo))[0], _rgb(_grey(photo)))
    alpha = _alpha(photo.shape[:2])
    assert np.abs(to_rgb_uint8(np.dstack([photo, alpha]))[0].astype(int) - _over_white(photo, alpha)).max() <= 1


def test_float_images_are_rounded_and_clamped_to_uint8_and_back(tmp_path):
    """One rule both ways: x * 255 to the nearest step, clamped (what PNGs and PIL get); uint8 / 255 back."""
    image = torch.tensor([[[0.0, 0.5, 1.0], [-0.1, 1.2, 0.998]]])  # [1,2,3]
    save_image(image, tmp_path / "image.png")
    written = np.asarray(Image.open(tmp_path / "image.png"))
    np.testing.assert_array_equal(written, [[[0, 128, 255], [0, 255, 254]]])
    np.testing.assert_array_equal(float_image(written).numpy(), written.astype(np.float32) / 255)


def test_float_image_takes_pil_images_and_batches(photo):
    np.testing.assert_array_equal(float_image(Image.fromarray(photo)), float_image(photo))
    batch = float_image(np.stack([photo, photo]))
    assert batch.shape == (2, *photo.shape) and batch.dtype == torch.float32
    np.testing.assert_array_equal(to_rgb_uint8(batch)[1], photo)


def _animation(photos, path, **options):
    frames = [Image.open(photos / name).convert("RGB") for name in ("Rob_Lowe_0001.jpg", "Nathalie_Baye_0002.jpg")]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, **options)
    return path


ANIMATIONS = {"gif": {}, "png": {}, "webp": {"lossless": True}}


@pytest.mark.parametrize("suffix", list(ANIMATIONS))
def test_animated_files_use_the_first_frame_and_say_so(suffix, photos, face_model, tmp_path):
    if suffix == "webp" and not features.check("webp"):
        pytest.skip("this Pillow has no WebP support")
    path = _animation(photos, tmp_path / f"animated.{suffix}", **ANIMATIONS[suffix])
    notes: list[str] = []
    decoded = load_image(path, "image 3 'animated'", notes)
    assert notes == ["image 3 'animated' is animated (2 frames); using the first frame"]
    with Image.open(path) as image:
        first_frame = np.asarray(image.convert("RGB"))
    np.testing.assert_array_equal(decoded, first_frame)
    # The face is the first frame's person: Rob Lowe, not Nathalie Baye.
    references = face_model.identities([photos / "Rob_Lowe_0002.jpg", photos / "Nathalie_Baye_0002.jpg"])
    similarity = references.embeddings @ face_model.analyse([decoded])[0].embeddings.T
    assert similarity[0, 0] > 0.5 > similarity[1, 0]
    still: list[str] = []
    load_image(photos / "Rob_Lowe_0001.jpg", notes=still)
    assert still == []


def test_pixel_limit_names_the_file_its_size_the_limit_and_the_flag(photos, tmp_path, monkeypatch):
    monkeypatch.delenv("UMO_MAX_PIXELS", raising=False)
    bomb = huge_png(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(bomb)  # what PIL alone would do
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PIL warning either
        with pytest.raises(UMOError) as error:
            load_image(bomb, "image 4 'bomb.png'")
    assert str(error.value) == (
        "image 4 'bomb.png' is 20000x20000 = 400.0 megapixels, above the limit of 100.0 megapixels; pass "
        "--max-pixels 400000000 (or set UMO_MAX_PIXELS=400000000, 0 for no limit) to read it anyway, "
        "or use a smaller copy")
    assert pixel_limit() == MAX_PIXELS == 100_000_000
    rob = photos / "Rob_Lowe_0001.jpg"  # 250 x 250 = 62500 pixels
    with pytest.raises(UMOError, match=r"250x250 = 62500 pixels, above the limit of 62499 pixels; pass "
                                       r"--max-pixels 62500 "):  # not "0.1 megapixels, above ... 0.1 megapixels"
        load_image(rob, max_pixels=62499)
    with pytest.raises(UMOError, match=r"250x250 = 62500 pixels, above the limit of 100 pixels"):  # not 0.0
        load_image(rob, max_pixels=100)
    assert load_image(rob, max_pixels=62500).shape == (250, 250, 3)
    monkeypatch.setenv("UMO_MAX_PIXELS", "1000")
    with pytest.raises(UMOError, match="above the limit"):
        load_image(rob)
    assert load_image(rob, max_pixels=0).shape == (250, 250, 3)  # the argument wins; 0 = no limit
    monkeypatch.setenv("UMO_MAX_PIXELS", "lots")
    for setting in ("lots", "-5", "1e8"):
        monkeypatch.setenv("UMO_MAX_PIXELS", setting)
        with pytest.raises(UMOError, match=rf"^\$UMO_MAX_PIXELS is '{setting}'; set it to a whole number of pixels "
                                           r"\(0 for no limit\) or unset it$"):
            load_image(rob)
    with pytest.raises(UMOError, match=r"^--max-pixels is -1; give a positive number of pixels, or 0 for no limit$"):
        load_image(rob, max_pixels=-1)


def test_pil_setting_is_replaced_while_reading_and_restored(photos, monkeypatch):
    """With PIL's own limit below the image (10000 pixels: it would warn above, fail above 20000),
    our limit alone decides, with no PIL warning, and PIL's setting is as it was afterwards."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10000)
    monkeypatch.delenv("UMO_MAX_PIXELS", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(photos / "Rob_Lowe_0001.jpg").shape == (250, 250, 3)
    assert Image.MAX_IMAGE_PIXELS == 10000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(photos / "Rob_Lowe_0001.jpg")


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(UMOError, match=r"^reference 2 '.*notes\.txt' cannot be read as an image"):
        load_image(tmp_path / "notes.txt", f"reference 2 '{tmp_path / 'notes.txt'}'")
    with pytest.raises(UMOError, match=r"^image '.*missing\.png' does not exist or is not a file"):
        load_image(tmp_path / "missing.png")
