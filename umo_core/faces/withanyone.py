"""WithAnyone's optional identity losses (WithAnyone, arXiv 2510.14975), off unless the trainer asks.

- GT-aligned ID loss: the faces are located on the ground-truth photo only (its detection is
  done once, on a clean image); the generated image is cropped at those same keypoints and its
  crops are pulled towards the ground-truth faces' embeddings with 1 - cos. Nothing is detected
  on the generated image, which at training time is a noisy one-step estimate.
- Contrastive ID loss: InfoNCE pulling each generated face to its own person and away from the
  sample's other people and from a bank of faces of other identities in the data set.
- The trainer gates both: they are off at noisy steps, sigma > ID_LOSS_MAX_SIGMA (WithAnyone
  multiplies them by ~0 for t > 0.6).

Everything here is a pure function of tensors and face detections; the trainer wires them in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UMOError
from .detection import Faces
from .face_model import AnalysedImage, FaceModel
from .matching import assign, similarity_matrix

ID_LOSS_MAX_SIGMA = 0.6  # both losses are off for flow-matching sigma (t) above this
CONTRASTIVE_TEMPERATURE = 0.1  # WithAnyone's InfoNCE temperature (the info_nce package's default)
# Without identity names, a bank face counts as another person only if its cosine to each of the
# sample's references is below this. Low on purpose: dropping a true negative costs little, while a
# photo of the same person used as a negative pushes the model away from that person.
SAME_PERSON_COSINE = 0.3


def _rescaled(faces: Faces, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> Faces:
    """Faces detected on an image of size from_hw, in the pixel coordinates of one of size to_hw."""
    scale_y, scale_x = to_hw[0] / from_hw[0], to_hw[1] / from_hw[1]
    return Faces(faces.boxes * np.array([scale_x, scale_y, scale_x, scale_y], np.float32),
                 faces.keypoints * np.array([scale_x, scale_y], np.float32), faces.scores)


def gt_aligned_embeddings(images: torch.Tensor, ground_truth: list[AnalysedImage], face_model: FaceModel,
                          ground_truth_hw: tuple[int, int] | None = None) -> list[torch.Tensor]:
    """Differentiable embeddings of the generated images' faces at the ground-truth faces' places.

    images: [B,H,W,3] in 0..1, may require grad. ground_truth: per image, the faces detected on its
    ground-truth photo (`FaceModel.analyse`), of size `ground_truth_hw` (default: the images' size;
    keypoints are rescaled when it differs). Returns per image [T,D]: row t is the generated image
    cropped at ground-truth face t's keypoints.
    """
    if len(ground_truth) != len(images):
        raise ValueError(f"{len(ground_truth)} ground truths for {len(images)} images")
    image_hw = tuple(images.shape[1:3])
    ground_truth_hw = ground_truth_hw or image_hw
    return [face_model.embed_faces(image, _rescaled(truth.faces, ground_truth_hw, image_hw))
            for image, truth in zip(images, ground_truth)]


def gt_aligned_id_loss(images: torch.Tensor, ground_truth: list[AnalysedImage], face_model: FaceModel,
                       ground_truth_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """WithAnyone's GT-aligned ID loss: mean over images of mean over ground-truth faces of 1 - cos.

    Generated face t is compared with ground-truth face t's embedding (the ground truth cropped at
    its own keypoints, as `FaceModel.analyse` embeds it); the pairing is by position, so no
    assignment is needed. Images whose ground truth has no face take no part; with none at all the
    loss is a zero without gradient. Arguments as in `gt_aligned_embeddings`.
    """
    losses = []
    for generated, truth in zip(gt_aligned_embeddings(images, ground_truth, face_model, ground_truth_hw),
                                ground_truth):
        if len(generated):
            cosines = (generated * truth.embeddings.to(generated)).sum(dim=-1)
            losses.append((1.0 - cosines).mean())
    if not losses:
        return images.new_zeros((), dtype=torch.float32)
    return torch.stack(losses).mean()


def paired_with_references(faces: torch.Tensor, references: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(faces [P,D], their references [P,D]): the Hungarian pairs of `assign`, as the reward pairs them.

    faces [N,D] are one image's generated faces (detected ones, or `gt_aligned_embeddings`);
    references [M,D] are the sample's people. Unmatched faces and references are left out.
    """
    assignment = assign(similarity_matrix(references, faces))
    pairs = [(k, j) for k, j in enumerate(assignment) if j is not None]
    return faces[[j for _, j in pairs]], references.to(faces)[[k for k, _ in pairs]]


