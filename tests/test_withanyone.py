"""WithAnyone's optional ID losses on real photos: the GT-aligned loss, InfoNCE and the negative bank."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from umo_core import UMOError
from umo_core.faces.withanyone import (
    contrastive_id_loss,
    gt_aligned_embeddings,
    gt_aligned_id_loss,
    negatives_for,
    paired_with_references,
    reference_bank,
)
from umo_core.images import float_image, load_image


def _batch(*arrays: np.ndarray) -> torch.Tensor:
    return torch.stack([float_image(a) for a in arrays])


@pytest.fixture(scope="module")
def lfw(photos):
    """Five single-face 250x250 LFW photos (faces at about the same place); Rob Lowe twice."""
    names = ["Rob_Lowe_0001", "Rob_Lowe_0002", "Nathalie_Baye_0002", "Mary_Katherine_Smart_0001_5k",
             "Teresa_Williams_0001_1k"]
    return {name: load_image(photos / f"{name}.jpg") for name in names}


def test_gt_aligned_loss_small_for_the_ground_truth_large_for_another_person(face_model, torch_face_model, lfw):
    truth = face_model.analyse(lfw["Rob_Lowe_0001"])
    own = gt_aligned_id_loss(_batch(lfw["Rob_Lowe_0001"]), truth, torch_face_model)
    other = gt_aligned_id_loss(_batch(lfw["Nathalie_Baye_0002"]), truth, torch_face_model)
    assert own.item() < 0.01 and other.item() > 0.8, (own, other)
    # The batch mean is the mean of the per-image losses, each against its own ground truth.
    both = gt_aligned_id_loss(_batch(lfw["Rob_Lowe_0001"], lfw["Nathalie_Baye_0002"]), truth * 2, torch_face_model)
    assert both.item() == pytest.approx((own.item() + other.item()) / 2, abs=1e-5)


def test_gradient_reaches_the_face_pixels_only(face_model, torch_face_model, lfw):
    truth = face_model.analyse(lfw["Rob_Lowe_0002"])
    images = _batch(lfw["Nathalie_Baye_0002"]).requires_grad_(True)
    gt_aligned_id_loss(images, truth, torch_face_model).backward()
    gradient = images.grad[0].abs().sum(dim=-1)
    assert torch.isfinite(images.grad).all()
    x1, y1, x2, y2 = truth[0].faces.boxes[0].astype(int)
    assert gradient[y1:y2, x1:x2].sum() > 0
    assert gradient[:20, :20].sum() == 0 and gradient[-20:, -20:].sum() == 0  # corners: no face there


def test_six_faces_and_a_ground_truth_detected_at_another_size(face_model, torch_face_model, photos):
    """The ground truth's keypoints (found on the 1280 px photo) are rescaled to the 640 px image."""
    photo = load_image(photos / "t1_six_people.jpg")
    truth = face_model.analyse(photo)
    assert len(truth[0].faces) == 6
    small = np.asarray(Image.fromarray(photo).resize((640, 443), Image.LANCZOS))
    rescaled = gt_aligned_id_loss(_batch(small), truth, torch_face_model, ground_truth_hw=photo.shape[:2])
    unscaled = gt_aligned_id_loss(_batch(small), truth, torch_face_model)  # keypoints taken as they are
    assert rescaled.item() < 0.1 < 0.7 < unscaled.item(), (rescaled, unscaled)
    rows = gt_aligned_embeddings(_batch(small), truth, torch_face_model, ground_truth_hw=photo.shape[:2])[0]
    cosines = rows @ truth[0].embeddings.T
    assert (cosines.argmax(dim=1) == torch.arange(6)).all()  # row t is ground-truth face t


def test_ground_truth_without_face(face_model, torch_face_model, photos, lfw):
    landscape = load_image(photos / "no_face_view.jpg")
    landscape = np.asarray(Image.fromarray(landscape).resize((250, 250)))
    empty = face_model.analyse(landscape)
    assert len(empty[0].faces) == 0
    images = _batch(lfw["Nathalie_Baye_0002"]).requires_grad_(True)
    loss = gt_aligned_id_loss(images, empty, torch_face_model)
    assert loss.item() == 0.0 and not loss.requires_grad
    # In a batch, an image whose ground truth has no face takes no part in the mean.
    truth = face_model.analyse(lfw["Rob_Lowe_0001"])
    alone = gt_aligned_id_loss(_batch(lfw["Rob_Lowe_0002"]), truth, torch_face_model)
    mixed = gt_aligned_id_loss(_batch(lfw["Rob_Lowe_0002"], lfw["Nathalie_Baye_0002"]), truth + empty,
                               torch_face_model)
    assert mixed.item() == pytest.approx(alone.item(), abs=1e-6)
    with pytest.raises(ValueError, match="2 ground truths for 1 images"):
        gt_aligned_id_loss(images, truth + empty, torch_face_model)


