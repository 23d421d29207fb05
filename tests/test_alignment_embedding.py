"""Alignment parity with insightface's norm_crop, backend parity, and LFW verification."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from insightface.utils.face_align import norm_crop
from PIL import Image

from tests.conftest import LFW
from umo_core.faces.alignment import align_faces
from umo_core.images import load_image

# Stated tolerance: bilinear interpolation in float (ours) versus cv2's fixed-point bilinear.
ALIGN_MAX_ABS = 2.0 / 255
ALIGN_MEAN_ABS = 1.0 / 255
PHOTOS = ["t1_six_people.jpg", "Rob_Lowe_0001.jpg", "Rob_Lowe_0002.jpg", "Nathalie_Baye_0002.jpg",
          "Mary_Katherine_Smart_0001_5k.jpg", "Teresa_Williams_0001_1k.jpg"]


def _faces_and_crops(face_model, path):
    image = load_image(path)
    faces = face_model.detect(image)[0]
    return image, faces, align_faces(torch.from_numpy(image).float() / 255.0, faces.keypoints)


@pytest.mark.parametrize("name", PHOTOS)
def test_alignment_matches_norm_crop(face_model, photos, name):
    image, faces, crops = _faces_and_crops(face_model, photos / name)
    assert len(faces) >= 1
    for keypoints, crop in zip(faces.keypoints, crops):
        expected = norm_crop(image, keypoints).astype(np.float32) / 255.0
        difference = np.abs(crop.permute(1, 2, 0).numpy() - expected)
        assert difference.max() <= ALIGN_MAX_ABS
        assert difference.mean() <= ALIGN_MEAN_ABS


def test_sampling_grid_is_torch_affine_grid(face_model, photos):
    """The NumPy grid (torch's affine_grid runs on the BLAS threads) is affine_grid's, for the faces of real photos."""
    import torch.nn.functional as F

    from umo_core.faces.alignment import CROP_SIZE, sampling_grid, sampling_thetas

    image = load_image(photos / "t1_six_people.jpg")
    thetas = sampling_thetas(face_model.detect(image)[0].keypoints.astype(np.float64), image.shape[:2])
    expected = F.affine_grid(torch.from_numpy(thetas).float(), [len(thetas), 3, CROP_SIZE, CROP_SIZE],
                             align_corners=False)
    assert len(thetas) == 6
    np.testing.assert_allclose(sampling_grid(thetas), expected.numpy(), rtol=0, atol=1e-6)


def test_alignment_passes_gradients_to_the_image(face_model, photos):
    image = load_image(photos / "Rob_Lowe_0001.jpg")
    faces = face_model.detect(image)[0]
    pixels = (torch.from_numpy(image).float() / 255.0).requires_grad_(True)
    align_faces(pixels, faces.keypoints).sum().backward()
    assert pixels.grad.abs().sum() > 0


def test_backends_agree_on_real_faces(face_model, torch_face_model, photos):
    for name in PHOTOS:
        _, faces, crops = _faces_and_crops(face_model, photos / name)
        onnx = face_model.embedder.embed(crops)
        torch_ = torch_face_model.embedder.embed(crops)
        cosines = (onnx * torch_).sum(dim=1)
        assert (cosines >= 0.999).all(), (name, cosines)


def test_fixed_batch_graph_embeds_each_face_separately(face_model, torch_face_model, photos):
    """The fixture recogniser's graph is fixed at batch 1: a batch of six must not mix faces."""
    _, _, crops = _faces_and_crops(face_model, photos / "t1_six_people.jpg")
    for model in (face_model, torch_face_model):
        together = model.embedder.embed(crops)
        one_by_one = torch.cat([model.embedder.embed(crops[i : i + 1]) for i in range(len(crops))])
        assert together.shape == (6, 128)
        torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=0)


def _lfw_embeddings(model):
    paths = sorted(LFW.glob("*.jpg"))
    crops = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])).float() / 255.0
    return [p.stem.rsplit("_", 1)[0] for p in paths], model.embedder.embed(crops.permute(0, 3, 1, 2))


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_lfw_same_person_pairs_beat_every_different_person_pair(face_model, torch_face_model, assets, backend):
    model = face_model if backend == "onnx" else torch_face_model
    people, embeddings = _lfw_embeddings(model)
    assert len(people) == 20
    similarity = embeddings @ embeddings.T
    same, different = [], []
    for i, j in itertools.combinations(range(len(people)), 2):
        (same if people[i] == people[j] else different).append(similarity[i, j].item())
    assert min(same) > max(different), (min(same), max(different))
