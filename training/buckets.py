"""Aspect-ratio buckets and the resumable, seeded order of training batches.

A target is trained at about `resolution**2` pixels in the bucket whose aspect ratio is nearest
its own (resized to cover the bucket, then centre-cropped), so portrait and landscape photos are
not squashed or cut to squares. A batch holds samples of one shape: the same bucket, the same
reference sizes after the backbone's reference rule and the same text length, as the transformer takes one
sequence layout per batch.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image

from umo_core.backbones.references import centre_corner, cover_shape, nearest_multiple, resize_and_crop
from umo_core.backbones.text_embedding import text_embedding_shapes
from umo_core.faces.detection import Faces
from umo_core.faces.face_model import AnalysedImage

# width / height, from tall to wide: the usual photo formats.
ASPECT_RATIOS = (1 / 2, 9 / 16, 2 / 3, 3 / 4, 1, 4 / 3, 3 / 2, 16 / 9, 2)


def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    """(height, width) of each bucket: about resolution**2 pixels, sides multiples of 16."""
    return [(nearest_multiple(resolution / math.sqrt(ratio)), nearest_multiple(resolution * math.sqrt(ratio)))
            for ratio in ASPECT_RATIOS]


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log scale) to height x width."""
    return min(buckets, key=lambda size: abs(math.log((size[1] / size[0]) / (width / height))))


def fit_to_bucket(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """RGB uint8 [H,W,3] -> float [h,w,3] in 0..1: scaled to cover the bucket (LANCZOS), centre-cropped."""
    return resize_and_crop(image, cover_shape(image.shape[:2], size), size)


def fit_faces_to_bucket(analysed: AnalysedImage, image_hw: tuple[int, int], size: tuple[int, int]) -> AnalysedImage:
    """Faces found on an image of image_hw, in the pixels of its `fit_to_bucket` copy; a face with a keypoint
    outside the crop is left out (the bucket shows it cut). The embeddings stay those of the full photo."""
    scaled_h, scaled_w = cover_shape(image_hw, size)
    left, top = centre_corner((scaled_h, scaled_w), size)
    scale = np.array([scaled_w / image_hw[1], scaled_h / image_hw[0]], np.float32)
    corner = np.array([left, top], np.float32)
    faces = analysed.faces
    # Pixel centres at integers, as in the detector's output and PIL's resize.
    keypoints = (faces.keypoints + 0.5) * scale - 0.5 - corner
    boxes = ((faces.boxes.reshape(-1, 2, 2) + 0.5) * scale - 0.5 - corner).reshape(-1, 4)
    inside = ((keypoints >= 0) & (keypoints <= np.array([size[1] - 1, size[0] - 1]))).all(axis=(1, 2))
    return AnalysedImage(Faces(boxes[inside], keypoints[inside], faces.scores[inside]),
                         analysed.embeddings[torch.from_numpy(inside)])


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) as load_image will see it (EXIF rotation applied), reading only the header."""
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8):  # rotated by 90 degrees
            width, height = height, width
    return height, width


def shape_key(backbone, target: Path, references: list[Path], text_embedding: Path, resolution: int) -> tuple:
    """What must be equal for two samples to share a batch (the references' sizes by `backbone`'s rule)."""
    bucket = nearest_bucket(*image_size(target), bucket_sizes(resolution))
    reference_shapes = tuple(backbone.reference_shape(*image_size(p), len(references)) for p in references)
    text_length = text_embedding_shapes(text_embedding)[0][0]
    return bucket, reference_shapes, text_length


class BatchOrder:
    """Batches of same-shape samples in a seeded order per epoch, the same on every process.

    Process r of n takes batches r, r + n, r + 2n, ... of the epoch's list (wrapping around when
    the list is shorter), so each process sees other samples. The order depends only on the
    seed and the epoch, so (epoch, position) is all a resume needs.
    """

    def __init__(self, keys: list, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1):
        self.groups = defaultdict(list)
        for index, key in enumerate(keys):
            self.groups[key].append(index)
        self.batch_size, self.seed = batch_size, seed
        self.process_index, self.process_count = process_index, process_count
        self.epoch, self.position = 0, 0
        self.batches = self._epoch_batches()

    def _epoch_batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        batches = []
        for key in sorted(self.groups, key=repr):
            members = self.groups[key]
            shuffled = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
            batches += [shuffled[i:i + self.batch_size] for i in range(0, len(shuffled), self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.batches) / self.process_count)

    def next_batch(self) -> list[int]:
        if self.position >= self.steps_per_epoch():
            self.epoch, self.position = self.epoch + 1, 0
            self.batches = self._epoch_batches()
        batch = self.batches[(self.position * self.process_count + self.process_index) % len(self.batches)]
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self.batches = self._epoch_batches()