def test_infonce_value_by_hand():
    axes = torch.eye(4)
    generated, positives, negatives = axes[:1], axes[:1], axes[1:3]
    expected = -math.log(math.exp(1 / 0.5) / (math.exp(1 / 0.5) + 2))  # cosines 1, 0, 0 at temperature 0.5
    assert contrastive_id_loss(generated, positives, negatives, 0.5).item() == pytest.approx(expected, rel=1e-5)
    # The other rows' positives are negatives too: two rows with no bank give the same value per row.
    two = contrastive_id_loss(axes[:2], axes[:2] * 3, axes[:0], 0.5)  # keys are normalised
    assert two.item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 1)), rel=1e-5)


def test_infonce_empty_cases_and_bad_arguments():
    axes = torch.eye(3)
    assert contrastive_id_loss(axes[:1], axes[:1], axes[:0]).item() == 0.0  # nothing to contrast
    none = contrastive_id_loss(axes[:0], axes[:0], axes[1:])
    assert none.item() == 0.0 and not none.requires_grad
    with pytest.raises(UMOError, match="temperature must be > 0"):
        contrastive_id_loss(axes[:1], axes[:1], axes[1:], temperature=0.0)
    with pytest.raises(ValueError, match="do not fit"):
        contrastive_id_loss(axes[:2], axes[:1], axes[1:])


def test_contrastive_lower_for_the_right_people_and_gradient_to_pixels(face_model, torch_face_model, group, lfw):
    image, faces, references = group
    identities = face_model.identities(references)
    bank = reference_bank([face_model.identities(list(lfw.values())).embeddings], [None])
    negatives = negatives_for(bank, identities.embeddings, None)
    assert len(negatives) == 5  # none of the LFW people is in the group photo
    pixels = float_image(image).requires_grad_(True)
    generated = torch_face_model.embed_faces(pixels, faces)
    matched, positives = paired_with_references(generated, identities.embeddings)
    assert len(matched) == 6
    right = contrastive_id_loss(matched, positives, negatives)
    swapped = contrastive_id_loss(matched, positives.roll(1, dims=0), negatives)
    assert right.item() < 0.5 < 5 < swapped.item(), (right, swapped)
    right.backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0


def test_pairing_is_the_hungarian_assignment():
    references = torch.eye(3)
    faces = F.normalize(torch.tensor([[0.1, 0.0, 1.0], [1.0, 0.2, 0.0]]), dim=-1)  # people 3 and 1
    matched, positives = paired_with_references(faces, references)
    assert torch.equal(matched, faces[[1, 0]]) and torch.equal(positives, references[[0, 2]])


@pytest.fixture(scope="module")
def rows(face_model, lfw):
    """Three manifest rows: (Rob 1, Nathalie), (Rob 2, Mary), (Teresa)."""
    photos = [["Rob_Lowe_0001", "Nathalie_Baye_0002"], ["Rob_Lowe_0002", "Mary_Katherine_Smart_0001_5k"],
              ["Teresa_Williams_0001_1k"]]
    return [face_model.identities([lfw[name] for name in row]) for row in photos]


def _which(negatives: torch.Tensor, bank_embeddings: torch.Tensor) -> list[int]:
    return [int((bank_embeddings == row).all(dim=1).nonzero()) for row in negatives]


def test_negatives_exclude_the_same_identity_name(rows):
    bank = reference_bank([r.embeddings for r in rows], [["rob", "nathalie"], ["rob", "mary"], ["teresa"]])
    negatives = negatives_for(bank, rows[0].embeddings, ["rob", "nathalie"])
    assert _which(negatives, bank.embeddings) == [3, 4]  # Mary and Teresa; not Rob's other photo
    # Names decide, not the embeddings: with the second person named "teresa", Nathalie's own photo
    # (named "nathalie" in the bank) is a negative and Teresa's photo is not.
    assert _which(negatives_for(bank, rows[0].embeddings, ["rob", "teresa"]), bank.embeddings) == [1, 3]


def test_negatives_without_names_use_the_cosine(rows):
    bank = reference_bank([r.embeddings for r in rows], [None, ["rob", "mary"], None])
    # Row 1 has no names: Rob's second photo is recognised as the same person (cosine ~0.7).
    assert _which(negatives_for(bank, rows[0].embeddings, None), bank.embeddings) == [3, 4]
    assert len(negatives_for(bank, rows[0].embeddings, None, same_person_cosine=-1.0)) == 0
    only_own_row = reference_bank([rows[0].embeddings], [None])
    assert negatives_for(only_own_row, rows[0].embeddings, None).shape == (0, rows[0].embeddings.shape[1])


def test_bank_names_must_fit_the_references(rows):
    with pytest.raises(UMOError, match="data row 2: 1 identity names for 2 references"):
        reference_bank([r.embeddings for r in rows], [None, ["rob"], None])
