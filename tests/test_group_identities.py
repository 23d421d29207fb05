"""The six people of the group photo as references: correct assignment everywhere, and the
differentiable reward's gradient lies in the faces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from umo_core import identity_reward
from umo_core.faces.matching import assign, similarity_matrix
from umo_core.images import load_image


def _centres(boxes):
    return np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)


def _nearest(points, boxes):
    centres = _centres(boxes)
    return [int(np.argmin(((centres - p) ** 2).sum(1))) for p in points]


def test_references_match_their_own_faces_in_the_photo(face_model, group):
    image, faces, references = group
    identities = face_model.identities(references)
    analysed = face_model.analyse(image)[0]
    assignment = assign(similarity_matrix(identities.embeddings, analysed.embeddings))
    expected = _nearest(_centres(faces.boxes), analysed.faces.boxes)
    assert assignment == expected


def test_mirrored_photo(face_model, group):
    image, faces, references = group
    identities = face_model.identities(references)
    mirrored = np.ascontiguousarray(image[:, ::-1])
    analysed = face_model.analyse(mirrored)[0]
    assert len(analysed.faces) == 6
    centres = _centres(faces.boxes)
    centres[:, 0] = image.shape[1] - centres[:, 0]
    assignment = assign(similarity_matrix(identities.embeddings, analysed.embeddings))
    assert assignment == _nearest(centres, analysed.faces.boxes)


def test_shuffled_composite(face_model, group):
    """Each person's reference crop pasted into a 3x2 grid in a random order."""
    _, _, references = group
    identities = face_model.identities(references)
    order = np.random.default_rng(7).permutation(6)
    cell = 300
    composite = Image.new("RGB", (3 * cell, 2 * cell), (128, 128, 128))
    slot_centres = []
    for slot, person in enumerate(order):
        tile = Image.fromarray(references[person])
        tile.thumbnail((cell, cell))
        x, y = (slot % 3) * cell, (slot // 3) * cell
        composite.paste(tile, (x, y))
        slot_centres.append((person, x + tile.width / 2, y + tile.height / 2))
    analysed = face_model.analyse(np.asarray(composite))[0]
    assert len(analysed.faces) == 6
    assignment = assign(similarity_matrix(identities.embeddings, analysed.embeddings))
    by_person = {person: (cx, cy) for person, cx, cy in slot_centres}
    assert assignment == _nearest([by_person[k] for k in range(6)], analysed.faces.boxes)


def test_reference_with_several_faces_uses_the_largest(face_model, photos):
    identities = face_model.identities([photos / "t1_six_people.jpg"])
    assert "6 faces" in identities.notes[0] and "largest" in identities.notes[0]
    faces = face_model.detect(photos / "t1_six_people.jpg")[0]
    np.testing.assert_allclose(identities.faces.boxes[0], faces.boxes[np.argmax(faces.areas())])


def test_reference_without_a_face_is_an_error_naming_it(face_model, photos):
    from umo_core import UMOError

    with pytest.raises(UMOError, match="reference 2: no face found"):
        face_model.identities([photos / "Rob_Lowe_0001.jpg", photos / "no_face_view.jpg"])


def test_reward_gradient_lies_inside_the_faces(torch_face_model, photos):
    references = [photos / "Rob_Lowe_0001.jpg", photos / "Nathalie_Baye_0002.jpg"]
    identities = torch_face_model.identities(references)
    image = torch.from_numpy(load_image(photos / "t1_six_people.jpg")).float().div(255.0)
    pixels = image[None].clone().requires_grad_(True)
    result = identity_reward(pixels, identities, torch_face_model, kind="mimr")
    result.values.sum().backward()
    gradient = pixels.grad[0].abs().sum(dim=-1)
    assert torch.isfinite(pixels.grad).all() and gradient.sum() > 0
    mask = torch.zeros_like(gradient, dtype=torch.bool)
    for x1, y1, x2, y2 in result.detections[0].boxes:
        w, h = x2 - x1, y2 - y1  # the aligned crop reaches a little beyond the detector's box
        mask[int(max(0, y1 - 0.3 * h)):int(y2 + 0.3 * h), int(max(0, x1 - 0.3 * w)):int(x2 + 0.3 * w)] = True
    inside = gradient[mask].sum() / gradient.sum()
    assert inside > 0.99, inside.item()
    assert mask.float().mean() < 0.2  # the boxes are a small part of the photo


def test_reward_of_an_image_without_faces_is_zero(torch_face_model, photos):
    identities = torch_face_model.identities([photos / "Rob_Lowe_0001.jpg"])
    image = torch.from_numpy(load_image(photos / "no_face_view.jpg")).float().div(255.0)[None]
    result = identity_reward(image, identities, torch_face_model)
    assert result.values.tolist() == [0.0] and len(result.detections[0]) == 0
    assert result.matches[0].missing == [0] and result.matches[0].coverage == 0.0


def test_reward_is_higher_for_the_right_person(torch_face_model, photos):
    identities = torch_face_model.identities([photos / "Rob_Lowe_0001.jpg"])
    right = torch.from_numpy(load_image(photos / "Rob_Lowe_0002.jpg")).float().div(255.0)
    wrong = torch.from_numpy(load_image(photos / "Nathalie_Baye_0002.jpg")).float().div(255.0)
    values = identity_reward(torch.stack([right, wrong]), identities, torch_face_model, kind="sir").values
    assert values[0] > 0.4 > values[1]
