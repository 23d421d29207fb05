"""Identity matching and UMO's rewards (the UMO paper, arXiv 2509.06818).

All functions take torch tensors so the same code serves scoring (no grad) and training or
guidance (grad flows through the similarity matrix). The assignment itself is discrete and
computed without gradient, as in UMO's released reward.
"""

from __future__ import annotations

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
