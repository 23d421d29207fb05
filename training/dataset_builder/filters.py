"""The quality rules, one flag each; every rejection is counted under its reason in the report.

Per face (defaults measured on the face-assets photos, see README "Building a training set"):
- smaller than --min-face-size px (the box's short side) or detector score below --min-score: background
  or not a face; ignored (never a person of a row, never a reference, it does not block its photo);
- sharpness below --min-sharpness (variance of the Laplacian of the aligned 112x112 crop: sharp photo
  faces measure 80-400, a Gaussian blur of 2 px on a 224 px face ~30, of 4 px ~10) or a box closer to
  the photo border than --border-margin times the face's size (the face is cut off): the face cannot
  be identified or used as a reference, and a photo showing it is no target (someone unreferenced).
Per photo: a near-duplicate of a photo earlier in name order (--duplicate-bits: Hamming distance of the
64-bit difference hashes; resized or re-compressed copies measure 0-1, different photos 20 and more)
is left out entirely, so that no photo is the reference of its own copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .faces import PhotoFaces

SMALL = "smaller than --min-face-size"
LOW_SCORE = "detector score below --min-score"
BLURRY = "blurrier than --min-sharpness"
CUT = "cut by the photo border (--border-margin)"
DUPLICATE = "near-duplicate of an earlier photo (--duplicate-bits)"
IGNORED = (SMALL, LOW_SCORE)  # these faces are background: they do not block their photo

DEFAULT_MIN_FACE_SIZE = 64
DEFAULT_MIN_SCORE = 0.6
DEFAULT_MIN_SHARPNESS = 20.0
DEFAULT_BORDER_MARGIN = 0.05
DEFAULT_DUPLICATE_BITS = 6


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


def hash_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distance between difference hashes: a [64] against b [64] or [K,64]."""
    return (np.asarray(b) != np.asarray(a)).sum(axis=-1)


def near_duplicates(hashes: dict[str, np.ndarray], bits: int) -> dict[str, str]:
    """photo -> the earlier photo (in name order) it nearly duplicates, for every later copy."""
    if bits < 0:
        return {}
    names = sorted(hashes)
    kept_names: list[str] = []
    kept = np.zeros((len(names), *np.shape(hashes[names[0]])), bool) if names else np.zeros((0, 64), bool)
    copies = {}
    for name in names:
        if kept_names:
            distances = hash_distance(hashes[name], kept[:len(kept_names)])
            closest = int(np.argmin(distances))
            if distances[closest] <= bits:
                copies[name] = kept_names[closest]
                continue
        kept[len(kept_names)] = hashes[name]
        kept_names.append(name)
    return copies
