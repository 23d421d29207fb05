"""identity_reward on a batch: every face of the batch in one recogniser call, the same numbers as image by image."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image

from tests.conftest import ASSETS
from umo_core import UMOError, identity_metrics, identity_reward, load_face_model
from umo_core.faces.metrics import match_metrics

SIDE = 250  # the LFW photos' size; the other images are cut to it so that they stack into one batch


def _dynamic_batch_pack(directory):
    """The fixture pack with its recogniser re-declared for any batch size, as the official packs' are:
    the graph's one Reshape to [1,-1] (which would mix a batch's faces) becomes [0,-1] (keep the batch)."""
    directory.mkdir()
    (directory / "det_500m.onnx").write_bytes((ASSETS / "models" / "det_500m.onnx").read_bytes())
    model = onnx.load(ASSETS / "models" / "mobilefacenet_128d.onnx")
    reshapes = {node.input[1] for node in model.graph.node if node.op_type == "Reshape"}
    for initializer in model.graph.initializer:
        if initializer.name in reshapes and numpy_helper.to_array(initializer).tolist() == [1, -1]:
            initializer.CopyFrom(numpy_helper.from_array(np.array([0, -1], np.int64), initializer.name))
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    del model.graph.value_info[:]
    onnx.save(model, directory / "mobilefacenet_128d_dynamic.onnx")
    return directory


@pytest.fixture(scope="module")
def dynamic_face_model(assets, tmp_path_factory):
    return load_face_model(_dynamic_batch_pack(tmp_path_factory.mktemp("packs") / "dynamic"), provider="cpu",
                           backend="torch")


@pytest.fixture(scope="module")
def batch(photos) -> torch.Tensor:
    """[4,250,250,3]: one face, a corner of the group photo (several faces), a landscape (none), one face."""
    group = Image.open(photos / "t1_six_people.jpg").convert("RGB")
    group = group.resize((group.width * SIDE // group.height, SIDE)).crop((0, 0, SIDE, SIDE))
    landscape = Image.open(photos / "no_face_view.jpg").convert("RGB").crop((0, 0, SIDE, SIDE))
    images = [Image.open(photos / "Rob_Lowe_0002.jpg").convert("RGB"), group, landscape,
              Image.open(photos / "Nathalie_Baye_0002.jpg").convert("RGB")]
    return torch.stack([torch.from_numpy(np.asarray(image, np.float32) / 255) for image in images])


def _reward_and_gradient(images, identities, face_model):
    pixels = images.clone().requires_grad_(True)
    result = identity_reward(pixels, identities, face_model)
    if not result.values.requires_grad:  # no face in any image: nothing to differentiate
        return result, torch.zeros_like(pixels)
    result.values.sum().backward()
    return result, pixels.grad


@pytest.mark.parametrize("model", ["torch_face_model", "dynamic_face_model"])
def test_batched_reward_is_the_per_image_reward(model, batch, photos, request):
    """The fixture recogniser takes one face per call (chunks of 1), the re-declared one all faces at once:
    both give, for the batch, the values, embeddings, assignments and pixel gradients of image-by-image calls."""
    face_model = request.getfixturevalue(model)
    assert face_model.torch_embedder.batch_size == (1 if model == "torch_face_model" else None)
    identities = face_model.identities([photos / "Rob_Lowe_0001.jpg", photos / "Nathalie_Baye_0002.jpg"])
    batched, gradient = _reward_and_gradient(batch, identities, face_model)
    counts = [len(detections) for detections in batched.detections]
    assert counts[0] == 1 and counts[1] >= 2 and counts[2] == 0 and counts[3] == 1, counts
    for i in range(len(batch)):
        alone, alone_gradient = _reward_and_gradient(batch[i:i + 1], identities, face_model)
        torch.testing.assert_close(batched.values[i:i + 1], alone.values, atol=1e-6, rtol=0)
        torch.testing.assert_close(batched.matches[i].face_embeddings, alone.matches[0].face_embeddings, atol=1e-5,
                                   rtol=0)
        assert batched.matches[i].assignment == alone.matches[0].assignment
        torch.testing.assert_close(gradient[i:i + 1], alone_gradient, atol=1e-6, rtol=1e-4)
    assert batched.values[2] == 0 and not gradient[2].any()  # no face: reward 0, no gradient
    assert gradient[0].abs().sum() > 0 and gradient[1].abs().sum() > 0


def test_one_set_of_references_per_image(torch_face_model, batch, photos):
    rob = torch_face_model.identities([photos / "Rob_Lowe_0001.jpg"])
    nathalie = torch_face_model.identities([photos / "Nathalie_Baye_0002.jpg"])
    mixed = identity_reward(batch, [rob, nathalie, rob, nathalie], torch_face_model)
    for i, identities in enumerate([rob, nathalie, rob, nathalie]):
        alone = identity_reward(batch[i:i + 1], identities, torch_face_model)
        torch.testing.assert_close(mixed.values[i:i + 1], alone.values, atol=1e-6, rtol=0)
    assert mixed.values[0] > 0.4 and mixed.values[3] > 0.4  # each image scored against its own person
    with pytest.raises(UMOError, match="2 sets of references for 4 images"):
        identity_reward(batch, [rob, nathalie], torch_face_model)


def test_metrics_from_the_reward_equal_identity_metrics(torch_face_model, batch, photos):
    """match_metrics on a RewardResult's own matches (the trainer's log) gives exactly the metrics that
    identity_metrics computes from the embeddings alone."""
    identities = torch_face_model.identities([photos / "Rob_Lowe_0001.jpg", photos / "Nathalie_Baye_0002.jpg"])
    result, _ = _reward_and_gradient(batch, identities, torch_face_model)
    references, threshold = identities.embeddings, torch_face_model.same_person_threshold
    for match in result.matches:
        faces = match.face_embeddings.detach().float()
        assert match_metrics(match) == identity_metrics(references, faces, threshold)["metrics"]
