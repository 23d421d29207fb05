"""Detection on real photos: group scenes, tight head-shots, small faces, every input kind."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from umo_core.images import load_image, to_rgb_uint8


def test_group_photo_has_six_faces(face_model, photos):
    faces = face_model.detect(photos / "t1_six_people.jpg")[0]
    assert len(faces) == 6
    assert faces.keypoints.shape == (6, 5, 2)
    assert (faces.scores > 0.5).all()
    inside = (faces.keypoints[..., 0] >= faces.boxes[:, None, 0]) & (faces.keypoints[..., 0] <= faces.boxes[:, None, 2])
    assert inside.all()


def test_no_face_photo(face_model, torch_face_model, photos):
    assert len(face_model.detect(photos / "no_face_view.jpg")[0]) == 0
    for model in (face_model, torch_face_model):  # a batch without any face embeds nothing, without failing
        (analysed,) = model.analyse(photos / "no_face_view.jpg")
        assert len(analysed.faces) == 0 and analysed.embeddings.shape == (0, 128)


def test_tight_head_shot_filling_the_frame(face_model, photos):
    """A reference cropped inside the face box (forehead and chin cut) and enlarged to 512 px."""
    image = load_image(photos / "Rob_Lowe_0001.jpg")
    x1, y1, x2, y2 = face_model.detect(image)[0].boxes[0]
    w, h = x2 - x1, y2 - y1
    tight = Image.fromarray(image).crop((int(x1 + 0.1 * w), int(y1 + 0.1 * h), int(x2 - 0.1 * w), int(y2 - 0.1 * h)))
    tight = np.asarray(tight.resize((512, 512), Image.BICUBIC))
    faces = face_model.detect(tight)[0]
    assert len(faces) == 1
    assert faces.boxes[0, 2] - faces.boxes[0, 0] > 300  # the face is the whole frame


def test_small_faces_in_a_large_scene(face_model, photos):
    """The group shrunk to a quarter in a 2048 px scene: faces about 28 px wide."""
    group = Image.open(photos / "t1_six_people.jpg").convert("RGB")
    small = group.resize((group.width // 4, group.height // 4), Image.LANCZOS)
    scene = Image.new("RGB", (2048, 2048), (90, 90, 90))
    scene.paste(small, (300, 1200))
    faces = face_model.detect(np.asarray(scene))[0]
    assert len(faces) == 6
    assert (faces.boxes[:, 2] - faces.boxes[:, 0]).max() < 40


def test_every_input_kind_gives_the_same_faces(face_model, photos):
    rgb = load_image(photos / "Rob_Lowe_0002.jpg")
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    tensor = torch.from_numpy(rgb).float()[None] / 255.0  # ComfyUI IMAGE [B,H,W,3]
    results = face_model.detect([rgb, rgba, tensor[0].numpy(), Image.fromarray(rgb)]) + face_model.detect(tensor)
    for faces in results:
        assert len(faces) == 1
        np.testing.assert_allclose(faces.boxes, results[0].boxes, atol=2.0)
    assert len(face_model.detect(grey)[0]) == 1


def test_image_conversion_shapes():
    grey = np.zeros((10, 12), np.uint8)
    rgba = np.zeros((10, 12, 4), np.uint8)  # fully transparent -> white
    batch = torch.rand(3, 10, 12, 3)
    assert to_rgb_uint8(grey)[0].shape == (10, 12, 3)
    assert (to_rgb_uint8(rgba)[0] == 255).all()
    assert len(to_rgb_uint8(batch)) == 3


def test_nms_is_torchvision_nms(face_model, photos):
    """Our NMS (torchvision's import costs 2.5 s of start-up) keeps exactly what torchvision.ops.nms keeps:
    on the raw candidates of real photos, and on random boxes with tied scores and empty boxes."""
    from torchvision.ops import nms as torchvision_nms

    from umo_core.faces.detection import NMS_IOU, detection_sizes, nms

    cases = []
    for name in ("t1_six_people.jpg", "Rob_Lowe_0001.jpg"):
        image = load_image(photos / name)
        passes = [face_model.detector._detect_at(image, size) for size in detection_sizes(*image.shape[:2])]
        boxes, _, scores = (np.concatenate(parts) for parts in zip(*passes))
        cases.append((boxes.astype(np.float32), scores.astype(np.float32)))
    rng = np.random.default_rng(0)
    for _ in range(200):
        corners = rng.uniform(0, 100, (rng.integers(0, 60), 2)).round()
        boxes = np.concatenate([corners, corners + rng.uniform(0, 40, corners.shape).round()], axis=1)
        cases.append((boxes.astype(np.float32), rng.uniform(0, 1, len(boxes)).round(1).astype(np.float32)))
    assert len(cases[0][1]) > 6  # the photos' passes overlap: NMS has work to do
    for boxes, scores in cases:
        expected = torchvision_nms(torch.from_numpy(boxes), torch.from_numpy(scores), NMS_IOU).numpy()
        np.testing.assert_array_equal(nms(boxes, scores, NMS_IOU), expected)


def test_detection_resize_is_pils_bilinear(photos):
    """The passes' resize (torch's uint8 kernel, for speed) is PIL's BILINEAR, rounding aside: at most 1 apart
    and under 0.5 % of the values off, enlarging (a 250 px head-shot) and shrinking (the group photo)."""
    from umo_core.faces.detection import resize_bilinear

    for name, sizes in (("Rob_Lowe_0001.jpg", [(640, 640), (333, 517), (128, 128)]),
                        ("t1_six_people.jpg", [(443, 640), (88, 128), (1280, 1849)])):
        image = np.array(load_image(photos / name))
        for height, width in sizes:
            ours = resize_bilinear(image, height, width).transpose(1, 2, 0).astype(int)
            pils = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR)).astype(int)
            difference = np.abs(ours - pils)
            assert difference.max() <= 1 and (difference > 0).mean() < 0.005
