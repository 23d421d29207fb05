"""Identity matching and UMO's rewards (the UMO paper, arXiv 2509.06818).

`IdentityMatch` is THE match of one image's reference people to its detected faces: made once by
`match_identities` and carried by scoring, the metrics, the reward, guidance, the nodes and `evaluate`.

    match = match_identities(reference_embeddings, face_embeddings, same_person_threshold)
    match.similarity          # [M,N] torch: cos(reference embedding k, face embedding j); may carry gradient
    match.assignment          # [M] the face index (0-based) matched to each reference, or None (Hungarian)
    match.present             # references matched to a face at or above the same-person threshold
    match.missing             # references with no face, or only a doubtful (below-threshold) match
    match.duplicates          # {face: reference}: unmatched faces that are confidently a reference again
    match.bystanders          # every other face: neither a present reference's match nor a duplicate
    match.coverage            # len(present) / M
    match.face_role(j)        # FaceRole of face j: "match", "doubtful", "duplicate" or "bystander"
    match.to_json()           # all of the above with 0-based indices

Presence, per reference k, with t = the face network's same-person threshold:
- present: matched by the assignment to a face with cosine >= t;
- missing: no face matched (more references than faces), or a doubtful match (cosine < t).
Faces, per face j (the roles partition the faces):
- match: the assigned face of a present reference;
- duplicate: not a present reference's match (left unmatched by the assignment, or matched only doubtfully
  to another reference), with cosine >= t to a present reference: that person appears twice or more.
  It counts for the present reference it resembles most. (A face left unmatched with cosine >= t to any
  reference is always such a face: were that reference missing, the assignment would have taken it.)
- doubtful: assigned to a reference below t (that reference is missing) and not a duplicate;
- bystander: any face that is neither a match nor a duplicate (doubtful ones included): neutral.

All functions take torch tensors so the same code serves scoring (no grad) and training or
guidance (grad flows through the similarity matrix). The assignment and the presence are discrete
and computed without gradient, as in UMO's released reward.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

MATCHED_WEIGHT = 1.0  # lambda1
UNMATCHED_WEIGHT = -1.0  # lambda2


def similarity_matrix(references: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """S[k,j] = cos(reference k, face j) for L2-normalised embeddings [M,D] and [N,D]."""
    return references.to(faces) @ faces.T


def assign(similarity: torch.Tensor) -> list[int | None]:
    """Hungarian assignment maximising total similarity: the face index per reference, or None.

    With more references than faces, min(M,N) pairs are matched and the rest get None.
    """
    m, n = similarity.shape
    assignment: list[int | None] = [None] * m
    if m == 0 or n == 0:
        return assignment
    rows, cols = linear_sum_assignment(-similarity.detach().float().cpu().numpy())
    for row, col in zip(rows, cols):
        assignment[int(row)] = int(col)
    return assignment


def assignment_weights(assignment: list[int | None], n_faces: int,
                       matched: float = MATCHED_WEIGHT, unmatched: float = UNMATCHED_WEIGHT) -> np.ndarray:
    """W[k,j]: `matched` on assigned pairs, `unmatched` everywhere else."""
    weights = np.full((len(assignment), n_faces), unmatched, dtype=np.float32)
    for k, j in enumerate(assignment):
        if j is not None:
            weights[k, j] = matched
    return weights


def mimr(similarity: torch.Tensor, assignment: list[int | None],
         matched: float = MATCHED_WEIGHT, unmatched: float = UNMATCHED_WEIGHT) -> torch.Tensor:
    """Multi-identity matching reward R = 1/(M*N) * sum W[k,j] * S[k,j]; 0 when no face."""
    m, n = similarity.shape
    if m == 0 or n == 0:
        return similarity.new_zeros(())
    weights = torch.from_numpy(assignment_weights(assignment, n, matched, unmatched)).to(similarity)
    return (weights * similarity).sum() / (m * n)


def sir(similarity: torch.Tensor, assignment: list[int | None]) -> torch.Tensor:
    """Single identity reward: cos(generated, reference) of the matched pairs, averaged over
    references (an unmatched reference counts 0). For one reference this is its best face."""
    m = similarity.shape[0]
    pairs = [(k, j) for k, j in enumerate(assignment) if j is not None]
    if m == 0 or not pairs:
        return similarity.new_zeros(())
    rows, cols = zip(*pairs)
    return similarity[list(rows), list(cols)].sum() / m


REWARDS = {"mimr": mimr, "sir": sir}


@dataclass(frozen=True)
class FaceRole:
    """What one detected face is in an IdentityMatch (see the module docstring)."""

    kind: Literal["match", "doubtful", "duplicate", "bystander"]
    reference: int | None  # the reference it matches, is doubtfully matched to, or repeats; None for a bystander
    similarity: float | None  # its cosine with that reference


@dataclass
class IdentityMatch:
    """One image's reference people matched to its faces: the similarity, the assignment and the presence.

    Made by `match_identities`; `reference_embeddings` [M,D] and `face_embeddings` [N,D] are L2-normalised
    (the face embeddings may carry gradient, and so may `similarity`). Presence is read from the cosines
    without gradient. The module docstring defines present, missing, duplicates and bystanders.
    """

    reference_embeddings: torch.Tensor
    face_embeddings: torch.Tensor
    similarity: torch.Tensor  # [M,N]
    assignment: list[int | None]  # per reference, its face index or None
    same_person_threshold: float  # of the face network that made the embeddings

    def detach(self) -> IdentityMatch:
        """The same match without gradient (so that keeping it does not keep the autograd graph alive)."""
        return IdentityMatch(self.reference_embeddings.detach(), self.face_embeddings.detach(),
                             self.similarity.detach(), self.assignment, self.same_person_threshold)

    @property
    def reference_count(self) -> int:
        return len(self.assignment)

    @property
    def face_count(self) -> int:
        return self.similarity.shape[1]

    @cached_property
    def cosines(self) -> list[list[float]]:
        """`similarity` as plain numbers, one row per reference."""
        return self.similarity.detach().float().cpu().tolist()

    def matched_similarity(self, reference: int) -> float | None:
        """The cosine of reference `reference` with its assigned face; None when it has none."""
        face = self.assignment[reference]
        return None if face is None else self.cosines[reference][face]

    def is_doubtful(self, reference: int) -> bool:
        """Reference `reference` was assigned a face below the same-person threshold."""
        similarity = self.matched_similarity(reference)
        return similarity is not None and similarity < self.same_person_threshold

    @cached_property
    def present(self) -> list[int]:
        """The references assigned a face at or above the same-person threshold."""
        return [k for k in range(self.reference_count)
                if self.assignment[k] is not None and not self.is_doubtful(k)]

    @cached_property
    def missing(self) -> list[int]:
        """The references without a face, or with only a doubtful one."""
        return [k for k in range(self.reference_count) if k not in self.present]

    @cached_property
    def duplicates(self) -> dict[int, int]:
        """{face: reference}: each face that is not a present reference's match but has a cosine at or above
        the same-person threshold with a present reference (the most similar one): that reference shown again."""
        matched = {self.assignment[k] for k in self.present}
        duplicates = {}
        for face in range(self.face_count):
            if face in matched or not self.present:
                continue
            best = max(self.present, key=lambda k: self.cosines[k][face])
            if self.cosines[best][face] >= self.same_person_threshold:
                duplicates[face] = best
        return duplicates

    @cached_property
    def bystanders(self) -> list[int]:
        """The faces that are neither a present reference's match nor a duplicate."""
        return [j for j in range(self.face_count) if self.face_role(j).kind in ("doubtful", "bystander")]

    @property
    def coverage(self) -> float:
        """The share of the references present."""
        return len(self.present) / self.reference_count

    @property
    def complete(self) -> bool:
        """Every reference present, none shown twice."""
        return not self.missing and not self.duplicates

    def face_role(self, face: int) -> FaceRole:
        """What face `face` is: a present reference's match, a doubtful match, a duplicate or a bystander."""
        if face in self.duplicates:
            reference = self.duplicates[face]
            return FaceRole("duplicate", reference, self.cosines[reference][face])
        if face in self.assignment:
            reference = self.assignment.index(face)
            kind = "doubtful" if self.is_doubtful(reference) else "match"
            return FaceRole(kind, reference, self.cosines[reference][face])
        return FaceRole("bystander", None, None)

    def to_json(self) -> dict:
        """The match with 0-based reference and face indices: `similarity` (one row per reference),
        `assignment`, `matches` (each assigned pair with its cosine and whether it is doubtful), `present`,
        `missing`, `duplicates` (`face`, `reference`, `similarity`) and `bystanders`."""
        return {
            "similarity": self.cosines,
            "assignment": list(self.assignment),
            "matches": [{"reference": k, "face": j, "similarity": self.cosines[k][j], "doubtful": self.is_doubtful(k)}
                        for k, j in enumerate(self.assignment) if j is not None],
            "present": self.present,
            "missing": self.missing,
            "duplicates": [{"face": j, "reference": k, "similarity": self.cosines[k][j]}
                           for j, k in self.duplicates.items()],
            "bystanders": self.bystanders,
        }


def match_identities(reference_embeddings: torch.Tensor, face_embeddings: torch.Tensor,
                     same_person_threshold: float) -> IdentityMatch:
    """The match of M references [M,D] to N faces [N,D] (L2-normalised; the faces may carry gradient):
    their similarity, its Hungarian assignment and the presence at this same-person threshold
    (`FaceModel.same_person_threshold`)."""
    similarity = similarity_matrix(reference_embeddings, face_embeddings)
    return IdentityMatch(reference_embeddings, face_embeddings, similarity, assign(similarity), same_person_threshold)
