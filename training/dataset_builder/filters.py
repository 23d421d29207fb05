"""The quality rules, one flag each; every rejection is counted under its reason in the report.

Per face (defaults measured on the face-assets photos, see README "Building a training set"):
- smaller than --min-face-size px (the box's short side) or detector score below --min-score: background
  or not a face; ignored (never a person of a row, never a reference, it does not block its photo);
- sharpness below --min-sharpness (variance of the Laplacian of the face box scaled to 112x112 grey: sharp
  photo faces measure 50-200, a Gaussian blur of 2 px on a 224 px face 16-29, of 4 px 6-7) or a box closer to
  the photo border than --border-margin times the face's size (the face is cut off): the face cannot
  be identified or used as a reference, and a photo showing it is no target (someone unreferenced).
Per photo: a near-duplicate of a photo earlier in name order is left out entirely, so that no photo is the
reference of its own copy. Near-duplicates show as many faces and either
- have 64-bit difference hashes at most --duplicate-bits apart (resized or re-compressed copies measure 0-1,
  different photos mostly 20 and more, but photos on one plain backdrop come close) and the same faces, left to
  right each pair DUPLICATE_FACE_SIMILARITY alike; or
- show the same faces at the same size, each pair COPY_FACE_SIMILARITY alike, left to right or mirrored: a
  mirrored, padded or cropped copy, whose hash differs (measured with the face-assets MobileFaceNet: such copies
  0.946-0.983, other photos of one person 0.72-0.83, at most 0.9).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .faces import HASH_BITS, PhotoFaces

SMALL = "smaller than --min-face-size"
LOW_SCORE = "detector score below --min-score"
BLURRY = "blurrier than --min-sharpness"
CUT = "cut by the photo border (--border-margin)"
DUPLICATE = "near-duplicate of an earlier photo (--duplicate-bits)"
IGNORED = (SMALL, LOW_SCORE)  # these faces are background: they do not block their photo

DEFAULT_MIN_FACE_SIZE = 64
DEFAULT_MIN_SCORE = 0.6
DEFAULT_MIN_SHARPNESS = 15.0
DEFAULT_BORDER_MARGIN = 0.05
DEFAULT_DUPLICATE_BITS = 6
DUPLICATE_FACE_SIMILARITY = 0.9  # a re-saved copy's faces measure 0.97 and more, other photos of a person 0.4-0.8
COPY_FACE_SIMILARITY = 0.93  # mirrored or padded copies (see above)
COPY_SIZE_RATIO = 0.85  # a copy's faces: the smaller face box side at least this fraction of the larger
MAX_DUPLICATE_BITS = HASH_BITS // 4  # unrelated photos differ in about half of the bits


@dataclass(frozen=True)
class QualityFilters:
    min_face_size: float = DEFAULT_MIN_FACE_SIZE  # px
    min_score: float = DEFAULT_MIN_SCORE
    min_sharpness: float = DEFAULT_MIN_SHARPNESS
    border_margin: float = DEFAULT_BORDER_MARGIN  # fraction of the face size; negative: keep cut faces
    duplicate_bits: int = DEFAULT_DUPLICATE_BITS  # negative: keep near-duplicates


def face_problems(faces: PhotoFaces, filters: QualityFilters) -> list[str | None]:
    """Per face, the first rule it breaks (in the order above), or None for a usable face."""
    sides = faces.face_sides()
    margins = np.minimum.reduce([faces.boxes[:, 0], faces.boxes[:, 1], faces.width - faces.boxes[:, 2],
                                 faces.height - faces.boxes[:, 3]])
    problems: list[str | None] = []
    for side, score, sharpness, margin in zip(sides, faces.scores, faces.sharpness, margins):
        if side < filters.min_face_size:
            problems.append(SMALL)
        elif score < filters.min_score:
            problems.append(LOW_SCORE)
        elif sharpness < filters.min_sharpness:
            problems.append(BLURRY)
        elif filters.border_margin >= 0 and margin < filters.border_margin * side:
            problems.append(CUT)
        else:
            problems.append(None)
    return problems


def _faces_alike(a: PhotoFaces, b: PhotoFaces, similarity: float, mirrored: bool = False) -> bool:
    """Face i of `a` (left to right) and face i of `b` (right to left when mirrored) at least `similarity` alike."""
    other = b.embeddings[::-1] if mirrored else b.embeddings
    return bool(np.all(np.sum(a.embeddings * other, axis=1) >= similarity))


def _same_sizes(a: PhotoFaces, b: PhotoFaces, mirrored: bool) -> bool:
    sides_a, sides_b = a.face_sides(), b.face_sides()[::-1] if mirrored else b.face_sides()
    return bool(np.all(np.minimum(sides_a, sides_b) >= COPY_SIZE_RATIO * np.maximum(sides_a, sides_b)))


def is_near_duplicate(a: PhotoFaces, b: PhotoFaces, bits: int) -> bool:
    """The two photos are copies of one photo (see above): as many faces, and close hashes with the same faces, or
    the same faces at the same size, also mirrored (the hash alone takes two portraits on one plain backdrop for
    copies, and misses mirrored or padded ones)."""
    if len(a) != len(b):
        return False
    if int((a.difference_hash != b.difference_hash).sum()) <= bits and _faces_alike(a, b, DUPLICATE_FACE_SIMILARITY):
        return True
    return len(a) > 0 and any(_faces_alike(a, b, COPY_FACE_SIMILARITY, mirrored) and _same_sizes(a, b, mirrored)
                              for mirrored in (False, True))


def near_duplicates(photos: dict[str, PhotoFaces], bits: int) -> dict[str, str]:
    """photo -> the earlier photo (in name order) it nearly duplicates, for every later copy."""
    if bits < 0:
        return {}
    names = sorted(photos)
    width = next((len(faces.embeddings[0]) for faces in photos.values() if len(faces)), 1)
    kept_names: list[str] = []
    kept = np.zeros((len(names), HASH_BITS), bool)
    # Each kept photo's leftmost and rightmost face (zero without faces): a copy's first face is one of them.
    ends = np.zeros((2, len(names), width), np.float32)
    copies = {}
    for name in names:
        photo = photos[name]
        count = len(kept_names)
        near = (kept[:count] != photo.difference_hash).sum(axis=1) <= bits
        if len(photo):
            near |= np.any(ends[:, :count] @ photo.embeddings[0] >= COPY_FACE_SIMILARITY, axis=0)
        original = next((kept_names[i] for i in np.flatnonzero(near)
                         if is_near_duplicate(photo, photos[kept_names[i]], bits)), None)
        if original is not None:
            copies[name] = original
            continue
        kept[count] = photo.difference_hash
        if len(photo):
            ends[:, count] = photo.embeddings[[0, -1]]
        kept_names.append(name)
    return copies
