"""Identity guidance: the reward's gradient w.r.t. a latent, in image space and through a real VAE decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from tests.tiny_models import tiny_vae
from umo_core.faces.guidance import STEP_REPRODUCIBILITY, FaceReuse, guide, reward_gradient
from umo_core.faces.metrics import identity_metrics
from umo_core.images import load_image


def image_decoder(latent: torch.Tensor) -> torch.Tensor:
    """The identity 'decoder': the latent is the image itself, [1,3,H,W] -> [1,H,W,3]."""
    return latent.permute(0, 2, 3, 1).clamp(0, 1)


def _as_latent(image: np.ndarray) -> torch.Tensor:
    return torch.tensor(image, dtype=torch.float32).div(255).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def degraded(photos):
    """Rob Lowe's second photo, blurred: the identity is weakened but the face still detected."""
    image = Image.open(photos / "Rob_Lowe_0002.jpg").convert("RGB").filter(ImageFilter.GaussianBlur(2.5))
    return _as_latent(np.asarray(image))


def _scores(latent, identities, face_model):
    analysed = face_model.analyse(image_decoder(latent))[0]
    metrics = identity_metrics(identities.embeddings, analysed.embeddings, face_model.same_person_threshold)["metrics"]
    return metrics["mimr"], metrics["id_sim_matched"]


def test_guidance_steps_raise_mimr_and_matched_id_sim(torch_face_model, photos, degraded):
    identities = torch_face_model.identities([photos / "Rob_Lowe_0001.jpg", photos / "Nathalie_Baye_0002.jpg"])
    latent = degraded
    history = [_scores(latent, identities, torch_face_model)]
    for _ in range(6):
        latent, _ = guide(latent, image_decoder, identities, torch_face_model, strength=0.002)
        latent = latent.clamp(0, 1)
        history.append(_scores(latent, identities, torch_face_model))
    mimr = [h[0] for h in history]
    id_sim = [h[1] for h in history]
    assert mimr[-1] > mimr[0] + 0.2 and id_sim[-1] > id_sim[0] + 5, history
    assert all(b >= a - 1e-3 for a, b in zip(mimr, mimr[1:])), history  # MIMR rises at every step
    assert sum(b < a for a, b in zip(id_sim, id_sim[1:])) <= 1, history  # matched ID-Sim (nearly) too


def test_strength_zero_and_no_face_leave_the_estimate_unchanged(torch_face_model, photos, degraded):
    identities = torch_face_model.identities([photos / "Rob_Lowe_0001.jpg"])
    unchanged, _ = guide(degraded, image_decoder, identities, torch_face_model, strength=0.0)
    assert torch.equal(unchanged, degraded)
    landscape = _as_latent(load_image(photos / "no_face_view.jpg"))
    result = reward_gradient(landscape, image_decoder, identities, torch_face_model)
    assert result.reward == 0.0 and len(result.faces) == 0 and not result.gradient.any()
    same, _ = guide(landscape, image_decoder, identities, torch_face_model, strength=1.0)
    assert torch.equal(same, landscape)


@pytest.fixture(scope="module")
def blurred_group(photos):
    """The six-person group photo, blurred: six faces, so the gradient goes through six embeddings."""
    group = Image.open(photos / "t1_six_people.jpg").convert("RGB").resize((640, 443))
    return _as_latent(np.asarray(group.filter(ImageFilter.GaussianBlur(1.5))))


def _guided_with_threads(threads, latent, identities, face_model, strength):
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        guided, (result,) = guide(latent, image_decoder, identities, face_model, strength)
    finally:
        torch.set_num_threads(saved)
    return guided - latent, result


