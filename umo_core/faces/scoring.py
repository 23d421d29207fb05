"""Scoring and ranking candidate images against reference identities (no gradient).

The one scoring loop of the project: the `score` command, the rerank / report nodes and `evaluate` all
call `score_images` (each with its own `progress` callback: a terminal bar, ComfyUI's bar, progress
lines); the numbers come from the same `IdentityMatch` the reward uses.

    scores = score_images(face_model, identities, images, gt_embeddings=None, progress=None, batch_size=1)
    score.detections          # Faces: boxes, keypoints, detector scores (0-based face j = "face j+1")
    score.match               # IdentityMatch: similarity, assignment, present / missing / duplicates
    score.metrics             # match_metrics: the README's Metrics table
    score.to_json()           # faces, similarity, assignment, matches, presence and metrics, 0-based
    rank(scores, criterion)   # image indices, best first (CRITERIA; DEFAULT_CRITERION = "complete")
    image_score(identities, analysed, same_person_threshold, gt_embeddings)  # from an AnalysedImage

A matched face whose cosine is below the face network's same-person threshold
(`FaceModel.same_person_threshold`) is "doubtful": marked with DOUBTFUL_MARK in labels and tables;
that reference counts as missing. Text shown to people numbers references and faces from 1 ("R1",
"face 3"); JSON indices start at 0.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..images import ImageLike
from .detection import Faces
from .face_model import AnalysedImage, FaceModel, Identities
from .matching import IdentityMatch, match_identities
from .metrics import match_metrics

DEFAULT_CRITERION = "complete"
CRITERIA = ("complete", "mimr", "id_sim", "id_conf")
DOUBTFUL_MARK = "?"

Progress = Callable[["ImageScore"], None]  # called once per scored image, in order


@dataclass
class ImageScore:
    """One image's detected faces, their match to the references and the metrics."""

    detections: Faces
    match: IdentityMatch
    metrics: dict

    def reference_text(self, reference: int) -> str:
        """'R1->face 2 0.63', 'R2 missing' (no face) or 'R2 missing (face 1 0.05?)' (a doubtful match)."""
        face, name = self.match.assignment[reference], f"R{reference + 1}"
        if face is None:
            return f"{name} missing"
        pair = f"face {face + 1} {self.match.cosines[reference][face]:.2f}"
        return f"{name} missing ({pair}{DOUBTFUL_MARK})" if self.match.is_doubtful(reference) else f"{name}->{pair}"

    def people_text(self) -> str:
        """Every reference's `reference_text`, then each duplicate: 'R1->face 2 0.63, R2 missing, R1 again->face 3
        0.61'."""
        texts = [self.reference_text(k) for k in range(self.match.reference_count)]
        texts += [f"R{k + 1} again->face {j + 1} {self.match.cosines[k][j]:.2f}"
                  for j, k in sorted(self.match.duplicates.items())]
        return ", ".join(texts)

    def face_label(self, face: int) -> str:
        """The label of face `face` in the picture, numbered as in the table: '2: R1 0.63', '1: R2 0.05?'
        (doubtful), '3: R1 again 0.61' (a duplicate), '4' (a bystander)."""
        role = self.match.face_role(face)
        number = str(face + 1)
        if role.kind == "bystander":
            return number
        again = " again" if role.kind == "duplicate" else ""
        mark = DOUBTFUL_MARK if role.kind == "doubtful" else ""
        return f"{number}: R{role.reference + 1}{again} {role.similarity:.2f}{mark}"

    def faces_json(self) -> list[dict]:
        return [{"bbox": box, "kps": kps, "det_score": score} for box, kps, score in
                zip(self.detections.boxes.tolist(), self.detections.keypoints.tolist(),
                    self.detections.scores.tolist())]

    def to_json(self) -> dict:
        """`faces` (`bbox`, `kps`, `det_score`), the match's `IdentityMatch.to_json` keys and `metrics`; every
        reference and face index 0-based."""
        return {"faces": self.faces_json(), **self.match.to_json(), "metrics": self.metrics}


def image_score(identities: Identities, analysed: AnalysedImage, same_person_threshold: float,
                gt_embeddings: torch.Tensor | None = None) -> ImageScore:
    """The score of one analysed image (its faces and their embeddings), e.g. from a cache of embeddings."""
    match = match_identities(identities.embeddings, analysed.embeddings, same_person_threshold)
    return ImageScore(analysed.faces, match, match_metrics(match, gt_embeddings))


