"""The identity guidance node with ComfyUI's own classes, in the test process: its decoder against
ComfyUI's VAE decode, the gradient through weights loaded under inference mode, and the hook as
the sampler calls it. (Sampling a whole graph with the node runs in test_pack_in_comfyui.py.)"""

from __future__ import annotations

import threading

import pytest
import torch

from tests.comfyui.conftest import flux_vae, import_pack, tiny_flux_model
from umo_core import UMOError


@pytest.fixture(scope="module")
def vae():
    """ComfyUI's VAE with the FLUX autoencoder architecture, loaded under inference mode as ComfyUI's loaders run."""
    with torch.inference_mode():
        return flux_vae()


@pytest.fixture(scope="module")
def flux_model():
    """ComfyUI's FLUX model (latent format, model sampling) on the meta device: the hook never runs the transformer."""
    return tiny_flux_model()


def _guidance_node():
    return import_pack().nodes.guidance


def test_decoder_matches_comfyui_vae_decode_and_carries_the_gradient(vae, flux_model):
    """The node decodes the sampler's latent (model space: FLUX scale and shift applied) exactly like
    VAEDecode after the sampler, and the gradient reaches the latent although ComfyUI's VAE weights
    are inference tensors."""
    latent = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = vae.decode(flux_model.model.process_latent_out(latent))
    decode = _guidance_node()._decoder(vae, flux_model)
    with torch.inference_mode(False), torch.enable_grad():
        cells = latent.clone().requires_grad_(True)
        image = decode(cells)
        (image * torch.linspace(0, 1, image.numel()).view(image.shape)).sum().backward()
    assert image.shape == expected.shape == (1, 64, 64, 3)
    assert torch.allclose(image.detach(), expected, atol=1e-4)
    assert torch.isfinite(cells.grad).all() and cells.grad.abs().sum() > 0


def test_decoder_copy_leaves_comfyui_layer_state_with_the_vae(vae, flux_model):
    """ComfyUI's loaders set casting state on its layers; under dynamic VRAM (ComfyUI after 0.8) a device allocation
    `_v` the forward reads the weights through. The decoder's copy runs on its own weights without that state
    (here: a lock stands in for the allocation, which cannot be copied; weight functions that zero the weights
    show whether the copy still follows the state) and the VAE keeps it."""
    latent = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = vae.decode(flux_model.model.process_latent_out(latent))
    layers = [layer for layer in vae.first_stage_model.modules() if hasattr(layer, "comfy_cast_weights")]
    allocation = threading.Lock()
    for layer in layers:
        layer.comfy_cast_weights, layer._v, layer.weight_function = True, allocation, [torch.zeros_like]
    try:
        decode = _guidance_node()._decoder(vae, flux_model)
        with torch.inference_mode(False), torch.enable_grad():
            cells = latent.clone().requires_grad_(True)
            image = decode(cells)
            image.sum().backward()
        assert all(layer._v is allocation and layer.comfy_cast_weights for layer in layers)
    finally:
        for layer in layers:
            del layer.comfy_cast_weights, layer._v, layer.weight_function
    assert torch.allclose(image.detach(), expected, atol=1e-4)
    assert cells.grad.abs().sum() > 0


def test_hook_on_a_clone_and_no_face_leaves_the_estimate(vae, flux_model, face_model, photos):
    """The patch lives on the returned clone only; under the sampler's inference mode a step whose
    decoded estimate shows no face (random VAE weights) returns the denoised estimate bit for bit."""
    with torch.inference_mode():
        identities = face_model.identities([photos / "Rob_Lowe_0001.jpg"])
        patched = _guidance_node().IdentityGuidance.execute(flux_model, vae, face_model, identities,
                                                            0.5, 0.0, 1.0, "mimr")[0]
    assert not flux_model.model_options.get("sampler_post_cfg_function")
    hooks = patched.model_options["sampler_post_cfg_function"]
    assert len(hooks) == 1
    denoised = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        stepped = hooks[0]({"denoised": denoised, "cond_denoised": denoised, "uncond_denoised": None,
                            "sigma": torch.tensor([0.5]), "input": denoised, "model": flux_model.model,
                            "model_options": patched.model_options})
    assert torch.equal(stepped, denoised)


def test_a_window_that_ends_before_it_starts_is_an_error(vae, flux_model, face_model, photos):
    identities = face_model.identities([photos / "Rob_Lowe_0001.jpg"])
    with pytest.raises(UMOError, match=r"start \(0.8\) is after end \(0.5\)"):
        _guidance_node().IdentityGuidance.execute(flux_model, vae, face_model, identities, 0.5, 0.8, 0.5, "mimr")


def test_faces_are_kept_for_one_sampling_run_only():
    """The hook's faces belong to one run: a new schedule tensor (ComfyUI's sampler puts each run's own into the
    transformer options), a rising sigma without a schedule, or another latent shape start a new run; steps of
    one run (falling sigma, a repeated sigma as Heun's second evaluation, the same schedule) do not."""
    run = _guidance_node().SamplingRun()
    shape = torch.Size([1, 16, 8, 8])
    first, second = torch.linspace(1, 0, 5), torch.linspace(1, 0, 5)

    def call(schedule, sigma, latent_shape=shape):
        options = {"transformer_options": {"sample_sigmas": schedule}} if schedule is not None else {}
        return run.is_new({"model_options": options}, sigma, latent_shape)

    assert [call(first, s) for s in (0.75, 0.5, 0.5, 0.25)] == [True, False, False, False]
    assert call(second, 0.75)  # the next run, at the same sigmas
    assert call(second, 0.5, torch.Size([2, 16, 8, 8]))  # another batch
    assert [call(None, s) for s in (0.5, 0.25, 0.75)] == [True, False, True]
