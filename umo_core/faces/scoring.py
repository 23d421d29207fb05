"""Scoring and ranking candidate images against reference identities (no gradient).

Used by the `score` command and the rerank / report nodes; the numbers come from the same
matching code the reward uses. A matched face whose cosine is below the face network's
same-person threshold (`FaceModel.same_person_threshold`) is "doubtful": it is marked with
DOUBTFUL_MARK in labels and tables, and the metrics count it as they always did.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..images import ImageLike
from .detection import Faces
from .face_model import FaceModel, Identities
from .metrics import identity_metrics

CRITERIA = ("mimr", "id_sim", "id_conf")
DEFAULT_CRITERION = "mimr"  # never null: 0 for an image without faces
DOUBTFUL_MARK = "?"


@dataclass
class ImageScore:
    faces: Faces
    similarity: list[list[float]]  # one row per reference
    assignment: list[int | None]  # face index per reference
    metrics: dict
    same_person_threshold: float  # of the face network that made the embeddings

    def is_doubtful(self, reference: int) -> bool:
        """Reference `reference` was matched to a face below the same-person threshold."""
        face = self.assignment[reference]
        return face is not None and self.similarity[reference][face] < self.same_person_threshold

    def match_text(self, reference: int, with_face: bool = True) -> str:
        """'R1->face 2 0.63' ('R1->face 2 0.05?' when doubtful, 'R1->none' unmatched); 'R1 0.63' without the face."""
        face = self.assignment[reference]
        if face is None:
            return f"R{reference + 1}->none"
        where = f"->face {face + 1}" if with_face else ""
        mark = DOUBTFUL_MARK if self.is_doubtful(reference) else ""
        return f"R{reference + 1}{where} {self.similarity[reference][face]:.2f}{mark}"

    def faces_json(self) -> list[dict]:
        return [{"bbox": box, "kps": kps, "det_score": score} for box, kps, score in
                zip(self.faces.boxes.tolist(), self.faces.keypoints.tolist(), self.faces.scores.tolist())]

    def matches_json(self) -> list[dict]:
        """The matched pairs (0-based indices), each with its cosine and whether it is doubtful."""
        return [{"reference": k, "face": j, "similarity": self.similarity[k][j], "doubtful": self.is_doubtful(k)}
                for k, j in enumerate(self.assignment) if j is not None]


def ground_truth_embeddings(face_model: FaceModel, ground_truth: ImageLike) -> torch.Tensor:
    """The faces of a ground-truth photo of the same people, embedded [T,D] (T = 0 when it shows none)."""
    return face_model.analyse([ground_truth])[0].embeddings


def score_image(face_model: FaceModel, identities: Identities, image: ImageLike,
                gt_embeddings: torch.Tensor | None = None) -> ImageScore:
    """One image's metrics; `gt_embeddings` from `ground_truth_embeddings` for Sim(GT) and CP."""
    analysed = face_model.analyse([image])[0]
    result = identity_metrics(identities.embeddings, analysed.embeddings, gt_embeddings)
    return ImageScore(analysed.faces, result["similarity"], result["assignment"], result["metrics"],
                      face_model.same_person_threshold)


def score_images(face_model: FaceModel, identities: Identities, images: list[ImageLike],
                 ground_truth: ImageLike | None = None) -> list[ImageScore]:
    """Metrics of every image; `ground_truth` is an optional photo of the same people."""
    gt_embeddings = ground_truth_embeddings(face_model, ground_truth) if ground_truth is not None else None
    return [score_image(face_model, identities, image, gt_embeddings) for image in images]


def rank(scores: list[ImageScore], criterion: str = "mimr") -> list[int]:
    """Image indices, best first by `criterion`; undefined values last, ties in input order."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, not {criterion!r}")

    def key(index: int) -> tuple[bool, float]:
        value = scores[index].metrics[criterion]
        return (value is None, -(value or 0.0))

    return sorted(range(len(scores)), key=key)


def format_value(value: float | None) -> str:
    return "null" if value is None else f"{value:.3f}"


def score_table(scores: list[ImageScore], order: list[int], names: list[str]) -> list[str]:
    """Aligned text rows, one per image in `order`: its name, faces, the metrics and each reference's match,
    then a line explaining DOUBTFUL_MARK when a doubtful match is shown. `names[i]` names image i."""
    metric_names = list(scores[order[0]].metrics)
    rows = [["rank", "image", "faces", *metric_names, "matches"]]
    for place, index in enumerate(order, 1):
        score = scores[index]
        matches = ", ".join(score.match_text(k) for k in range(len(score.assignment)))
        rows.append([str(place), names[index], str(len(score.faces)),
                     *(format_value(score.metrics[name]) for name in metric_names), matches])
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    doubtful = [scores[i] for i in order if any(scores[i].is_doubtful(k) for k in range(len(scores[i].assignment)))]
    if doubtful:
        lines.append(f"{DOUBTFUL_MARK} = doubtful match: cosine below {doubtful[0].same_person_threshold:.2f}, "
                     "this face network's same-person threshold (probably not that person)")
    return lines
