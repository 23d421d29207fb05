"""Identity face fix: re-sample each face toward the reference person it was matched to.

This is the part that needs no image generator: which faces to fix (the Hungarian match of the identity
scoring, and `only_below`), the crop window around each face with context, the crop's sampling size, the
feathered paste mask, the paste, and the before/after report (each fixed face re-detected on the result).
The re-sampling itself is a callable that the caller supplies (the ComfyUI node's encodes the crop,
conditions it on the one reference and samples it).

Only pixels inside a fixed face's window change: the paste blends inside the window and never writes
outside it, so the rest of the image stays bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UMOError
from .detection import box_iou
from .face_model import FaceModel, Identities
from .scoring import DOUBTFUL_MARK, ImageScore, score_image

# A re-detected face belongs to a fixed one when their boxes overlap at least this much (intersection over union).
SAME_FACE_IOU = 0.3


@dataclass(frozen=True)
class Window:
    """A rectangle of image pixels: rows top..bottom-1, columns left..right-1."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def width(self) -> int:
        return self.right - self.left

    def of(self, image: torch.Tensor) -> torch.Tensor:
        """The window's pixels of an image [H,W,...] (a view)."""
        return image[self.top:self.bottom, self.left:self.right]


@dataclass
class FaceFix:
    """One matched face of one image, and what the fix did to it."""

    image: int  # in the batch, from 0
    face: int  # among the image's detected faces (best detection score first), from 0
    reference: int  # the reference person it was matched to (R<reference + 1>), from 0
    before: float  # its cosine with that reference before the fix
    window: Window  # the pixels re-sampled: the face with context
    fixed: bool  # False: left as it was (its cosine is at or above only_below)
    after: float | None = None  # its cosine after, re-detected on the result; None where not fixed or not found

    @property
    def worse(self) -> bool:
        return self.after is not None and self.after < self.before


@dataclass
class ImagePlan:
    """One image of the batch: its identity score and its matched faces, in reference order."""

    score: ImageScore
    faces: list[FaceFix]

    def unmatched_faces(self) -> list[int]:
        """Faces matched to no reference (more faces than people): never touched."""
        matched = set(self.score.match.assignment)
        return [j for j in range(len(self.score.detections)) if j not in matched]

    def missing_references(self) -> list[int]:
        """References matched to no face (fewer faces than people)."""
        return [k for k, face in enumerate(self.score.match.assignment) if face is None]


# The crop at its sampling size [h,w,3] and the face it shows -> the re-sampled crop, the same shape.
Resample = Callable[[torch.Tensor, FaceFix], torch.Tensor]


