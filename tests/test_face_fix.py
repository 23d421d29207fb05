"""The face fix's library part on real photos: which faces are fixed toward whom, the windows, the feathered
paste and the before/after report.

The re-sampling is a stand-in here (the ComfyUI node's samples with the diffusion model, tested in
tests/comfyui/test_face_fix_comfyui.py): an "oracle" that returns the same window of a photo showing the right
person, or of one showing the wrong person. It tests that the fix puts what the sampler returns in the right
place and measures it honestly; no random-weight model could make a face look more like anyone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.group_photos import group_photo, lfw_face
from umo_core import UMOError
from umo_core.faces.face_fix import (
    FaceFix,
    Window,
    crop_window,
    feather_mask,
    fix_faces,
    fix_report,
    guide_shape,
    paste,
    plan_fixes,
    resize,
)
from umo_core.faces.face_model import Identities
from umo_core.images import float_image, load_image

ANGELA, ANDERS, AKHMED = "Angela_Bassett", "Anders_Fogh_Rasmussen", "Akhmed_Zakayev"
GUIDE, CONTEXT, FEATHER, MULTIPLE = 256, 0.5, 12, 16


def photo(*people: str) -> torch.Tensor:
    """A group photo [H,W,3] in 0..1 of these LFW faces ("Angela_Bassett_1"), left to right."""
    return float_image(group_photo([lfw_face(person) for person in people]))


@pytest.fixture(scope="module")
def people(face_model, assets) -> Identities:
    """R1 = Angela Bassett, R2 = Anders Fogh Rasmussen, each from another photo than the group photos'."""
    return face_model.identities([group_photo([lfw_face(f"{ANGELA}_2")]), group_photo([lfw_face(f"{ANDERS}_2")])])


def oracle(truth: torch.Tensor, calls: list[FaceFix]):
    """A stand-in sampler: the face's window of `truth` (a photo with the same layout), at the crop's size."""

    def resample(crop: torch.Tensor, face: FaceFix) -> torch.Tensor:
        calls.append(face)
        assert crop.shape[2] == 3 and crop.shape[0] % MULTIPLE == 0 and crop.shape[1] % MULTIPLE == 0
        return resize(face.window.of(truth), tuple(crop.shape[:2]))

    return resample


def fix(face_model, people, images: torch.Tensor, resample, only_below: float):
    """Plan, then fix, as the node does: (fixed images, masks, plans)."""
    plans = plan_fixes(face_model, people, images, CONTEXT, only_below)
    fixed, masks = fix_faces(face_model, people, images, plans, resample, GUIDE, FEATHER, MULTIPLE)
    return fixed, masks, plans


def _outside(image: torch.Tensor, windows: list[Window]) -> torch.Tensor:
    keep = torch.ones(image.shape[:2], dtype=torch.bool)
    for window in windows:
        window.of(keep).fill_(False)
    return image[keep]


def test_a_face_of_the_wrong_person_is_matched_and_planned(face_model, people):
    """Angela on the left is right; on the right, where Anders should be, is Akhmed Zakayev: the match gives that
    face to R2 with a cosine below the same-person threshold, so only it is fixed with only_below, toward R2."""
    for order in ([f"{ANGELA}_1", f"{AKHMED}_1"], [f"{AKHMED}_1", f"{ANGELA}_1"]):
        image = photo(*order)
        plan = plan_fixes(face_model, people, image[None], CONTEXT, only_below=0.45)[0]
        by_reference = {face.reference: face for face in plan.faces}
        centre = {k: (face.window.left + face.window.right) / 2 for k, face in by_reference.items()}
        angela_left = order[0].startswith(ANGELA)
        assert (centre[0] < centre[1]) == angela_left  # R1 is Angela's face wherever she stands
        assert by_reference[0].before > 0.6 and not by_reference[0].fixed
        assert by_reference[1].before < face_model.same_person_threshold and by_reference[1].fixed
        report = fix_report([plan], 0.45)
        rows = report.splitlines()
        assert rows[0].split() == ["image", "face", "toward", "before", "after", "result"]
        wrong = next(row for row in rows[1:] if "R2" in row)
        assert wrong.split()[3].endswith("?")  # doubtful before the fix


def test_fix_pastes_the_sampled_face_inside_the_window_only(face_model, people):
    """The oracle puts Anders where Akhmed was: R2's cosine rises on the re-detected face, Angela's face (kept) and
    every pixel outside the re-sampled window are bit-identical to the input."""
    image, truth = photo(f"{ANGELA}_1", f"{AKHMED}_1"), photo(f"{ANGELA}_1", f"{ANDERS}_1")
    calls: list[FaceFix] = []
    fixed, masks, plans = fix(face_model, people, image[None], oracle(truth, calls), only_below=0.45)
    assert [face.reference for face in calls] == [1]
    window = calls[0].window
    assert torch.equal(_outside(fixed[0], [window]), _outside(image, [window]))
    assert torch.equal(_outside(masks[0], [window]), torch.zeros_like(_outside(masks[0], [window])))
    assert masks[0].max() == 1 and (window.of(masks[0]) > 0).all()
    face = calls[0]
    assert face.after is not None and face.after > face_model.same_person_threshold > face.before
    report = fix_report(plans, 0.45)
    assert "better (+" in report and "WORSE" not in report and "kept (at or above only_below 0.45)" in report


