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
import onnxruntime
import torch
from PIL import Image
from torchvision.ops import nms

from .errors import UMOError
from .face_pack import session_options

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


def detection_sizes(height: int, width: int) -> list[int]:
    """Square SCRFD input sizes for an image: 128 and 640, and 1280 for images larger than 1280 px."""
    return [*BASE_SIZES, MAX_SIZE] if max(height, width) > MAX_SIZE else list(BASE_SIZES)


class FaceDetector:
    """An SCRFD detector (with keypoints) from an ONNX file, run by onnxruntime with the given providers."""

    def __init__(self, path: Path, providers: list[str], threshold: float = 0.5):
        try:
            self.session = onnxruntime.InferenceSession(str(path), session_options(), providers=providers)
        except Exception as error:  # onnxruntime raises its own exception types for bad graphs
            raise UMOError(f"face detector '{path}' cannot be loaded ({error}); download it again") from None
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
        resized = Image.fromarray(image).resize((max(1, int(width * scale)), max(1, int(height * scale))),
                                                Image.BILINEAR)
        canvas = np.zeros((size, size, 3), np.float32)
        canvas[: resized.height, : resized.width] = np.asarray(resized, np.float32)
        blob = ((canvas - MEAN) / STD).transpose(2, 0, 1)[None]
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
        passes = [self._detect_at(image, size) for size in detection_sizes(*image.shape[:2])]
        boxes, keypoints, scores = (np.concatenate(parts).astype(np.float32) for parts in zip(*passes))
        if len(scores) == 0:
            return Faces.empty()
        keep = nms(torch.from_numpy(boxes), torch.from_numpy(scores), NMS_IOU).numpy()
        return Faces(boxes[keep], keypoints[keep], scores[keep])