def ground_truth_embeddings(face_model: FaceModel, ground_truth: ImageLike) -> torch.Tensor:
    """The faces of a ground-truth photo of the same people, embedded [T,D] (T = 0 when it shows none)."""
    return face_model.analyse([ground_truth])[0].embeddings


def score_images(face_model: FaceModel, identities: Identities, images: Iterable[ImageLike],
                 gt_embeddings: torch.Tensor | None = None, progress: Progress | None = None,
                 batch_size: int = 1) -> list[ImageScore]:
    """The score of every image, in order.

    `images` may be lazy (a generator that loads each file when it is reached): at most `batch_size` images
    are held at a time, and their faces are embedded in one recogniser call. `gt_embeddings`
    (`ground_truth_embeddings`) enables Sim(GT) and CP. `progress(score)` runs after each image (a
    progress bar; in ComfyUI it also lets Cancel stop between images).
    """
    scores = []
    iterator = iter(images)
    while chunk := list(itertools.islice(iterator, batch_size)):
        for analysed in face_model.analyse(chunk):
            scores.append(image_score(identities, analysed, face_model.same_person_threshold, gt_embeddings))
            if progress is not None:
                progress(scores[-1])
    return scores


def score_image(face_model: FaceModel, identities: Identities, image: ImageLike,
                gt_embeddings: torch.Tensor | None = None) -> ImageScore:
    """One image's score (`score_images` of one image)."""
    return score_images(face_model, identities, [image], gt_embeddings)[0]


def _descending(value: float | None) -> tuple[bool, float]:
    """A sort key part: larger values first, undefined (None) last."""
    return (value is None, -(value or 0.0))


def ranking_key(metrics: dict, criterion: str = DEFAULT_CRITERION) -> tuple:
    """The sort key of one image's metrics under `criterion` (smaller sorts first).

    "complete": more references present first, then fewer duplicates, then the higher `present_sim`
    (the present references' mean matched cosine), then the higher `mimr`; so an image with every
    reference present once ranks above any image that misses one or shows one twice, whatever its
    bystanders. "mimr", "id_sim", "id_conf": that metric, higher first. Undefined values sort last.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, not {criterion!r}")
    if criterion == "complete":
        return (-metrics["coverage"], metrics["duplicates"], *_descending(metrics["present_sim"]),
                *_descending(metrics["mimr"]))
    return _descending(metrics[criterion])


def rank(scores: list[ImageScore], criterion: str = DEFAULT_CRITERION) -> list[int]:
    """Image indices, best first by `criterion` (`ranking_key`); ties in input order."""
    return sorted(range(len(scores)), key=lambda index: ranking_key(scores[index].metrics, criterion))


def format_value(value: float | None) -> str:
    if value is None:
        return "null"
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def score_table(scores: list[ImageScore], ranking: list[int], names: list[str],
                rows: list[int] | None = None) -> list[str]:
    """Aligned text rows: a header, then one row per image in `rows` (default: `ranking`, best first) with its
    rank, name (`names[i]` names image i), face count, numeric metrics and its people (`people_text`: who is
    matched, missing or shown again); then a line explaining DOUBTFUL_MARK when a doubtful match is shown."""
    rows = ranking if rows is None else rows
    place = {index: position for position, index in enumerate(ranking, 1)}
    metric_names = [name for name, value in scores[rows[0]].metrics.items()
                    if name != "faces" and not isinstance(value, list)]
    table = [["rank", "image", "faces", *metric_names, "people"]]
    for index in rows:
        score = scores[index]
        table.append([str(place[index]), names[index], str(len(score.detections)),
                      *(format_value(score.metrics[name]) for name in metric_names), score.people_text()])
    widths = [max(len(row[column]) for row in table) for column in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table]
    doubtful = [scores[i] for i in rows if any(scores[i].match.is_doubtful(k) for k in scores[i].match.missing)]
    if doubtful:
        lines.append(f"{DOUBTFUL_MARK} = doubtful match: cosine below {doubtful[0].match.same_person_threshold:.2f}, "
                     "this face network's same-person threshold (probably not that person)")
    return lines
