"""The quality rules, one flag each; every rejection is counted under its reason in the report.

Per face (defaults measured on the face-assets photos, see README "Building a training set"):
- smaller than --min-face-size px (the box's short side) or detector score below --min-score: background
  or not a face; ignored (never a person of a row, never a reference, it does not block its photo);
- sharpness below --min-sharpness (variance of the Laplacian of the face box scaled to 112x112 grey: sharp
  photo faces measure 50-200, a Gaussian blur of 2 px on a 224 px face 16-29, of 4 px 6-7) or a box closer to
  the photo border than --border-margin times the face's size (the face is cut off): the face cannot
  be identified or used as a reference, and a photo showing it is no target (someone unreferenced).
Per photo: a near-duplicate of a photo earlier in name order is left out entirely, so that no photo is the
reference of its own copy. Near-duplicates have 64-bit difference hashes at most --duplicate-bits apart
(resized or re-compressed copies measure 0-1, different photos mostly 20 and more, but photos on one plain
backdrop come close) and the same faces (as many, each pair DUPLICATE_FACE_SIMILARITY alike).
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


def is_near_duplicate(a: PhotoFaces, b: PhotoFaces, bits: int) -> bool:
    """Difference hashes at most `bits` apart and the same faces: as many, and left to right each at least
    DUPLICATE_FACE_SIMILARITY alike (the hash alone takes two portraits on one plain backdrop for copies)."""
    if int((a.difference_hash != b.difference_hash).sum()) > bits or len(a) != len(b):
        return False
    return bool(np.all(np.sum(a.embeddings * b.embeddings, axis=1) >= DUPLICATE_FACE_SIMILARITY))


def near_duplicates(photos: dict[str, PhotoFaces], bits: int) -> dict[str, str]:
    """photo -> the earlier photo (in name order) it nearly duplicates, for every later copy."""
    if bits < 0:
        return {}
    names = sorted(photos)
    kept_names: list[str] = []
    kept = np.zeros((len(names), HASH_BITS), bool)
    copies = {}
    for name in names:
        distances = (kept[:len(kept_names)] != photos[name].difference_hash).sum(axis=1)
        original = next((kept_names[i] for i in np.flatnonzero(distances <= bits)
                         if is_near_duplicate(photos[name], photos[kept_names[i]], bits)), None)
        if original is not None:
            copies[name] = original
            continue
        kept[len(kept_names)] = photos[name].difference_hash
        kept_names.append(name)
    return copies
