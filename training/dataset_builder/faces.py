"""What the builder knows about each photo's faces, and the measures it takes of them.

Detection and embedding are umo_core's `FaceModel.analyse` (the library's one face path); this module
adds what choosing references and filtering need: each face's sharpness (variance of the Laplacian of
its box scaled to 112x112 grey, so faces of any size are measured on the same scale), its frontalness
(how symmetric the keypoints are) and a perceptual hash of the whole photo for near-duplicates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy.ndimage import laplace

from umo_core import FaceModel

HASH_SIDE = 8  # difference hash of an 8x8 grid
HASH_BITS = HASH_SIDE * HASH_SIDE
SHARPNESS_SIDE = 112  # the face box is measured at the size of an aligned face crop


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
    sharpness: np.ndarray  # [N] float32, variance of the Laplacian of the face (see face_sharpness)

    def __len__(self) -> int:
        return len(self.scores)

    def face_sides(self) -> np.ndarray:
        """The short side of each face box in pixels: the face's size."""
        return np.minimum(self.boxes[:, 2] - self.boxes[:, 0], self.boxes[:, 3] - self.boxes[:, 1])


def difference_hash(image: Image.Image) -> np.ndarray:
    """64-bit dHash: is each cell of a 9x8 grey thumbnail brighter than its right neighbour."""
    grey = np.asarray(image.convert("L").resize((HASH_SIDE + 1, HASH_SIDE), Image.BOX), dtype=np.float32)
    return (grey[:, 1:] > grey[:, :-1]).reshape(-1)


def face_sharpness(image: Image.Image, boxes: np.ndarray) -> np.ndarray:
    """Per face, the variance of the Laplacian of its box scaled to 112x112 grey (0..255): low means blurred."""
    values = []
    for x1, y1, x2, y2 in boxes:
        face = image.crop((int(x1), int(y1), int(np.ceil(x2)), int(np.ceil(y2))))
        grey = face.convert("L").resize((SHARPNESS_SIDE, SHARPNESS_SIDE), Image.BILINEAR)
        values.append(laplace(np.asarray(grey, np.float32)).var())
    return np.array(values, np.float32)


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
        order = np.argsort((analysed.faces.boxes[:, 0] + analysed.faces.boxes[:, 2]) / 2, kind="stable")
        faces = analysed.faces.select(order)  # left to right
        picture = Image.fromarray(image)
        results.append(PhotoFaces(
            height=image.shape[0], width=image.shape[1], difference_hash=difference_hash(picture),
            boxes=faces.boxes.astype(np.float32), keypoints=faces.keypoints.astype(np.float32),
            scores=faces.scores.astype(np.float32), embeddings=analysed.embeddings.numpy().astype(np.float32)[order],
            sharpness=face_sharpness(picture, faces.boxes)))
    return results
