"""Face detection: SCRFD boxes, five keypoints and scores, at several scales.

Reference photos are often tight head-shots whose face fills the frame: SCRFD's anchors
only cover them when the image is shrunk (the 128 pass). Generated group scenes have
small faces: those need the 640 pass, and large images a pass near their own size.
The passes are merged with non-maximum suppression.

SCRFD's decoding (anchor centres per stride, distances to box sides and keypoints) follows
insightface's `model_zoo/scrfd.py`; it lives here so the pack does not need the insightface
package at run time (insightface pins the CPU `onnxruntime`, which clashes with `onnxruntime-gpu`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UMOError
from .face_pack import onnx_session

BASE_SIZES = (128, 640)
MAX_SIZE = 1280
NMS_IOU = 0.4
MEAN, STD = 127.5, 128.0
# Output layouts of SCRFD exports with keypoints: 9 outputs = 3 strides x (scores, boxes, keypoints)
# with 2 anchors per cell; 15 outputs = 5 strides with 1 anchor.
LAYOUTS = {9: ((8, 16, 32), 2), 15: ((8, 16, 32, 64, 128), 1)}


@dataclass
class Faces:
    """The faces found in one image, best score first."""

    boxes: np.ndarray  # [N,4] float32, x1 y1 x2 y2 in pixels
    keypoints: np.ndarray  # [N,5,2] float32: left eye, right eye, nose, left mouth, right mouth
    scores: np.ndarray  # [N] float32

    def __len__(self) -> int:
        return len(self.scores)

    def areas(self) -> np.ndarray:
        return (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])

    def select(self, index) -> Faces:
        return Faces(self.boxes[index], self.keypoints[index], self.scores[index])

    @staticmethod
    def empty() -> Faces:
        return Faces(np.zeros((0, 4), np.float32), np.zeros((0, 5, 2), np.float32), np.zeros(0, np.float32))


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression, the same as `torchvision.ops.nms` (which the tests compare it with).

    Indices of the kept boxes [N,4] (x1 y1 x2 y2), best score first; a box goes when its IoU with a
    kept one is above the threshold. Not torchvision's own: any torchvision import loads
    `torchvision.ops.roi_align`, which imports torch._dynamo, about 2.5 s of every start.
    """
    order = np.argsort(-scores, kind="stable")  # torchvision sorts stably too: ties keep their order
    keep = []
    while len(order):
        best, rest = order[0], order[1:]
        keep.append(best)
        overlap = box_iou(boxes[best], boxes[rest])  # NaN (two empty boxes) is not above the threshold: kept
        order = rest[~(overlap > np.float64(iou_threshold))]  # compared in double, as torchvision's kernel does
    return np.asarray(keep, dtype=np.int64)


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of one box [4] (x1 y1 x2 y2) with each of `boxes` [N,4], in their dtype; NaN where
    both boxes are empty (0/0)."""
    top_left = np.maximum(box[:2], boxes[:, :2])
    bottom_right = np.minimum(box[2:], boxes[:, 2:])
    sides = np.maximum(bottom_right - top_left, 0)
    inter = sides[:, 0] * sides[:, 1]
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    with np.errstate(invalid="ignore"):
        return inter / (area + areas - inter)


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """An RGB uint8 image [H,W,3] (C-contiguous, writable) resized to [3,height,width] uint8, bilinear with
    antialiasing.

    PIL's BILINEAR filter, rounding aside (at most 1 apart, on under 0.5 % of the values), from torch's uint8
    kernel: 3x (640 px from a 250 px photo) to 6x (from 4000 px) faster than PIL, on the calling thread only,
    so it takes no cores from onnxruntime's workers.
    """
    pixels = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)  # a channels-last view, torch's fast layout
    return F.interpolate(pixels, size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0].numpy()


def detection_sizes(height: int, width: int) -> list[int]:
    """Square SCRFD input sizes for an image: 128 and 640, and 1280 for images larger than 1280 px."""
    return [*BASE_SIZES, MAX_SIZE] if max(height, width) > MAX_SIZE else list(BASE_SIZES)


class FaceDetector:
    """An SCRFD detector (with keypoints) from an ONNX file, run by onnxruntime with the given providers."""

    def __init__(self, path: Path, providers: list[str], threshold: float = 0.5):
        self.session = onnx_session(path, providers, "face detector")
        outputs = self.session.get_outputs()
        if len(outputs) not in LAYOUTS:
            raise UMOError(f"face detector '{path}' is not an SCRFD model with keypoints (it has {len(outputs)} "
                           "outputs); use e.g. det_10g.onnx or scrfd_10g_bnkps.onnx")
        self.strides, self.anchors = LAYOUTS[len(outputs)]
        self.input_name = self.session.get_inputs()[0].name
        self.threshold = threshold
        self.providers = self.session.get_providers()
        self._centres: dict[tuple[int, int], np.ndarray] = {}

    def _anchor_centres(self, cells: int, stride: int) -> np.ndarray:
        key = (cells, stride)
        if key not in self._centres:
            ys, xs = np.mgrid[:cells, :cells]
            centres = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
            self._centres[key] = np.repeat(centres, self.anchors, axis=0)
        return self._centres[key]

    def _detect_at(self, image: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Candidates (boxes, keypoints, scores) of one pass: the image letterboxed into size x size."""
        height, width = image.shape[:2]
        scale = size / max(height, width)
        resized = resize_bilinear(image, max(1, int(height * scale)), max(1, int(width * scale)))
        # The blob [1,3,size,size] built in place: the border is a black pixel's value, the image normalised
        # straight into its corner (no float canvas; the same float32 values).
        blob = np.full((1, 3, size, size), np.float32(-MEAN / STD), np.float32)
        corner = blob[0, :, : resized.shape[1], : resized.shape[2]]
        np.subtract(resized, np.float32(MEAN), out=corner, dtype=np.float32)
        corner /= np.float32(STD)
        outputs = self.session.run(None, {self.input_name: blob})
        count = len(self.strides)
        boxes, keypoints, scores = [], [], []
        for i, stride in enumerate(self.strides):
            # Some exports keep a batch axis, some do not.
            score, box, kps = (outputs[i + k * count].reshape(-1, outputs[i + k * count].shape[-1]) for k in range(3))
            keep = score[:, 0] >= self.threshold
            centres = self._anchor_centres(size // stride, stride)[keep]
            distances = box[keep] * stride
            boxes.append(np.concatenate([centres - distances[:, :2], centres + distances[:, 2:]], axis=1))
            keypoints.append(centres[:, None, :] + kps[keep].reshape(-1, 5, 2) * stride)
            scores.append(score[keep, 0])
        return np.concatenate(boxes) / scale, np.concatenate(keypoints) / scale, np.concatenate(scores)

    def detect(self, image: np.ndarray) -> Faces:
        """Faces in one RGB uint8 image, best score first."""
        # torch.from_numpy's terms (np.asarray of a PIL image is read-only): one copy here, if any, not one per pass.
        image = np.require(image, requirements=("C", "W"))
        passes = [self._detect_at(image, size) for size in detection_sizes(*image.shape[:2])]
        boxes, keypoints, scores = (np.concatenate(parts).astype(np.float32) for parts in zip(*passes))
        if len(scores) == 0:
            return Faces.empty()
        keep = nms(boxes, scores, NMS_IOU)
        return Faces(boxes[keep], keypoints[keep], scores[keep])
