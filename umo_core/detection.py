"""Face detection: SCRFD boxes, five keypoints and scores, at several scales.

Reference photos are often tight head-shots whose face fills the frame: SCRFD's anchors
only cover them when the image is shrunk (the 128 pass). Generated group scenes have
small faces: those need the 640 pass, and large images a pass near their own size.
The passes are merged with non-maximum suppression (insightface's SCRFD does that).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from insightface.model_zoo import get_model
from insightface.model_zoo.scrfd import SCRFD

from .errors import UMOError
from .face_pack import session_options

BASE_SIZES = (128, 640)
MAX_SIZE = 1280


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


def detection_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """Square SCRFD input sizes for an image: 128 and 640, and 1280 for images larger than 1280 px."""
    sizes = list(BASE_SIZES)
    long_side = max(height, width)
    if long_side > MAX_SIZE:
        sizes.append(MAX_SIZE)
    return [(s, s) for s in sizes]


class FaceDetector:
    """An SCRFD detector from an ONNX file, run by onnxruntime with the given providers."""

    def __init__(self, path: Path, providers: list[str], threshold: float = 0.5):
        try:
            model = get_model(str(path), providers=providers, sess_options=session_options())
        except Exception as error:  # onnxruntime raises its own exception types for bad graphs
            raise UMOError(f"face detector '{path}' cannot be loaded ({error}); download it again") from None
        if not isinstance(model, SCRFD):
            raise UMOError(f"'{path}' is not an SCRFD face detector")
        if not model.use_kps:
            raise UMOError(f"face detector '{path}' gives no keypoints; use an SCRFD model with keypoints "
                           "(e.g. det_10g.onnx or scrfd_10g_bnkps.onnx)")
        self.model = model
        self.threshold = threshold
        self.providers = model.session.get_providers()

    def detect(self, image: np.ndarray) -> Faces:
        """Faces in one RGB uint8 image."""
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        sizes = detection_sizes(*image.shape[:2])
        boxes, keypoints = self.model.detect(bgr, input_size=sizes, det_thresh=self.threshold)
        if len(boxes) == 0:
            return Faces.empty()
        return Faces(boxes[:, :4].astype(np.float32), keypoints.astype(np.float32), boxes[:, 4].astype(np.float32))
