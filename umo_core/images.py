"""Image inputs: files, numpy arrays, PIL images and ComfyUI IMAGE tensors.

Everything becomes RGB: uint8 [H,W,3] arrays for detection, float tensors in 0..1 for
the differentiable path. Greyscale is repeated to three channels; RGBA is composited
over white (transparent pixels often hold arbitrary colours).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UMOError

ImageLike = str | Path | np.ndarray | torch.Tensor | Image.Image


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 [H,W,3], honouring EXIF rotation."""
    path = Path(path)
    if not path.is_file():
        raise UMOError(f"image '{path}' does not exist or is not a file")
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return _pil_to_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UMOError(f"image '{path}' cannot be read as an image ({error})") from None


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
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

    Accepts paths, PIL images, uint8 or float (0..1) numpy arrays, and torch tensors in
    ComfyUI's IMAGE layout ([B,H,W,C] or [H,W,C], float 0..1).
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
            result.append(_pil_to_rgb(image))
        elif isinstance(image, torch.Tensor):
            result.extend(to_rgb_uint8(image))
        elif isinstance(image, np.ndarray):
            result.append(_array_to_rgb(image, f"image {i}"))
        else:
            raise UMOError(f"image {i} is a {type(image).__name__}; expected a path, PIL image, array or tensor")
    return result


def float_image(image: np.ndarray) -> torch.Tensor:
    """RGB uint8 [H,W,3] -> float tensor [H,W,3] in 0..1 (a copy: the array may be read-only)."""
    return torch.tensor(image, dtype=torch.float32).div_(255.0)
