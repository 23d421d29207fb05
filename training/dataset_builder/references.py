"""Reference crops: which face of a person makes the best reference, and the crop around it.

A face's reference quality is the product of four factors in 0..1, so a face weak in any one of
them loses to a face that is good in all:
- size: the box's short side over REFERENCE_FACE_SIDE (UNO resizes references to 320-512 px, so a
  face of 256 px or more is full size);
- sharpness: s / (s + SHARPNESS_HALF), s the variance of the Laplacian of the face (faces.py);
- frontalness: keypoint symmetry (faces.py);
- the detector's score.
"""

from __future__ import annotations

import numpy as np

from .faces import PhotoFaces, frontalness

REFERENCE_FACE_SIDE = 256.0
SHARPNESS_HALF = 50.0  # about the sharpness of a sharp face (filters.py)
DEFAULT_MARGIN = 0.6  # each side, as a fraction of the face box's long side: a head-and-shoulders crop
MAX_REFERENCE_MARGIN = 3.0  # beyond, the face is a speck in its reference (UNO resizes references to 320-512 px)


def reference_quality(faces: PhotoFaces) -> np.ndarray:
    """[N] quality of each face of a photo as a reference (see above); higher is better."""
    size = np.minimum(faces.face_sides() / REFERENCE_FACE_SIDE, 1.0)
    sharp = faces.sharpness / (faces.sharpness + SHARPNESS_HALF)
    return (size * sharp * frontalness(faces.keypoints) * faces.scores).astype(np.float32)


def crop_box(box: np.ndarray, height: int, width: int, margin: float) -> tuple[int, int, int, int]:
    """A square (as far as the photo allows) around a face box, `margin` of its long side added on
    each side, moved inside the photo rather than padded: (left, top, right, bottom) in pixels."""
    x1, y1, x2, y2 = (float(v) for v in box)
    side = int(min(max(x2 - x1, y2 - y1) * (1 + 2 * margin), width, height))
    centre_x, centre_y = (x1 + x2) / 2, (y1 + y2) / 2
    left = int(round(min(max(centre_x - side / 2, 0), width - side)))
    top = int(round(min(max(centre_y - side / 2, 0), height - side)))
    return left, top, left + side, top + side
