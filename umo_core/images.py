"""Image inputs: files, numpy arrays, PIL images and ComfyUI IMAGE tensors.

Everything becomes RGB: uint8 [H,W,3] arrays for detection, float tensors in 0..1 for
the differentiable path. How each PIL mode is read:
- 8-bit modes (L, RGB, P, YCbCr, CMYK, 1, ...): PIL's own conversion to RGB. 16-bit RGB(A)
  PNG and TIFF files already open as 8-bit RGB(A) in PIL (its decoders keep the high byte).
- 16-bit grey (I;16, I;16B, ...): 0..65535 scaled to 0..255 (PIL's own conversion clips at 255
  instead, which turns most of a photo white).
- 32-bit I and F: their scale is not in the file, so it is read from the values: the smallest of
  0..1 (float only: tifffile, scikit-image, OpenCV floats), 0..255 (PIL's L.convert('I'/'F')) and
  0..65535 (16-bit data) that holds every value; anything else is an error.
- With transparency (RGBA, LA, PA, a palette or grey with a transparent colour): composited
  over white, as transparent pixels often hold arbitrary colours. Greyscale is repeated to
  three channels.
- Animated files (GIF, WebP, APNG): the first frame, with a note saying so.

Image files larger than MAX_PIXELS are refused with a message that says how to raise the
limit (`max_pixels`, $UMO_MAX_PIXELS, the CLI's --max-pixels): this is the project's one check;
PIL's own decompression-bomb warning and error never reach the user.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UMOError
from .files import atomic_path, is_symlink_loop

ImageLike = str | Path | np.ndarray | torch.Tensor | Image.Image

# 100 megapixels (10000 x 10000): 300 MB as RGB uint8 and 1.2 GB as the float copy that face
# alignment reads, so a few such images fit in memory at once. 0 turns the check off.
MAX_PIXELS = 100_000_000
MAX_PIXELS_ENV = "UMO_MAX_PIXELS"
# The file types the commands collect from folders (photo collections, benchmark folders); any file PIL
# opens works where a path is given one by one.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

_PIL_LIMIT_LOCK = threading.Lock()


def pixel_limit(max_pixels: int | None = None) -> int:
    """The pixel limit in force: `max_pixels` (the CLI's --max-pixels) if given, else $UMO_MAX_PIXELS, else
    MAX_PIXELS; 0 = none. A bad value is an error naming where it came from."""
    if max_pixels is not None:
        if max_pixels < 0:
            raise UMOError(f"--max-pixels is {max_pixels}; give a positive number of pixels, or 0 for no limit")
        return max_pixels
    setting = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not setting:
        return MAX_PIXELS
    try:
        limit = int(setting)
    except ValueError:
        limit = None
    if limit is None or limit < 0:
        raise UMOError(f"${MAX_PIXELS_ENV} is '{setting}'; set it to a whole number of pixels (0 for no limit) "
                       "or unset it")
    return limit


def _pixel_counts(count: int, limit: int) -> tuple[str, str]:
    """An image's pixel count and the limit as a user reads them: megapixels with one decimal, or the exact
    numbers where that would show a small limit as 0.0 or the two as equal."""
    megapixels = f"{count / 1e6:.1f} megapixels", f"{limit / 1e6:.1f} megapixels"
    if limit < 1_000_000 or megapixels[0] == megapixels[1]:
        return f"{count} pixels", f"{limit} pixels"
    return megapixels


def _check_pixels(size: tuple[int, int], label: str, max_pixels: int | None) -> None:
    limit = pixel_limit(max_pixels)
    width, height = size
    if limit and width * height > limit:
        count, allowed = _pixel_counts(width * height, limit)
        raise UMOError(
            f"{label} is {width}x{height} = {count}, above the limit of {allowed}; pass --max-pixels "
            f"{width * height} (or set {MAX_PIXELS_ENV}={width * height}, 0 for no limit) to read it anyway, "
            "or use a smaller copy")


@contextlib.contextmanager
def _pil_pixel_check_off() -> Iterator[None]:
    """PIL's decompression-bomb check off while we read a file: ours replaces it (with the file's
    name and how to raise the limit). PIL reads a module-wide setting, so it is restored right
    after the read, and the lock keeps two of our reads from interleaving."""
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def check_image_file(path: Path, label: str) -> None:
    """That `path` is a file, as `load_image` checks it (`label` names it): commands check every input before
    they load any model."""
    if is_symlink_loop(path):
        raise UMOError(f"{label} is a symbolic link loop (its links lead back to themselves); give the image "
                       "file itself")
    if not path.is_file():
        raise UMOError(f"{label} does not exist or is not a file")


def load_image(path: str | Path, label: str | None = None, notes: list[str] | None = None,
               max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as RGB uint8 [H,W,3], honouring EXIF rotation.

    `label` names the file in messages (e.g. "reference 2 'a.png'"; default "image '<path>'").
    `notes`, when given, gets a line for what the caller should tell the user (an animated file's
    first frame is used). `max_pixels` overrides the pixel limit (see `pixel_limit`).
    """
    path = Path(path)
    label = label or f"image '{path}'"
    check_image_file(path, label)
    try:
        with _pil_pixel_check_off(), Image.open(path) as image:
            _check_pixels(image.size, label, max_pixels)
            frames = getattr(image, "n_frames", 1)
            if frames > 1 and notes is not None:
                notes.append(f"{label} is animated ({frames} frames); using the first frame")
            return _pil_to_rgb(ImageOps.exif_transpose(image), label)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UMOError(f"{label} cannot be read as an image ({error})") from None


