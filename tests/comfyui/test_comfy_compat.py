"""nodes/comfy_compat.py against the real ComfyUI: each test fails with a message naming the ComfyUI change, so that
an upstream move shows up here rather than as a wrong picture."""

from __future__ import annotations

import pytest
import torch

from tests.comfyui.conftest import (
    comfy_import_path,
    detected_model,
    flux_vae,
    import_pack,
    random_state_dict,
    tiny_flux_model,
)
from tests.flux2_layout import flux2_file_shapes
from tests.flux_layout import flux1_file_shapes

# What ComfyUI's model patcher records on layers for its own bookkeeping; a layer's forward does not read it.
MODEL_PATCHER_BOOKKEEPING = {"comfy_patched_weights", "prev_comfy_cast_weights", "pin_failed", "seed_key"}
# ComfyUI tells an OmniGen2 file by this key and gives it the released model's sizes.
OMNIGEN2_FILE_MARKER = "time_caption_embed.timestep_embedder.linear_1.bias"


def _compat():
    return import_pack().nodes.comfy_compat


def test_layer_loading_state_covers_what_a_low_vram_load_sets():
    """ComfyUI's low-VRAM load (the path that casts weights and hangs LoRA patches on layers) on its own VAE: every
    attribute it adds to a layer is either state the layer's forward follows (stripped for the guidance decoder's
    copy) or patcher bookkeeping; the copy made without that state decodes as the VAE does and carries a gradient."""
    compat = _compat()
    with torch.inference_mode():
        vae = flux_vae()
        latent = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
        expected = vae.decode(latent)
    layers = list(compat.vae_autoencoder(vae).modules())
    before = [set(vars(layer)) for layer in layers]
    vae.patcher.load(torch.device("cpu"), lowvram_model_memory=1)
    try:
        added = set().union(*(set(vars(layer)) - names for layer, names in zip(layers, before)))
        assert added & set(compat.LAYER_LOADING_STATE), (
            f"ComfyUI's low-VRAM load no longer sets any of {compat.LAYER_LOADING_STATE} on its layers (it set "
            f"{sorted(added)}): comfy.model_patcher.ModelPatcher.load changed how it stages weights; check what the "
            "layers' forward (comfy.ops) reads now and update LAYER_LOADING_STATE in nodes/comfy_compat.py")
        unknown = added - set(compat.LAYER_LOADING_STATE) - MODEL_PATCHER_BOOKKEEPING
        assert not unknown, (
            f"ComfyUI's model loading now sets {sorted(unknown)} on its layers (comfy.model_patcher): if the layers' "
            "forward (comfy.ops) follows it, add it to LAYER_LOADING_STATE in nodes/comfy_compat.py, otherwise to "
            "MODEL_PATCHER_BOOKKEEPING here")
        decode = import_pack().nodes.guidance._decoder(vae, tiny_flux_model())
        with torch.inference_mode(False), torch.enable_grad():
            cells = latent.clone().requires_grad_(True)
            image = decode(cells * 0.3611 - 0.1159 * 0.3611)  # in FLUX's sampling space: process_latent_out undoes it
            image.sum().backward()
        assert all(set(vars(layer)) >= names for layer, names in zip(layers, before))  # the state is back
    finally:
        vae.patcher.detach()
    torch.testing.assert_close(image.detach(), expected, atol=1e-4, rtol=0,
                               msg="the guidance decoder's copy no longer decodes like ComfyUI's VAE after a low-VRAM "
                                   "load: ComfyUI's layers follow loading state outside LAYER_LOADING_STATE")
    assert cells.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def flux_with_weights():
    """FLUX.1 with one double and one single block and random weights, through ComfyUI's UNETLoader code path."""
    comfy_import_path()
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict(random_state_dict(flux1_file_shapes()))


