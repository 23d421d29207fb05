"""Identity metrics (the UMO paper's evaluation, arXiv 2509.06818; the README's Metrics).
Undefined values are None, never 0 or NaN.

Units follow the papers: ID-Sim, matched ID-Sim and ID-Conf are x100 (as UMO and XVerseBench
report them); WithAnyone's Sim(GT), CP and Bld stay in cosine / [-1,1] units.
"""

from __future__ import annotations

import math

import torch

from .matching import IdentityMatch, assign, match_identities, mimr, similarity_matrix, sir

EPS = 1e-6


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def id_sim(similarity: torch.Tensor) -> float | None:
    """Per reference the best cosine over generated faces, x100, averaged; None without faces."""
    if similarity.shape[1] == 0:
        return None
    return 100.0 * similarity.max(dim=1).values.mean().item()


def id_sim_matched(similarity: torch.Tensor, assignment: list[int | None]) -> float | None:
    """Hungarian-matched cosine per reference (0 if unmatched), x100, averaged (= Sim(Ref) x100); None without
    faces."""
    if similarity.shape[1] == 0:
        return None
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


def present_similarity(match: IdentityMatch) -> float | None:
    """The mean cosine of the present references with their faces; None when no reference is present."""
    return _mean([match.matched_similarity(k) for k in match.present])


def identity_metrics(references: torch.Tensor, faces: torch.Tensor, same_person_threshold: float,
                     ground_truth: torch.Tensor | None = None) -> dict:
    """Everything the score command and the report node show, for one image: {"match": its IdentityMatch,
    "metrics": `match_metrics` of it}.

    references [M,D], faces [N,D] and ground_truth [T,D] are L2-normalised embeddings;
    `same_person_threshold` is the face network's (`FaceModel.same_person_threshold`).
    """
    match = match_identities(references, faces, same_person_threshold)
    return {"match": match, "metrics": match_metrics(match, ground_truth)}


def match_metrics(match: IdentityMatch, ground_truth: torch.Tensor | None = None) -> dict:
    """The metrics of one image (the README's Metrics table) from its match, for any caller that has one (a
    RewardResult holds them): the matching is not done twice. `ground_truth` [T,D]: the embeddings of a
    ground-truth photo's faces, for Sim(GT) and CP.

    The match may carry gradient; the metrics are plain numbers. Every similarity metric is None for an
    image without faces; `missing` holds 0-based reference indices.
    """
    references = match.reference_embeddings.detach().float().cpu()
    faces = match.face_embeddings.detach().float().cpu()
    similarity, assignment = match.similarity.detach().float().cpu(), match.assignment
    has_faces = match.face_count > 0
    sim_gt, cp = (None, None)
    if ground_truth is not None and len(ground_truth) and has_faces:
        sim_gt, cp = ground_truth_metrics(references, faces, assignment, ground_truth.float().cpu())
    return {
        "faces": match.face_count,
        "coverage": match.coverage,
        "duplicates": len(match.duplicates),
        "missing": match.missing,
        "present_sim": present_similarity(match),
        "mimr": mimr(similarity, assignment).item() if has_faces else None,
        "sir": sir(similarity, assignment).item() if has_faces else None,
        "id_sim": id_sim(similarity),
        "id_sim_matched": id_sim_matched(similarity, assignment),
        "id_conf": id_conf(similarity),
        "bld": blending(similarity, assignment),
        "sim_gt": sim_gt,
        "cp": cp,
    }


def is_averaged(value: object) -> bool:
    """Whether a metric's value is a number that `average_metrics` averages (not a list such as `missing`)."""
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def average_metrics(metrics: list[dict]) -> dict:
    """The mean of each numeric metric over images, over the images where it is defined (None where none
    is); list-valued metrics (`missing`) are left out."""
    names = [name for name in (metrics[0] if metrics else {}) if all(is_averaged(m[name]) for m in metrics)]
    return {name: _mean([m[name] for m in metrics if m[name] is not None]) for name in names}
