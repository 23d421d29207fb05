"""What the builder knows about each photo's faces, and the measures it takes of them.

Detection and embedding are umo_core's `FaceModel.analyse` (the library's one face path); this module
adds what choosing references and filtering need: each face's sharpness (variance of the Laplacian of
its aligned 112x112 crop, so faces of any size are measured on the same scale), its frontalness (how
symmetric the keypoints are) and a perceptual hash of the whole photo for near-duplicates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy.ndimage import laplace

from umo_core import FaceModel
from umo_core.alignment import align_faces
from umo_core.images import float_image

HASH_SIDE = 8  # difference hash of an 8x8 grid: 64 bits


@dataclass
class PhotoFaces:
    """One photo as the embedding pass saw it (after EXIF rotation); faces left to right."""

    height: int
    width: int
    difference_hash: np.ndarray  # [64] bool
    boxes: np.ndarray  # [N,4] float32, x1 y1 x2 y2
    keypoints: np.ndarray  # [N,5,2] float32
    scores: np.ndarray  # [N] float32, detector scores
    embeddings: np.ndarray  # [N,D] float32, L2-normalised
    sharpness: np.ndarray  # [N] float32, variance of the Laplacian of the aligned crop (0..255 grey)

    def __len__(self) -> int:
        return len(self.scores)

    def face_sides(self) -> np.ndarray:
        """The short side of each face box in pixels: the face's size."""
        return np.minimum(self.boxes[:, 2] - self.boxes[:, 0], self.boxes[:, 3] - self.boxes[:, 1])


def difference_hash(image: np.ndarray) -> np.ndarray:
    """64-bit dHash: is each pixel of a 9x8 grey thumbnail brighter than its right neighbour."""
    grey = np.asarray(Image.fromarray(image).convert("L").resize((HASH_SIDE + 1, HASH_SIDE), Image.LANCZOS),
                      dtype=np.float32)
    return (grey[:, 1:] > grey[:, :-1]).reshape(-1)


def sharpness(crops: np.ndarray) -> np.ndarray:
    """Variance of the Laplacian of grey crops [F,112,112] in 0..255: low means blurred."""
    return np.array([laplace(crop).var() for crop in crops], np.float32)


def frontalness(keypoints: np.ndarray) -> np.ndarray:
    """Per face, 1 for a frontal face down to 0 for a profile: how evenly the nose sits between the eyes
    and between the mouth corners (the shorter distance over the longer, averaged)."""
    eyes = np.linalg.norm(keypoints[:, [0, 1]] - keypoints[:, None, 2], axis=-1)
    mouth = np.linalg.norm(keypoints[:, [3, 4]] - keypoints[:, None, 2], axis=-1)
    ratios = [pair.min(axis=1) / np.maximum(pair.max(axis=1), 1e-6) for pair in (eyes, mouth)]
    return ((ratios[0] + ratios[1]) / 2).astype(np.float32)


def analyse_photos(face_model: FaceModel, images: list[np.ndarray]) -> list[PhotoFaces]:
    """Detect and embed the faces of several photos (all faces embedded as one batch) and measure them."""
    results = []
    for image, analysed in zip(images, face_model.analyse(images)):
        faces = analysed.faces
        order = np.argsort((faces.boxes[:, 0] + faces.boxes[:, 2]) / 2, kind="stable")  # left to right
        faces = faces.select(order)
        crops = align_faces(float_image(image), faces.keypoints).numpy()
        grey = (crops * np.array([0.299, 0.587, 0.114], np.float32)[None, :, None, None]).sum(axis=1) * 255.0
        results.append(PhotoFaces(
            height=image.shape[0], width=image.shape[1], difference_hash=difference_hash(image),
            boxes=faces.boxes.astype(np.float32), keypoints=faces.keypoints.astype(np.float32),
            scores=faces.scores.astype(np.float32),
            embeddings=analysed.embeddings.numpy().astype(np.float32)[order],
            sharpness=sharpness(grey)))
    return results