def test_a_face_that_gets_worse_is_reported(face_model, people):
    """Every matched face is fixed (only_below 0); the stand-in puts Akhmed where Angela was: flagged WORSE."""
    image, wrong = photo(f"{ANGELA}_1", f"{ANDERS}_1"), photo(f"{AKHMED}_1", f"{ANDERS}_1")
    calls: list[FaceFix] = []
    _, _, plans = fix(face_model, people, image[None], oracle(wrong, calls), only_below=0)
    assert sorted(face.reference for face in calls) == [0, 1]
    angela = next(face for face in plans[0].faces if face.reference == 0)
    assert angela.worse
    row = next(line for line in fix_report(plans, 0).splitlines() if "R1" in line)
    assert "WORSE (-" in row


def test_a_batch_with_nothing_to_fix_in_one_image_passes_it_through(face_model, people):
    """Image 1 shows the right people (nothing below only_below), image 2 has Akhmed in R2's place: image 1 comes
    back bit for bit with an empty mask, image 2 gets R2's face fixed."""
    right, wrong = photo(f"{ANGELA}_1", f"{ANDERS}_1"), photo(f"{AKHMED}_1", f"{ANGELA}_1")
    calls: list[FaceFix] = []
    fixed, masks, plans = fix(face_model, people, torch.stack([right, wrong]),
                              oracle(photo(f"{ANDERS}_1", f"{ANGELA}_1"), calls), only_below=0.45)
    assert torch.equal(fixed[0], right) and not masks[0].any()
    assert [(face.image, face.reference) for face in calls] == [(1, 1)]
    assert not torch.equal(fixed[1], wrong)
    assert all(face.after is None for face in plans[0].faces)


def test_missing_people_and_unmatched_faces_are_left_alone(face_model, people):
    """One face (Angela) for two people: R2 is reported missing. Three faces for two people: the stranger is
    matched to no one and untouched."""
    report = fix_report(plan_fixes(face_model, people, photo(f"{ANGELA}_1")[None], CONTEXT, 0.45), 0.45)
    assert "image 1: R2 not found in the image (not added)" in report
    crowd = photo(f"{ANGELA}_1", f"{AKHMED}_1", f"{ANDERS}_1")
    plan = plan_fixes(face_model, people, crowd[None], CONTEXT, 0)[0]
    assert len(plan.unmatched_faces()) == 1 and sorted(face.reference for face in plan.faces) == [0, 1]
    assert f"face {plan.unmatched_faces()[0] + 1} matched to no reference; untouched" in fix_report([plan], 0)


def test_no_face_in_any_image_is_an_error(face_model, people, photos):
    landscape = float_image(load_image(photos / "no_face_view.jpg"))
    with pytest.raises(UMOError, match=r"face fix: no face was found in the 1 image\(s\)"):
        plan_fixes(face_model, people, landscape[None], CONTEXT, 0)


def test_identities_without_photos_are_an_error(face_model, people):
    bare = Identities(people.embeddings, people.faces, None)
    with pytest.raises(UMOError, match="the identities carry no reference photos"):
        plan_fixes(face_model, bare, photo(f"{ANGELA}_1")[None], CONTEXT, 0)


def test_person_keeps_one_reference_with_its_photo(people):
    anders = people.person(1)
    assert len(anders) == 1 and torch.equal(anders.embeddings[0], people.embeddings[1])
    assert anders.photos[0] is people.photos[1] and anders.crops.shape[0] == 1


def test_crop_window_is_a_square_with_context_clipped_to_the_image():
    assert crop_window([100, 100, 140, 120], 0.5, 500, 500) == Window(80, 70, 160, 150)  # 40 px side, 20 px each way
    assert crop_window([0, 10, 40, 50], 1.0, 100, 60) == Window(0, 0, 60, 90)


def test_guide_shape_keeps_the_aspect_at_multiples():
    assert guide_shape(100, 100, 768, 16) == (768, 768)
    assert guide_shape(90, 60, 768, 16) == (768, 512)
    assert guide_shape(300, 10, 512, 16) == (512, 16)


def test_feather_mask_ramps_inside_the_image_only():
    mask = feather_mask(Window(0, 10, 20, 30), 4, 100, 100)  # the left edge is the image's
    assert mask.shape == (20, 20) and (mask > 0).all() and mask.max() == 1
    assert torch.equal(mask[10, :5], torch.ones(5))  # no ramp toward the image border
    assert torch.allclose(mask[10, -5:], torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2]))
    assert torch.allclose(mask[:5, 10], torch.tensor([0.2, 0.4, 0.6, 0.8, 1.0]))
    assert torch.equal(feather_mask(Window(5, 5, 9, 9), 0, 20, 20), torch.ones(4, 4))


def test_paste_blends_inside_the_window_and_copies_the_rest():
    generator = torch.Generator().manual_seed(0)
    image, patch = torch.rand(32, 40, 3, generator=generator), torch.rand(10, 12, 3, generator=generator)
    window = Window(5, 6, 17, 16)
    mask = feather_mask(window, 3, 32, 40)
    pasted = paste(image, patch, window, mask)
    assert torch.equal(_outside(pasted, [window]), _outside(image, [window]))
    assert torch.equal(window.of(pasted)[5, 6], patch[5, 6])  # weight 1 in the middle: the patch as it is
    assert torch.allclose(window.of(pasted)[0, 0], image[6, 5] + (patch[0, 0] - image[6, 5]) * mask[0, 0])
    assert torch.equal(image, torch.rand(32, 40, 3, generator=torch.Generator().manual_seed(0)))  # input unchanged


def test_resize_goes_to_the_shape_and_back():
    image = float_image(np.asarray(group_photo([lfw_face(f"{ANGELA}_1")])))
    assert resize(image, (100, 50)).shape == (100, 50, 3)
    assert resize(image, tuple(image.shape[:2])) is image
