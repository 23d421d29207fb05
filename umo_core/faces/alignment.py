"""Differentiable alignment of faces to the 112x112 ArcFace template.

The similarity transform is fitted to the five keypoints without gradient (keypoints
come from detection); the warp itself is `grid_sample` over an affine grid, so gradients flow
from the crops back to the image pixels. It reproduces insightface's `norm_crop`
(`cv2.warpAffine`, bilinear, zero border) to within interpolation rounding.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from skimage.transform import SimilarityTransform

CROP_SIZE = 112

# ArcFace's five-point template for a 112x112 crop: left eye, right eye, nose, mouth corners.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


def template_transform(keypoints: np.ndarray) -> np.ndarray:
    """The 3x3 similarity transform taking image pixels to crop pixels (least squares, Umeyama)."""
    transform = SimilarityTransform.from_estimate(np.asarray(keypoints, np.float64), ARCFACE_TEMPLATE)
    if not transform:
        raise ValueError(f"cannot fit a similarity transform to keypoints {keypoints.tolist()}")
    return transform.params


def _normalise(size_hw: tuple[int, int]) -> np.ndarray:
    """Pixel coordinates (pixel centres at integers) -> grid_sample's [-1,1] (align_corners=False)."""
    h, w = size_hw
    return np.array([[2.0 / w, 0.0, 1.0 / w - 1.0], [0.0, 2.0 / h, 1.0 / h - 1.0], [0.0, 0.0, 1.0]])


def sampling_thetas(keypoints: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """`affine_grid` thetas [F,2,3] (float64) mapping crop coordinates to image coordinates, one per face."""
    to_image = _normalise(image_hw)
    from_crop = np.linalg.inv(_normalise((CROP_SIZE, CROP_SIZE)))
    thetas = [to_image @ np.linalg.inv(template_transform(k)) @ from_crop for k in keypoints]
    return np.stack(thetas)[:, :2, :]


def sampling_grid(thetas: np.ndarray) -> np.ndarray:
    """`F.affine_grid(thetas, [F,3,112,112], align_corners=False)` as float32 [F,112,112,2], computed in NumPy.

    The grid carries no gradient (it comes from keypoints). torch's affine_grid is a batched matrix product,
    which runs on the BLAS thread pool: on a loaded CPU its threads wait for cores, about 15 ms of CPU and
    30 ms of wall time per call at 2 threads, against 0.4 ms for this element-wise form.
    """
    centres = (2 * np.arange(CROP_SIZE) + 1) / CROP_SIZE - 1  # crop pixel centres in [-1, 1]
    x, y = np.meshgrid(centres, centres)
    t = thetas[:, :, :, None, None]
    grid = np.stack([t[:, 0, 0] * x + t[:, 0, 1] * y + t[:, 0, 2], t[:, 1, 0] * x + t[:, 1, 1] * y + t[:, 1, 2]], -1)
    return grid.astype(np.float32)


def align_faces(image: torch.Tensor, keypoints: np.ndarray) -> torch.Tensor:
    """Crop and align the faces of one image.

    image: [H,W,3] float (ComfyUI layout), any dtype/device, may require grad.
    keypoints: [F,5,2] in the image's pixel coordinates.
    Returns [F,3,112,112] crops in the image's dtype, differentiable w.r.t. `image`.
    """
    count = len(keypoints)
    if count == 0:
        return image.new_zeros((0, 3, CROP_SIZE, CROP_SIZE))
    grid = sampling_grid(sampling_thetas(np.asarray(keypoints, np.float64), image.shape[:2]))
    # One sampling pass over the single image: the faces' grids are stacked along the height,
    # which avoids expanding (and copying) the whole image once per face.
    grid = torch.from_numpy(grid.reshape(1, count * CROP_SIZE, CROP_SIZE, 2)).to(image.device)
    source = image.permute(2, 0, 1).unsqueeze(0).float()
    crops = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    crops = crops.reshape(3, count, CROP_SIZE, CROP_SIZE).transpose(0, 1)
    return crops.to(image.dtype)