def contrastive_id_loss(generated: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                        temperature: float = CONTRASTIVE_TEMPERATURE) -> torch.Tensor:
    """InfoNCE: generated face i [N,D] pulled to positives[i] and pushed from every other key.

    Row i's negatives are the other rows' positives (the sample's other people, as in WithAnyone,
    where the other faces' keys are negatives too) and all `negatives` [K,D] (the bank of other
    identities, `negatives_for`). Rows must already be paired (`paired_with_references`). Embeddings
    are L2-normalised here; the mean over rows is returned. N = 0 gives a zero without gradient, and
    a single row with no negatives gives exactly 0 (there is nothing to contrast).
    """
    if temperature <= 0:
        raise UMOError(f"contrastive temperature must be > 0 (got {temperature}); WithAnyone uses "
                       f"{CONTRASTIVE_TEMPERATURE}")
    if positives.shape != generated.shape or negatives.shape[-1] != generated.shape[-1]:
        raise ValueError(f"generated {tuple(generated.shape)}, positives {tuple(positives.shape)} and "
                         f"negatives {tuple(negatives.shape)} do not fit: expected [N,D], [N,D], [K,D]")
    if len(generated) == 0:
        return generated.new_zeros((), dtype=torch.float32)
    queries = F.normalize(generated.float(), dim=-1)
    keys = F.normalize(torch.cat([positives, negatives]).to(queries), dim=-1)
    logits = queries @ keys.T / temperature  # column i of row i is its positive
    return F.cross_entropy(logits, torch.arange(len(queries), device=queries.device))


@dataclass
class ReferenceBank:
    """Every reference face of a data set, with its identity name where the manifest gives one."""

    embeddings: torch.Tensor  # [K,D], L2-normalised, no grad
    names: list[str | None]  # per face; None for rows without "identities"


def reference_bank(embeddings: list[torch.Tensor], names: list[list[str] | None]) -> ReferenceBank:
    """The bank of a data set: per manifest row its reference embeddings [M,D] (`Identities.embeddings`)
    and its names (or None)."""
    if len(names) != len(embeddings):
        raise ValueError(f"{len(names)} name lists for {len(embeddings)} rows")
    flat_names: list[str | None] = []
    for row, (people, row_names) in enumerate(zip(embeddings, names)):
        if row_names is not None and len(row_names) != len(people):
            raise UMOError(f"data row {row + 1}: {len(row_names)} identity names for {len(people)} references; "
                           "give one name per reference photo, or none")
        flat_names.extend(row_names if row_names is not None else [None] * len(people))
    return ReferenceBank(torch.cat(embeddings).detach().float(), flat_names)


def negatives_for(bank: ReferenceBank, references: torch.Tensor, names: list[str] | None,
                  same_person_cosine: float = SAME_PERSON_COSINE) -> torch.Tensor:
    """The bank faces [K',D] known to be none of a sample's people (references [M,D], names or None).

    A bank face is kept when, against every reference of the sample, it is another person: by name
    when both have one (a same-named face is dropped, however unlike it looks), otherwise by
    cosine below `same_person_cosine`. The sample's own references are therefore never kept.
    """
    if names is not None and len(names) != len(references):
        raise ValueError(f"{len(names)} names for {len(references)} references")
    names = names or [None] * len(references)
    known = torch.tensor([[name is not None and other is not None for other in bank.names] for name in names])
    same_name = torch.tensor([[name == other for other in bank.names] for name in names])
    similarity = similarity_matrix(references, bank.embeddings).cpu()  # [M,K]
    other_person = torch.where(known, ~same_name, similarity < same_person_cosine)
    return bank.embeddings[other_person.all(dim=0).to(bank.embeddings.device)]
