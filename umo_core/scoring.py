"""Scoring and ranking candidate images against reference identities (no gradient).

Used by the `score` command and the rerank / report nodes; the numbers come from the same
matching code the reward uses.
"""

from __future__ import annotations

from dataclasses import dataclass

from .detection import Faces
from .face_model import FaceModel, Identities
from .images import ImageLike
from .metrics import identity_metrics

CRITERIA = ("mimr", "id_sim", "id_conf")


@dataclass
class ImageScore:
    faces: Faces
    similarity: list[list[float]]  # one row per reference
    assignment: list[int | None]  # face index per reference
    metrics: dict

    def faces_json(self) -> list[dict]:
        return [{"bbox": box, "kps": kps, "det_score": score} for box, kps, score in
                zip(self.faces.boxes.tolist(), self.faces.keypoints.tolist(), self.faces.scores.tolist())]


def score_images(face_model: FaceModel, identities: Identities, images: list[ImageLike],
                 ground_truth: ImageLike | None = None) -> list[ImageScore]:
    """Metrics of every image; `ground_truth` is an optional photo of the same people."""
    gt_embeddings = face_model.analyse([ground_truth])[0].embeddings if ground_truth is not None else None
    scores = []
    for analysed in face_model.analyse(images):
        result = identity_metrics(identities.embeddings, analysed.embeddings, gt_embeddings)
        scores.append(ImageScore(analysed.faces, result["similarity"], result["assignment"], result["metrics"]))
    return scores


def rank(scores: list[ImageScore], criterion: str = "mimr") -> list[int]:
    """Image indices, best first by `criterion`; undefined values last, ties in input order."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, not {criterion!r}")

    def key(index: int) -> tuple[bool, float]:
        value = scores[index].metrics[criterion]
        return (value is None, -(value or 0.0))

    return sorted(range(len(scores)), key=key)