def crop_window(box: np.ndarray | list[float], context: float, height: int, width: int) -> Window:
    """The pixels re-sampled for a face box (x1 y1 x2 y2): a square of the box's long side plus `context`
    times it on every side, centred on the box, clipped to the image (height x width)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    half = max(x2 - x1, y2 - y1) * (0.5 + context)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return Window(max(0, math.floor(cx - half)), max(0, math.floor(cy - half)),
                  min(width, math.ceil(cx + half)), min(height, math.ceil(cy + half)))


def guide_shape(height: int, width: int, guide_size: int, multiple: int) -> tuple[int, int]:
    """(height, width) a height x width crop is sampled at: long side `guide_size`, the aspect kept, both
    sides rounded to multiples of `multiple` (what the generator's latent needs, e.g. 16 for FLUX)."""
    scale = guide_size / max(height, width)
    return (max(multiple, round(height * scale / multiple) * multiple),
            max(multiple, round(width * scale / multiple) * multiple))


def resize(image: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """An image [H,W,3] in 0..1 resized to `shape` (height, width): bicubic, antialiased when shrinking."""
    if tuple(image.shape[:2]) == tuple(shape):
        return image
    resized = F.interpolate(image.permute(2, 0, 1)[None].float(), size=shape, mode="bicubic", antialias=True,
                            align_corners=False)
    return resized[0].permute(1, 2, 0).clamp(0, 1).to(image.dtype)


def feather_mask(window: Window, feather: int, height: int, width: int) -> torch.Tensor:
    """The paste weight over a window [h,w]: 1 inside, falling linearly over `feather` pixels toward each
    window edge that lies inside the image (at most half the window's side); an edge on the image border
    is not feathered, since no pixel lies beyond it. Every weight is above 0, and nothing outside the
    window is pasted."""

    def ramp(length: int, feather_start: bool, feather_end: bool) -> torch.Tensor:
        steps = min(feather, length // 2)
        index = torch.arange(length, dtype=torch.float32)
        weight = torch.ones(length)
        if feather_start:
            weight = torch.minimum(weight, (index + 1) / (steps + 1))
        if feather_end:
            weight = torch.minimum(weight, (length - index) / (steps + 1))
        return weight

    rows = ramp(window.height, window.top > 0, window.bottom < height)
    columns = ramp(window.width, window.left > 0, window.right < width)
    return rows[:, None] * columns[None, :]


def paste(image: torch.Tensor, patch: torch.Tensor, window: Window, mask: torch.Tensor) -> torch.Tensor:
    """A copy of `image` [H,W,3] with `patch` [h,w,3] blended into `window` by `mask` [h,w] (weight 1: the patch)."""
    pasted = image.clone()
    region = window.of(pasted)
    region.copy_(torch.lerp(region, patch.to(region), mask[..., None].to(region)))
    return pasted


def check_reference_photos(identities: Identities) -> None:
    """The face fix conditions each face on its person's photo: identities without photos cannot be used."""
    if identities.photos is None or len(identities.photos) != len(identities):
        raise UMOError("face fix: the identities carry no reference photos; make them from photos with UMO Reference "
                       "Identities (or FaceModel.identities), which keeps each person's photo")


def plan_image(score: ImageScore, index: int, height: int, width: int, context: float,
               only_below: float) -> ImagePlan:
    """The matched faces of one image, in reference order; a face is fixed when `only_below` is 0 or its
    cosine with its reference is below `only_below`."""
    faces = []
    for reference, face in enumerate(score.match.assignment):
        if face is None:
            continue
        before = score.match.cosines[reference][face]
        window = crop_window(score.detections.boxes[face], context, height, width)
        faces.append(FaceFix(index, face, reference, before, window, only_below == 0 or before < only_below))
    return ImagePlan(score, faces)


def plan_fixes(face_model: FaceModel, identities: Identities, images: torch.Tensor, context: float,
               only_below: float) -> list[ImagePlan]:
    """Score every image [B,H,W,3] against the identities and plan its fixes. It is an error when no image
    has a face matched to a reference (nothing the fix could work on), checked before any sampling."""
    check_reference_photos(identities)
    plans = [plan_image(score_image(face_model, identities, image), i, image.shape[0], image.shape[1], context,
                        only_below) for i, image in enumerate(images)]
    if not any(plan.faces for plan in plans):
        raise UMOError(f"face fix: no face was found in the {len(images)} image(s), so none is matched to a "
                       "reference person; connect the generated images (faces clearly visible)")
    return plans


def fix_image(image: torch.Tensor, plan: ImagePlan, resample: Resample, guide_size: int, feather: int,
              multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The image [H,W,3] with each planned face re-sampled and pasted back, and the paste mask [H,W].

    Faces are re-sampled one after the other on the image as fixed so far, so overlapping windows blend
    with the face fixed before them. An image with nothing to fix comes back as it was.
    """
    height, width = image.shape[:2]
    fixed, mask = image, torch.zeros(height, width)
    for face in plan.faces:
        if not face.fixed:
            continue
        window = face.window
        crop = resize(window.of(fixed), guide_shape(window.height, window.width, guide_size, multiple))
        sampled = resample(crop, face)
        weight = feather_mask(window, feather, height, width)
        fixed = paste(fixed, resize(sampled, (window.height, window.width)), window, weight)
        window.of(mask).copy_(torch.maximum(window.of(mask), weight))
    return fixed, mask


def measure_after(face_model: FaceModel, identities: Identities, fixed: torch.Tensor, plan: ImagePlan) -> None:
    """Fill in each fixed face's cosine after the fix: the face re-detected on the fixed image [H,W,3] where
    the face was (the best box overlap), against the reference it was fixed toward."""
    analysed = face_model.analyse([fixed])[0]
    for face in plan.faces:
        if not face.fixed or len(analysed.faces) == 0:
            continue
        overlap = box_iou(plan.score.detections.boxes[face.face], analysed.faces.boxes)
        found = int(np.argmax(overlap))
        if overlap[found] >= SAME_FACE_IOU:
            face.after = float(identities.embeddings[face.reference] @ analysed.embeddings[found])


def fix_faces(face_model: FaceModel, identities: Identities, images: torch.Tensor, plans: list[ImagePlan],
              resample: Resample, guide_size: int, feather: int, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fix a batch [B,H,W,3] as `plan_fixes` planned it: the fixed images and the paste masks [B,H,W]. Each
    plan gets its fixed faces' cosines after the fix (`fix_report` writes them out)."""
    fixed_images, masks = [], []
    for image, plan in zip(images, plans):
        fixed, mask = fix_image(image, plan, resample, guide_size, feather, multiple)
        if any(face.fixed for face in plan.faces):
            measure_after(face_model, identities, fixed, plan)
        fixed_images.append(fixed)
        masks.append(mask)
    return torch.stack(fixed_images), torch.stack(masks)


def _cosine(value: float | None, threshold: float) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}{DOUBTFUL_MARK if value < threshold else ''}"


def _outcome(face: FaceFix, only_below: float) -> str:
    if not face.fixed:
        return f"kept (at or above only_below {only_below:.2f})"
    if face.after is None:
        return "not found after the fix"
    change = f"{face.after - face.before:+.2f}"
    return f"WORSE ({change})" if face.worse else f"better ({change})" if face.after > face.before else "same"


def fix_report(plans: list[ImagePlan], only_below: float) -> str:
    """The before/after table: one row per matched face (the reference it was fixed toward, its cosine before
    and after, and whether it got better or worse), then the faces and people the fix left alone."""
    rows = [["image", "face", "toward", "before", "after", "result"]]
    for plan in plans:
        threshold = plan.score.match.same_person_threshold
        for face in plan.faces:
            rows.append([str(face.image + 1), str(face.face + 1), f"R{face.reference + 1}",
                         _cosine(face.before, threshold), _cosine(face.after, threshold), _outcome(face, only_below)])
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    notes = []
    for index, plan in enumerate(plans, 1):
        if not plan.faces:
            notes.append(f"image {index}: no face matched a reference; unchanged")
            continue
        missing = ", ".join(f"R{k + 1}" for k in plan.missing_references())
        unmatched = ", ".join(str(j + 1) for j in plan.unmatched_faces())
        if missing:
            notes.append(f"image {index}: {missing} not found in the image (not added)")
        if unmatched:
            notes.append(f"image {index}: face {unmatched} matched to no reference; untouched")
    if any(DOUBTFUL_MARK in line for line in lines[1:]):
        threshold = plans[0].score.match.same_person_threshold
        notes.append(f"{DOUBTFUL_MARK} = below {threshold:.2f}, this face network's same-person threshold")
    return "\n".join(lines + notes)
