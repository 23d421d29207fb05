"""The differentiable identity reward: MIMR (or SIR) of generated images against references.

This is the one GPU code path shared by the ReReFL trainer, identity guidance and the
nodes: detection and the assignment run without gradient; the alignment warp and the
torch face network carry the gradient back to the image pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import UMOError
from .detection import Faces
from .face_model import FaceModel, Identities
from .matching import REWARDS, IdentityMatch, match_identities


@dataclass
class RewardResult:
    values: torch.Tensor  # [B] rewards, differentiable w.r.t. the images where faces were found
    detections: list[Faces]  # per image, its detected faces
    matches: list[IdentityMatch]  # per image; its face embeddings [N,D] and similarity [M,N] may carry grad


def reward_of_faces(identities: Identities, face_embeddings: torch.Tensor, same_person_threshold: float,
                    kind: str = "mimr") -> tuple[torch.Tensor, IdentityMatch]:
    """(reward, match) of one image's face embeddings [N,D] (may carry grad); `same_person_threshold` is the
    face network's, for the match's presence (the reward itself does not use it)."""
    # A clone: identities made under inference mode (ComfyUI) cannot otherwise be saved for backward.
    references = identities.embeddings.to(face_embeddings.device).clone()
    match = match_identities(references, face_embeddings.float(), same_person_threshold)
    return REWARDS[kind](match.similarity, match.assignment), match


def identity_reward(images: torch.Tensor, identities: Identities | Sequence[Identities], face_model: FaceModel,
                    kind: str = "mimr", faces: list[Faces] | None = None) -> RewardResult:
    """Reward of each image in a ComfyUI-layout batch [B,H,W,3] (0..1) that may require grad.

    `identities`: the reference people of every image, or one `Identities` per image (a training batch
    whose samples have their own references). `faces` skips detection when the caller already knows
    where the faces are (e.g. boxes found on a cheaper preview). Detection runs on every image first,
    then all faces of the batch are embedded in one recogniser call and split per image.

    Gradient: each value is differentiable w.r.t. `images` through the alignment warp and the torch
    face network (detection and the assignment carry none); an image without a face gets reward 0
    and a zero gradient.
    """
    if isinstance(identities, Identities):
        identities = [identities] * len(images)
    if len(identities) != len(images):
        raise UMOError(f"identity reward: {len(identities)} sets of references for {len(images)} images; "
                       "give one set for all images or one per image")
    if faces is None:
        faces = face_model.detect(images)
    face_embeddings = face_model.embed_faces_of_images(images, faces)
    values, matches = [], []
    for image_identities, image_face_embeddings in zip(identities, face_embeddings):
        value, match = reward_of_faces(image_identities, image_face_embeddings, face_model.same_person_threshold,
                                       kind)
        values.append(value.to(images.device, torch.float32))
        matches.append(match)
    return RewardResult(torch.stack(values), faces, matches)