@pytest.mark.parametrize("scene", ["one face", "six faces"])
def test_deterministic(scene, torch_face_model, photos, degraded, blurred_group):
    """Guidance's promise (umo_core.faces.guidance, "Reproducibility"), under another order of float additions:
    1 thread against 2, which run other kernels and split the sums otherwise, as a loaded CPU's math library
    may do between two calls. The same faces, matches and reward; the steps within STEP_REPRODUCIBILITY of
    their size (RMS over the touched cells, which is the strength)."""
    latent = degraded if scene == "one face" else blurred_group
    identities = torch_face_model.identities([photos / "Rob_Lowe_0001.jpg", photos / "Nathalie_Baye_0002.jpg"])
    strength = 0.01
    (first, a), (second, b) = (_guided_with_threads(threads, latent, identities, torch_face_model, strength)
                               for threads in (1, 2))
    assert len(a.faces) == (1 if scene == "one face" else 6)
    assert np.allclose(a.faces.boxes, b.faces.boxes, rtol=0, atol=1e-3)
    assert np.allclose(a.matched, b.matched, rtol=0, atol=1e-6) and abs(a.reward - b.reward) <= 1e-6
    touched = first != 0
    assert torch.equal(touched, second != 0)
    assert torch.isclose(first[touched].pow(2).mean().sqrt(), torch.tensor(strength))
    difference = (first - second)[touched].pow(2).mean().sqrt()
    assert difference <= STEP_REPRODUCIBILITY * strength, difference / strength


