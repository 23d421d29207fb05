"""Hungarian matching, MIMR/SIR exactly as the UMO paper (arXiv 2509.06818) defines them, and the
metrics (the README's Metrics)."""

from __future__ import annotations

import math

import pytest
import torch

from umo_core.faces.matching import assign, mimr, similarity_matrix, sir
from umo_core.faces.metrics import blending, ground_truth_metrics, id_conf, id_sim, id_sim_matched, identity_metrics

S = torch.tensor([[0.2, 0.9, 0.1],
                  [0.8, 0.7, 0.0]])


def test_assignment_maximises_total_similarity():
    # Greedy would give ref 0 -> face 1 (0.9) then ref 1 -> face 0 (0.8): also optimal here; check a trap.
    trap = torch.tensor([[0.9, 0.8], [0.85, 0.1]])
    assert assign(trap) == [1, 0]  # 0.8 + 0.85 > 0.9 + 0.1
    assert assign(S) == [1, 0]


def test_more_references_than_faces_and_no_faces():
    assert assign(S.T) == [1, 0, None]
    assert assign(torch.zeros(3, 0)) == [None, None, None]


def test_mimr_formula():
    # W = +1 on (0,1), (1,0); -1 elsewhere; R = sum(W*S) / (M*N)
    expected = (0.9 + 0.8 - 0.2 - 0.1 - 0.7 - 0.0) / 6
    assert mimr(S, assign(S)).item() == pytest.approx(expected)
    more_refs = S.T  # 3 refs, 2 faces: ref 2 unmatched, all its pairs weigh -1
    expected = (0.9 + 0.8 - 0.2 - 0.7 - 0.1 - 0.0) / 6
    assert mimr(more_refs, assign(more_refs)).item() == pytest.approx(expected)
    assert mimr(torch.zeros(2, 0), [None, None]).item() == 0.0


def test_sir():
    assert sir(S, assign(S)).item() == pytest.approx((0.9 + 0.8) / 2)
    assert sir(S.T, assign(S.T)).item() == pytest.approx((0.9 + 0.8) / 3)  # unmatched reference counts 0
    single = torch.tensor([[0.3, 0.6]])
    assert sir(single, assign(single)).item() == pytest.approx(0.6)


def test_mimr_gradient_signs():
    similarity = S.clone().requires_grad_(True)
    mimr(similarity, assign(similarity)).backward()
    assert similarity.grad[0, 1] > 0 and similarity.grad[1, 0] > 0
    assert similarity.grad[0, 0] < 0 and similarity.grad[1, 2] < 0


def test_id_sim_and_matched():
    assert id_sim(S) == pytest.approx(100 * (0.9 + 0.8) / 2)
    confusing = torch.tensor([[0.9, 0.1], [0.8, 0.2]])  # both references look most like face 0
    assert id_sim(confusing) == pytest.approx(85.0)
    assert id_sim_matched(confusing, assign(confusing)) == pytest.approx(100 * (0.9 + 0.2) / 2)
    assert id_sim(torch.zeros(2, 0)) is None and id_sim_matched(torch.zeros(2, 0), [None, None]) is None


def test_id_conf():
    assert id_conf(S) == pytest.approx(100 * ((1 - 0.2 / 0.9) + (1 - 0.7 / 0.8)) / 2)
    assert id_conf(torch.tensor([[0.9], [0.5]])) is None  # fewer than two faces
    assert id_conf(torch.tensor([[-0.1, -0.2]])) == 0.0


def test_blending_is_the_mean_of_unmatched_pairs():
    assert blending(S, assign(S)) == pytest.approx((0.2 + 0.1 + 0.7 + 0.0) / 4)
    assert blending(torch.tensor([[0.5]]), [0]) is None


def _unit(*values):
    v = torch.tensor(values, dtype=torch.float32)
    return v / v.norm()


def test_copy_paste_extremes():
    reference, target = _unit(1, 0, 0), _unit(0, 1, 0)
    refs = reference[None]
    # Generated face equal to the reference: CP = 1 (pasted); equal to the target: CP = -1.
    for generated, expected in ((reference, 1.0), (target, -1.0)):
        sim_gt, cp = ground_truth_metrics(refs, generated[None], [0], target[None])
        assert cp == pytest.approx(expected, abs=1e-5)
        assert sim_gt == pytest.approx((generated @ target).item())
    halfway = _unit(1, 1, 0)
    _, cp = ground_truth_metrics(refs, halfway[None], [0], target[None])
    assert cp == pytest.approx(0.0, abs=1e-5)


def test_an_image_without_faces_has_null_similarity_metrics():
    refs = torch.eye(3)[:2]
    result = identity_metrics(refs, torch.zeros(0, 3), 0.45, ground_truth=torch.eye(3)[:2])
    assert result["match"].assignment == [None, None]
    metrics = result["metrics"]
    for similarity_metric in ("mimr", "sir", "id_sim", "id_sim_matched", "present_sim", "id_conf", "bld", "sim_gt",
                              "cp"):
        assert metrics[similarity_metric] is None, similarity_metric
    assert metrics["faces"] == 0 and metrics["coverage"] == 0.0 and metrics["duplicates"] == 0
    assert metrics["missing"] == [0, 1]
    assert not any(isinstance(v, float) and math.isnan(v) for v in metrics.values())


def test_similarity_matrix_is_cosine():
    refs, faces = torch.eye(2), _unit(1, 1)[None]
    assert similarity_matrix(refs, faces)[:, 0].tolist() == pytest.approx([math.sqrt(0.5)] * 2)