def check_image_header(path: Path, label: str, max_pixels: int | None = None) -> None:
    """`load_image`'s checks without decoding the pixels: `check_image_file`, and the header that PIL reads says
    an image within the pixel limit; for commands that check a folder of inputs before the long work."""
    check_image_file(path, label)
    try:
        with _pil_pixel_check_off(), Image.open(path) as image:
            _check_pixels(image.size, label, max_pixels)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UMOError(f"{label} cannot be read as an image ({error})") from None


def _value_scale(values: np.ndarray, mode: str, name: str) -> float:
    """The full-scale value of a 32-bit I or F image (see the module docstring)."""
    low, high = float(values.min(initial=0)), float(values.max(initial=0))
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 65535:
        raise UMOError(f"{name} is a 32-bit {mode} image with values from {low:g} to {high:g}, which fit no known "
                       "brightness scale (0..1, 0..255 or 0..65535); save it as an 8- or 16-bit image")
    scales = (1.0, 255.0, 65535.0) if mode == "F" else (255.0, 65535.0)
    return next(scale for scale in scales if high <= scale)


def _grey_to_rgb(image: Image.Image, name: str) -> np.ndarray:
    """RGB uint8 from a 16-bit or 32-bit single-channel image."""
    values = np.asarray(image)
    scale = 65535.0 if image.mode.startswith("I;16") else _value_scale(values, image.mode, name)
    grey = np.clip(values.astype(np.float64) * (255.0 / scale) + 0.5, 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def _pil_to_rgb(image: Image.Image, name: str) -> np.ndarray:
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _grey_to_rgb(image, name)
    if image.mode in ("RGBA", "RGBa", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def _array_to_rgb(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise UMOError(f"{name} has shape {tuple(array.shape)}; expected [H,W], [H,W,1], [H,W,3] or [H,W,4]")
    if array.dtype != np.uint8:
        array = np.clip(np.nan_to_num(array.astype(np.float32)) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 4:
        alpha = array[:, :, 3:4].astype(np.float32) / 255.0
        array = (array[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)
    return np.ascontiguousarray(array)


def to_rgb_uint8(images: ImageLike | Sequence[ImageLike]) -> list[np.ndarray]:
    """Turn one image or a batch into a list of RGB uint8 [H,W,3] arrays.

    Accepts paths, PIL images (any mode, see above), uint8 or float (0..1) numpy arrays, and
    torch tensors in ComfyUI's IMAGE layout ([B,H,W,C] or [H,W,C], float 0..1). Floats become the nearest
    uint8 (x * 255 rounded), clamped to 0..255.
    """
    if isinstance(images, torch.Tensor):
        array = images.detach().float().cpu().numpy()
        batch = array if array.ndim == 4 else array[None]
        return [_array_to_rgb(item, f"image tensor item {i}") for i, item in enumerate(batch)]
    if isinstance(images, (str, Path, np.ndarray, Image.Image)):
        images = [images]
    result = []
    for i, image in enumerate(images):
        if isinstance(image, (str, Path)):
            result.append(load_image(image))
        elif isinstance(image, Image.Image):
            result.append(_pil_to_rgb(image, f"image {i}"))
        elif isinstance(image, torch.Tensor):
            result.extend(to_rgb_uint8(image))
        elif isinstance(image, np.ndarray):
            result.append(_array_to_rgb(image, f"image {i}"))
        else:
            raise UMOError(f"image {i} is a {type(image).__name__}; expected a path, PIL image, array or tensor")
    return result


def save_image(image: torch.Tensor | np.ndarray | Image.Image, path: Path) -> None:
    """Write one image (float [H,W,3] in 0..1, RGB uint8 [H,W,3], or a PIL image) to `path`, in the format its
    suffix names, whole or not at all (atomic_path: an interruption leaves no half-written image).

    Floats are rounded to the nearest uint8 and clamped (`to_rgb_uint8`).
    """
    path = Path(path)
    with atomic_path(path, suffix=f".tmp{path.suffix}") as temporary:  # PIL picks the format by the suffix
        Image.fromarray(to_rgb_uint8(image)[0]).save(temporary)


def float_image(image: np.ndarray | Image.Image) -> torch.Tensor:
    """RGB uint8 [..,H,W,3] (or an RGB PIL image) -> float tensor [..,H,W,3] in 0..1 (a copy: the array may be
    read-only).

    Converted in NumPy (the same float32 values as torch's division): torch would run it on its OpenMP
    threads, which spin for a while after each parallel operation and take the cores from the detector.
    """
    return torch.from_numpy(np.asarray(image, np.float32) / np.float32(255.0))