def test_gradient_through_a_real_vae_decoder(torch_face_model, photos):
    """A diffusers AutoencoderKL decoder (the real architecture: resnet up-blocks, mid-block
    attention; small channels, random weights, 4x upsampling) decodes the latent. Random weights
    draw no faces, so the latent also carries a real photo losslessly (pixel-unshuffled into its 48
    channels) and the decoded image is photo + decoder output: detection finds real faces, and the
    gradient reaching the latent includes the decoder's part (it changes when the decoder is off)."""
    vae = tiny_vae((16, 32, 32), latent_channels=48, norm_groups=8).eval().requires_grad_(False)
    photo = Image.open(photos / "t1_six_people.jpg").convert("RGB").resize((640, 440))
    latent = torch.nn.functional.pixel_unshuffle(_as_latent(np.asarray(photo)), 4)  # [1,48,110,160]

    def decoder(weight):
        def decode(cells):
            return image_decoder(torch.nn.functional.pixel_shuffle(cells, 4) + weight * vae.decode(cells).sample)
        return decode

    identities = torch_face_model.identities([photos / "Rob_Lowe_0001.jpg", photos / "Nathalie_Baye_0002.jpg"])
    result = reward_gradient(latent, decoder(0.05), identities, torch_face_model)
    assert len(result.faces) == 6
    assert torch.isfinite(result.gradient).all() and result.gradient.abs().sum() > 0
    magnitude = result.gradient.abs().sum(dim=1)[0]
    near_faces = torch.zeros_like(magnitude, dtype=torch.bool)
    for x1, y1, x2, y2 in result.faces.boxes:
        near_faces[max(0, int(y1 // 4) - 4):int(y2 // 4) + 5, max(0, int(x1 // 4) - 4):int(x2 // 4) + 5] = True
    assert magnitude[~near_faces].sum() == 0  # nothing outside the face windows
    for x1, y1, x2, y2 in result.faces.boxes:  # every face's own cells receive gradient
        assert magnitude[int(y1 // 4):int(y2 // 4), int(x1 // 4):int(x2 // 4)].sum() > 0
    without_decoder = reward_gradient(latent, decoder(0.0), identities, torch_face_model)
    assert not torch.allclose(result.gradient, without_decoder.gradient)


def test_autograd_copy_of_weights_loaded_in_inference_mode():
    """ComfyUI loads weights under inference mode; the gradient needs copies it can save for backward."""
    from umo_core.faces.guidance import autograd_copy

    with torch.inference_mode():
        loaded = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4)).eval()
        pixels = torch.rand(1, 3, 8, 8)
    with torch.inference_mode(False), torch.enable_grad():
        with pytest.raises(RuntimeError, match="Inference tensors"):
            loaded(pixels.clone().requires_grad_(True)).sum().backward()
        x = pixels.clone().requires_grad_(True)
        autograd_copy(loaded)(x).sum().backward()
    assert x.grad.abs().sum() > 0


def test_face_model_built_under_inference_mode_still_gives_gradients(pack_dir, photos, degraded):
    """ComfyUI runs the face-model loader under inference mode; guidance later needs its gradient."""
    from umo_core import load_face_model

    with torch.inference_mode():
        face_model = load_face_model(pack_dir, provider="cpu", backend="torch")
        identities = face_model.identities([photos / "Rob_Lowe_0001.jpg"])
    with torch.inference_mode(False), torch.enable_grad():
        result = reward_gradient(degraded.clone(), image_decoder, identities, face_model)
    assert result.gradient.abs().sum() > 0


class CountingDecoder:
    """A decoder that counts its full-size (preview) decodes apart from the window decodes."""

    def __init__(self, decode, full_shape):
        self.decode, self.full_shape, self.previews = decode, tuple(full_shape), 0

    def __call__(self, latent):
        self.previews += tuple(latent.shape[2:]) == self.full_shape
        return self.decode(latent)


def test_reused_faces_skip_the_preview_and_detect_again_every_k_steps(torch_face_model, photos, degraded):
    identities = torch_face_model.identities([photos / "Rob_Lowe_0001.jpg"])
    decode = CountingDecoder(image_decoder, degraded.shape[2:])
    reuse, latent, detected = FaceReuse(every=3), degraded, []
    for _ in range(7):
        latent, (result,) = guide(latent, decode, identities, torch_face_model, strength=0.002, reuse=reuse)
        detected.append(result.detected)
    assert detected == [True, False, False, True, False, False, True]
    assert decode.previews == 3
    reuse.reset()  # a new sampling run: its first guided step detects
    _, (result,) = guide(latent, decode, identities, torch_face_model, strength=0.002, reuse=reuse)
    assert result.detected and decode.previews == 4


def test_a_face_that_leaves_its_box_is_detected_again_at_once(torch_face_model, photos, degraded):
    """The image moves by a third of its width between two steps: the reused box holds no face any more,
    the matched cosine drops, and the same step detects again (its gradient from the new box)."""
    identities = torch_face_model.identities([photos / "Rob_Lowe_0001.jpg"])
    reuse = FaceReuse(every=3)
    _, (first,) = guide(degraded, image_decoder, identities, torch_face_model, strength=0.002, reuse=reuse)
    _, (kept,) = guide(degraded, image_decoder, identities, torch_face_model, strength=0.002, reuse=reuse)
    assert first.detected and not kept.detected  # nothing moved: the faces are reused
    moved = torch.roll(degraded, degraded.shape[3] // 3, dims=3)
    _, (again,) = guide(moved, image_decoder, identities, torch_face_model, strength=0.002, reuse=reuse)
    assert again.detected and again.faces.boxes[0, 0] > first.faces.boxes[0, 0] + 50
    assert again.matched[0] > 0.4


def test_every_must_be_at_least_one():
    from umo_core import UMOError

    with pytest.raises(UMOError, match="redetect_every is 0"):
        FaceReuse(every=0)


def _guided_mimr(latent, decode, identities, face_model, every, steps, strength):
    reuse = FaceReuse(every=every)
    for _ in range(steps):
        latent, _ = guide(latent, decode, identities, face_model, strength, reuse=reuse)
    analysed = face_model.analyse(decode(latent))[0]
    return identity_metrics(identities.embeddings, analysed.embeddings,
                            face_model.same_person_threshold)["metrics"]["mimr"]


def test_reused_faces_guide_as_well_as_detecting_at_every_step(torch_face_model, photos, degraded, blurred_group):
    """The MIMR of the guided images with faces reused (detection every 3 steps) is within 0.01 of
    detecting at every step: the blurred head-shot, and the blurred group photo (six faces, two references)."""
    identities = torch_face_model.identities([photos / "Rob_Lowe_0001.jpg", photos / "Nathalie_Baye_0002.jpg"])
    for latent, steps in ((degraded, 6), (blurred_group, 4)):
        before = _guided_mimr(latent, image_decoder, identities, torch_face_model, 1, 0, 0.002)
        every_step = _guided_mimr(latent, image_decoder, identities, torch_face_model, 1, steps, 0.002)
        reused = _guided_mimr(latent, image_decoder, identities, torch_face_model, 3, steps, 0.002)
        assert every_step > before + 0.02, (before, every_step)  # the guidance does something to compare
        assert abs(reused - every_step) <= 0.01, (before, every_step, reused)