def test_sampling_schedule_tells_one_sampling_run_from_the_next(flux_with_weights):
    """ComfyUI's sampler puts each run's sigmas into the post-CFG function's model options: one tensor through a
    run, another for the next run."""
    comfy_import_path()
    import comfy.sample

    seen: list[list] = []

    def post_cfg(args: dict) -> torch.Tensor:
        seen[-1].append(_compat().sampling_schedule(args))
        return args["denoised"]

    model = flux_with_weights.clone()
    model.set_model_sampler_post_cfg_function(post_cfg)
    positive = [[torch.zeros(1, 4, 4096), {"pooled_output": torch.zeros(1, 768)}]]
    latent = torch.zeros(1, 16, 4, 4)
    for seed in (0, 1):
        seen.append([])
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
        comfy.sample.sample(model, noise, 2, 1.0, "euler", "simple", positive, positive, latent, disable_pbar=True)
    message = ("ComfyUI's sampler no longer puts the run's sigmas into model_options['transformer_options']"
               "['sample_sigmas'] of the sampler_post_cfg_function arguments (comfy.samplers); identity guidance "
               "would reuse faces across runs only by sigma: update sampling_schedule in nodes/comfy_compat.py")
    assert all(isinstance(schedule, torch.Tensor) for run in seen for schedule in run), message
    first, second = seen
    assert len(first) == 2 and first[0] is first[1] and second[0] is second[1], message
    assert first[0] is not second[0], message
    assert first[0].shape == (3,) and float(first[0][-1]) == 0.0, message


def test_model_family_from_comfyui_model_classes():
    """FLUX.1 and OmniGen2 as ComfyUI's model detection builds them."""
    comfy_import_path()
    import comfy.model_base

    compat = _compat()
    for class_name in ("Flux", "Omnigen2"):
        assert hasattr(comfy.model_base, class_name), (
            f"comfy.model_base.{class_name} is gone: ComfyUI renamed or moved its model class; update "
            "MODEL_CLASS_FAMILIES in nodes/comfy_compat.py")
    assert compat.model_family(tiny_flux_model()) == "flux", "ComfyUI's FLUX.1 model is no comfy.model_base.Flux"
    omnigen2 = detected_model({OMNIGEN2_FILE_MARKER: torch.empty(1024, device="meta")})
    assert compat.model_family(omnigen2) == "omnigen2", "ComfyUI's OmniGen2 model is no comfy.model_base.Omnigen2"


def test_model_family_of_comfyui_flux2(flux2_support):
    flux2 = detected_model(flux2_file_shapes())
    assert _compat().model_family(flux2) == "flux2", (
        f"ComfyUI's model detection builds a FLUX.2 file as {type(flux2.model).__name__}, not "
        "comfy.model_base.Flux2; update MODEL_CLASS_FAMILIES in nodes/comfy_compat.py")


def test_lora_patches_from_comfyui_key_map():
    """ComfyUI's LoRA key map names FLUX's fused modules, and its loader turns a LoRA pair into a patch of them."""
    model = tiny_flux_model()
    module = "diffusion_model.double_blocks.0.img_attn.proj"
    lora = {f"{module}.lora_up.weight": torch.ones(3072, 1), f"{module}.lora_down.weight": torch.ones(1, 3072)}
    patches, known = _compat().lora_patches(model, lora)
    assert module in known, ("ComfyUI's LoRA key map (comfy.lora.model_lora_keys_unet) no longer names modules "
                             f"'{module}': update lora_patches in nodes/comfy_compat.py")
    assert list(patches) == [f"{module}.weight"], (
        f"comfy.lora.load_lora gave {list(patches)} for a LoRA of {module}: its patch format changed; update "
        "lora_patches in nodes/comfy_compat.py")


def test_vae_internals_decode_like_vaedecode():
    """The VAE's autoencoder, dtype and output step together decode as VAEDecode does; its latent channels and the
    model's latent format are FLUX's."""
    compat = _compat()
    with torch.inference_mode():
        vae = flux_vae()
        latent = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(1))
        expected = vae.decode(latent)
        decoded = compat.vae_decoded_image(vae, compat.vae_autoencoder(vae).decode(latent.to(compat.vae_dtype(vae))))
    torch.testing.assert_close(decoded, expected, msg="comfy.sd.VAE's first_stage_model.decode + process_output no "
                                                      "longer decode as VAE.decode: update nodes/comfy_compat.py")
    assert compat.vae_latent_channels(vae) == 16, "comfy.sd.VAE.latent_channels no longer gives the latent's channels"
    flux = tiny_flux_model()
    assert torch.allclose(compat.latent_for_vae(flux, torch.zeros(1, 16, 2, 2)), torch.full((1, 16, 2, 2), 0.1159)), (
        "the FLUX model's process_latent_out no longer undoes FLUX's latent scale and shift (comfy.latent_formats)")
