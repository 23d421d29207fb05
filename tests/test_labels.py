"""Doubtful matches: the per-network same-person threshold, its calibration on the fixture LFW faces,
and how a match below it is shown in the annotation, the score table and the JSON pairs."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

from tests.conftest import ASSETS, LFW
from umo_core import load_face_model
from umo_core.faces.annotate import COLOURS, DOUBTFUL_LABEL, annotate
from umo_core.faces.face_model import SAME_PERSON_COSINE, same_person_threshold
from umo_core.faces.metrics import identity_metrics
from umo_core.faces.scoring import score_image, score_table
from umo_core.images import load_image


def _lfw_pair_cosines(face_model) -> tuple[list[float], list[float]]:
    """Cosines of every same-person and every different-person pair of the aligned LFW faces."""
    files = sorted(LFW.glob("*.jpg"))
    crops = torch.stack([torch.from_numpy(load_image(f)).float().div(255.0).permute(2, 0, 1) for f in files])
    embeddings = face_model.embedder.embed(crops)
    people = [f.stem.rsplit("_", 1)[0] for f in files]
    same, different = [], []
    for i, j in itertools.combinations(range(len(files)), 2):
        (same if people[i] == people[j] else different).append((embeddings[i] @ embeddings[j]).item())
    return same, different


def test_the_128_d_threshold_separates_the_lfw_pairs_and_the_t1_strangers(face_model, group):
    """The calibration of face_model.SAME_PERSON_COSINE[128], repeated on the fixture faces."""
    assert face_model.embedder.dim == 128 and face_model.same_person_threshold == SAME_PERSON_COSINE[128] == 0.45
    same, different = _lfw_pair_cosines(face_model)
    assert (len(same), len(different)) == (30, 160)
    assert min(same) == pytest.approx(0.515, abs=0.01) and max(different) == pytest.approx(0.185, abs=0.01)
    assert max(different) < face_model.same_person_threshold <= min(same)
    image, _, references = group  # six strangers, each against every other face of the photo
    similarity = face_model.identities(references).embeddings @ face_model.analyse([image])[0].embeddings.T
    strangers = similarity[~torch.eye(6, dtype=torch.bool)]
    assert strangers.max() < face_model.same_person_threshold < similarity.diagonal().min()


def test_threshold_table():
    assert same_person_threshold(512) == (0.40, None)  # insightface's ArcFace packs
    assert same_person_threshold(128) == (0.45, None)
    value, note = same_person_threshold(256)
    assert value == 0.40 and note == ("no same-person threshold is calibrated for a 256-d face recogniser; "
                                      "matches below 0.40 (ArcFace's) are marked doubtful")


def _recogniser_64d(path):
    """A real runnable 112 px recogniser graph with a 64-d embedding: pooled 3x7x7 patches, projected."""
    weights = np.random.default_rng(0).standard_normal((147, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("AveragePool", ["data"], ["pooled"], kernel_shape=[16, 16], strides=[16, 16]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("MatMul", ["flat", "weights"], ["embedding"])],
        "recogniser_64d",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor("weights", TensorProto.FLOAT, weights.shape, weights.flatten())])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_an_uncalibrated_network_gets_arcface_threshold_with_a_note(assets, tmp_path):
    folder = tmp_path / "pack_64d"
    folder.mkdir()
    (folder / "det_500m.onnx").write_bytes((ASSETS / "models" / "det_500m.onnx").read_bytes())
    _recogniser_64d(folder / "recogniser_64d.onnx")
    model = load_face_model(folder, provider="cpu")
    assert model.embedder.dim == 64 and model.same_person_threshold == 0.40
    assert model.notes == [same_person_threshold(64)[1]]


@pytest.fixture(scope="module")
def scored(face_model, photos):
    """Rob Lowe and Nathalie Baye as references; image A: other photos of them side by side (real matches);
    image B: two strangers (matched by Hungarian, but doubtful)."""
    def side_by_side(names):
        tiles = [load_image(photos / name) for name in names]
        height = max(t.shape[0] for t in tiles)
        return np.concatenate([np.pad(t, ((0, height - t.shape[0]), (0, 0), (0, 0))) for t in tiles], axis=1)

    identities = face_model.identities([photos / "Rob_Lowe_0001.jpg", photos / "Nathalie_Baye_0002.jpg"])
    right = side_by_side(["Rob_Lowe_0002.jpg", "Nathalie_Baye_0002.jpg"])
    strangers = side_by_side(["Mary_Katherine_Smart_0001_5k.jpg", "Teresa_Williams_0001_1k.jpg"])
    return identities, [(right, score_image(face_model, identities, right)),
                        (strangers, score_image(face_model, identities, strangers))]


def test_doubtful_flags_and_unchanged_metrics(scored, face_model):
    identities, [_, (strangers_image, strangers)] = scored
    right = scored[1][0][1]
    assert [right.match.is_doubtful(k) for k in range(2)] == [False, False]
    assert [strangers.match.is_doubtful(k) for k in range(2)] == [True, True]
    assert all(strangers.match.cosines[k][j] < 0.45 for k, j in enumerate(strangers.match.assignment))
    assert [m["doubtful"] for m in strangers.to_json()["matches"]] == [True, True]
    # A doubtful match leaves its reference missing; the faces are bystanders.
    assert right.match.present == [0, 1] and right.metrics["coverage"] == 1.0
    assert strangers.match.missing == [0, 1] and strangers.metrics["coverage"] == 0.0
    assert strangers.match.bystanders == [0, 1] and strangers.metrics["present_sim"] is None
    # The other metrics are identity_metrics' own: doubtful pairs count as before (id_conf stays high on strangers).
    faces = face_model.analyse([strangers_image])[0].embeddings
    assert strangers.metrics == identity_metrics(identities.embeddings, faces, 0.45)["metrics"]
    assert strangers.metrics["id_conf"] >= 50


def test_match_text_and_table(scored):
    _, [(_, right), (_, strangers)] = scored
    j = strangers.match.assignment[0]
    assert strangers.reference_text(0) == f"R1 missing (face {j + 1} {strangers.match.cosines[0][j]:.2f}?)"
    assert strangers.face_label(j) == f"{j + 1}: R1 {strangers.match.cosines[0][j]:.2f}?"
    j = right.match.assignment[0]
    assert right.reference_text(0) == f"R1->face {j + 1} {right.match.cosines[0][j]:.2f}"
    assert right.face_label(j) == f"{j + 1}: R1 {right.match.cosines[0][j]:.2f}"
    lines = score_table([right, strangers], [0, 1], ["right", "strangers"])
    assert lines[0].split()[:3] == ["rank", "image", "faces"]
    assert "?" not in lines[1] and lines[2].count("?") == 2 and "R1->face" in lines[1]
    assert "R1 missing" in lines[2] and "R2 missing" in lines[2]
    assert lines[3] == ("? = doubtful match: cosine below 0.45, this face network's same-person threshold "
                        "(probably not that person)")
    assert len(score_table([right], [0], ["right"])) == 2  # no legend without a doubtful match


def _bottom_edge(drawn: np.ndarray, box: np.ndarray, colour: tuple) -> float:
    """Share of the box's bottom edge (the top one carries the label) drawn in `colour`."""
    x1, _, x2, y2 = (int(round(v)) for v in box)
    return float((drawn[y2, x1:x2] == colour).all(axis=1).mean())


def test_annotation_marks_doubtful_matches(scored):
    _, [(right_image, right), (strangers_image, strangers)] = scored
    for image, score, doubtful in ((right_image, right, False), (strangers_image, strangers, True)):
        drawn = annotate(image, score)
        for k, j in enumerate(score.match.assignment):
            box = score.detections.boxes[j]
            colour = COLOURS[k]
            label_pixel = tuple(drawn[int(box[1]) - 1, int(box[0]) + 1])  # inside the label, left of its text
            assert label_pixel == (DOUBTFUL_LABEL if doubtful else colour)
            edge = _bottom_edge(drawn, box, colour)
            assert (0.4 < edge < 0.8) if doubtful else edge > 0.95  # dashed, or solid
        Image.fromarray(drawn)  # a valid RGB picture
