"""Identity metrics (the UMO paper's evaluation, arXiv 2509.06818; the README's Metrics).
Undefined values are None, never 0 or NaN.

Units follow the papers: ID-Sim, matched ID-Sim and ID-Conf are x100 (as UMO and XVerseBench
report them); WithAnyone's Sim(GT), CP and Bld stay in cosine / [-1,1] units.
"""

from __future__ import annotations

import math

import torch

from .matching import assign, mimr, similarity_matrix, sir

EPS = 1e-6


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def id_sim(similarity: torch.Tensor) -> float:
    """Per reference the best cosine over generated faces (0 if none), x100, averaged."""
    m, n = similarity.shape
    if n == 0:
        return 0.0
    return 100.0 * similarity.max(dim=1).values.mean().item()


def id_sim_matched(similarity: torch.Tensor, assignment: list[int | None]) -> float:
    """Hungarian-matched cosine per reference (0 if unmatched), x100, averaged (= Sim(Ref) x100)."""
    values = [similarity[k, j].item() if j is not None else 0.0 for k, j in enumerate(assignment)]
    return 100.0 * sum(values) / len(values)


def id_conf(similarity: torch.Tensor) -> float | None:
    """Per reference with top-2 similarities s1 >= s2: clip(1 - s2/s1, 0, 1), x100, averaged.

    Defined only when at least two faces were generated. A reference whose best similarity
    is not positive has no meaningful ratio and counts as 0 confidence.
    """
    if similarity.shape[1] < 2:
        return None
    top2 = similarity.topk(2, dim=1).values
    values = []
    for s1, s2 in top2.tolist():
        values.append(min(max(1.0 - s2 / s1, 0.0), 1.0) if s1 > 0 else 0.0)
    return 100.0 * sum(values) / len(values)


def blending(similarity: torch.Tensor, assignment: list[int | None]) -> float | None:
    """Bld: mean cosine over all (reference, face) pairs that are not matched; lower is better."""
    matched = {(k, j) for k, j in enumerate(assignment) if j is not None}
    values = [similarity[k, j].item() for k in range(similarity.shape[0])
              for j in range(similarity.shape[1]) if (k, j) not in matched]
    return _mean(values)


def _angle(cosine: float) -> float:
    return math.acos(min(max(cosine, -1.0), 1.0))


def ground_truth_metrics(references: torch.Tensor, faces: torch.Tensor, assignment: list[int | None],
                         ground_truth: torch.Tensor) -> tuple[float | None, float | None]:
    """WithAnyone's Sim(GT) and CP against a ground-truth photo of the same people.

    Reference k's person in the ground truth is found by Hungarian matching of the references
    to the ground-truth faces. For each reference with both a generated and a ground-truth
    face: Sim(GT) = cos(g, t); CP = (theta_gt - theta_gr) / max(theta_tr, eps), in [-1, 1].
    """
    gt_assignment = assign(similarity_matrix(references, ground_truth))
    sims, copy_paste = [], []
    for k, (j, t) in enumerate(zip(assignment, gt_assignment)):
        if j is None or t is None:
            continue
        g, gt, r = faces[j], ground_truth[t], references[k]
        cos_gt, cos_gr, cos_tr = (g @ gt).item(), (g @ r).item(), (gt @ r).item()
        sims.append(cos_gt)
        value = (_angle(cos_gt) - _angle(cos_gr)) / max(_angle(cos_tr), EPS)
        copy_paste.append(min(max(value, -1.0), 1.0))
    return _mean(sims), _mean(copy_paste)


def identity_metrics(references: torch.Tensor, faces: torch.Tensor,
                     ground_truth: torch.Tensor | None = None) -> dict:
    """Everything the score command and the report node show, for one image.

    references [M,D], faces [N,D] and ground_truth [T,D] are L2-normalised embeddings.
    Returns the similarity matrix (list of rows), the assignment, and the metrics dict.
    """
    similarity = similarity_matrix(references, faces)
    return match_metrics(references, faces, similarity, assign(similarity), ground_truth)


def match_metrics(references: torch.Tensor, faces: torch.Tensor, similarity: torch.Tensor,
                  assignment: list[int | None], ground_truth: torch.Tensor | None = None) -> dict:
    """`identity_metrics` from the similarity [M,N] of references and faces and its assignment, for a caller
    that already has them (a RewardResult holds both): the matching is not done twice.

    `similarity` may carry gradient; the metrics are plain numbers.
    """
    similarity = similarity.detach()
    sim_gt, cp = (None, None)
    if ground_truth is not None and len(ground_truth) and len(faces):
        sim_gt, cp = ground_truth_metrics(references, faces, assignment, ground_truth)
    metrics = {
        "mimr": mimr(similarity, assignment).item(),
        "sir": sir(similarity, assignment).item(),
        "id_sim": id_sim(similarity),
        "id_sim_matched": id_sim_matched(similarity, assignment),
        "id_conf": id_conf(similarity),
        "bld": blending(similarity, assignment),
        "sim_gt": sim_gt,
        "cp": cp,
    }
    return {"similarity": similarity.tolist(), "assignment": assignment, "metrics": metrics}


def average_metrics(metrics: list[dict]) -> dict:
    """The mean of each metric over images, over the images where it is defined (None where none is)."""
    names = metrics[0].keys() if metrics else []
    return {name: _mean([m[name] for m in metrics if m[name] is not None]) for name in names}
