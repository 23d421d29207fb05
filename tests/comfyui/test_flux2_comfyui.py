"""FLUX.2 in ComfyUI with ComfyUI's own model detection, VAE and sampler: the pack's reference conditioning against
diffusers' FLUX.2 pipelines (reference latents and position ids), identity guidance's decode through FLUX.2's VAE.

Runs where ComfyUI builds a small FLUX.2 file as the file says (0.12.1); skipped, with the reason, elsewhere. The
test models: tests/flux2_layout.py (a 2-head FLUX.2 [klein]-style transformer, FLUX.2's autoencoder at full size,
random weights).
"""

from __future__ import annotations

import types

import pytest
import torch

from tests.comfyui.conftest import (
    comfy_import_path,
    detected_model,
    flux2_vae_state_dict,
    import_pack,
    tiny_flux_model,
    uno_lora,
)
from tests.flux2_layout import (
    FLUX2_LORA_ALPHA,
    FLUX2_LORA_MODULES,
    FLUX2_LORA_RANK,
    KLEIN_4B_TEXT_WIDTH,
    flux2_file_shapes,
    flux2_peft_lora,
    flux2_transformer,
    flux2_vae,
    save_flux2_peft_lora,
    transformer_to_bfl,
)
from umo_core import UMOError
from umo_core.backbones import get
from umo_core.backbones.lora_formats import load_lora_file, to_comfy_lora

pytestmark = pytest.mark.usefixtures("flux2_support")


@pytest.fixture(scope="module")
def vae():
    """ComfyUI's VAE loaded from FLUX.2's ae.safetensors layout, under inference mode as ComfyUI's loaders run."""
    comfy_import_path()
    import comfy.sd

    with torch.inference_mode():
        return comfy.sd.VAE(sd=flux2_vae_state_dict())


@pytest.fixture(scope="module")
def flux2_model():
    """ComfyUI's FLUX.2 as its model detection builds a 2-head [klein]-style file (meta device)."""
    return detected_model(flux2_file_shapes())


def _backbone_nodes():
    return import_pack().nodes.backbone


def _conditioning(width: int = KLEIN_4B_TEXT_WIDTH) -> list:
    return [[torch.zeros(1, 8, width), {}]]


def _diffusers_reference_latent(photo: torch.Tensor) -> torch.Tensor:
    """What diffusers' Flux2KleinPipeline makes of a prepared reference [h,w,3] in 0..1: its own
    `_encode_vae_image` (encode, 2x2 patchify, the autoencoder's batch-norm statistics) on the same weights."""
    from diffusers import Flux2KleinPipeline

    autoencoder = flux2_vae()
    pipeline = types.SimpleNamespace(vae=autoencoder, _patchify_latents=Flux2KleinPipeline._patchify_latents)
    with torch.no_grad():
        return Flux2KleinPipeline._encode_vae_image(pipeline, photo.permute(2, 0, 1)[None] * 2 - 1, None)


def test_flux2_references_are_diffusers_reference_latents_with_the_index_method(vae):
    """Two references through UMO Reference Conditioning (backbone auto, told from klein's Qwen3 text width): FLUX.2's
    rule from the library, ComfyUI's `index` method, and latents equal to diffusers' FLUX.2 pipeline's."""
    generator = torch.Generator().manual_seed(0)
    wide, tall = torch.rand(1, 90, 130, 3, generator=generator), torch.rand(1, 120, 70, 3, generator=generator)
    positive = _conditioning()
    with torch.inference_mode():  # as ComfyUI runs a node
        conditioning, negative = _backbone_nodes().ReferenceConditioning.execute(positive, vae, "auto", 0,
                                                                                 image_1=wide, image_2=tall)[:2]
    assert negative is None and positive[0][1] == {}  # the input is not modified
    values = conditioning[0][1]
    assert values["reference_latents_method"] == "index"
    latents = values["reference_latents"]
    # FLUX.2's rule: small photos keep their size, sides cut to multiples of 16; latents are 16x smaller, 128 channels.
    assert [tuple(latent.shape) for latent in latents] == [(1, 128, 5, 8), (1, 128, 7, 4)]
    for latent, photo in zip(latents, (wide, tall)):
        expected = _diffusers_reference_latent(get("flux2").resize_reference(photo[0], 2))
        torch.testing.assert_close(latent, expected, atol=2e-4, rtol=1e-3)


def test_flux2_position_ids_equal_diffusers(flux2_model):
    """ComfyUI's own FLUX.2 builds the ids of the target and the references (`index` method); its transformer is
    replaced by a probe. diffusers: Flux2KleinPipeline's _prepare_latent_ids and _prepare_image_ids."""
    from diffusers import Flux2KleinPipeline

    model = flux2_model.model.diffusion_model
    seen = {}

    def probe(img, img_ids, *args, **kwargs):
        seen["ids"] = img_ids[0]
        return torch.zeros(img.shape[0], img.shape[1], 128)

    model.forward_orig = probe
    target, refs = (6, 5), [(4, 3), (2, 5)]
    references = [torch.zeros(1, 128, *hw) for hw in refs]
    model._forward(torch.zeros(1, 128, *target), torch.zeros(1), torch.zeros(1, 3, KLEIN_4B_TEXT_WIDTH),
                   ref_latents=references, ref_latents_method="index")
    expected = torch.cat([Flux2KleinPipeline._prepare_latent_ids(torch.zeros(1, 128, *target))[0],
                          Flux2KleinPipeline._prepare_image_ids(references)[0]])
    assert torch.equal(seen["ids"].float(), expected.float())


@pytest.mark.parametrize(("width", "backbone"), [(7680, "auto"), (12288, "auto"), (15360, "auto"), (7680, "flux2"),
                                                 (1024, "auto")])  # unknown width: told from FLUX.2's VAE
def test_flux2_told_from_the_text_encoder_or_the_vae(vae, width, backbone):
    assert _backbone_nodes().conditioning_family(_conditioning(width), backbone, vae) == "flux2"


@pytest.mark.parametrize(("width", "backbone", "message"), [
    (4096, "auto", "the VAE makes 128-channel latents, but FLUX.1 \\(UNO\\) needs FLUX.1's autoencoder"),
    (7680, "flux (UNO)", "backbone is 'flux \\(UNO\\)' but the positive conditioning comes from FLUX.2's text encoder"),
    (2048, "flux2", "comes from OmniGen2's text encoder"),
])
def test_flux2_wrong_combinations_are_one_error(vae, width, backbone, message):
    with pytest.raises(UMOError, match=message):
        _backbone_nodes().conditioning_family(_conditioning(width), backbone, vae)


def test_flux2_refuses_a_long_side(vae):
    with pytest.raises(UMOError, match="long_side \\(320\\) sets UNO's rule for FLUX.1; FLUX.2 references follow"):
        _backbone_nodes().ReferenceConditioning.execute(_conditioning(), vae, "auto", 320,
                                                         image_1=torch.rand(1, 64, 64, 3))


def test_guidance_decoder_through_flux2_vae(vae, flux2_model):
    """Identity guidance's differentiable decode on FLUX.2: a 128-channel latent in the model's space decodes exactly
    like VAEDecode after the sampler (the VAE's own decode: latent normalisation undone, 2x2 unpatchified), and the
    gradient reaches the latent although ComfyUI's VAE weights are inference tensors."""
    latent = torch.randn(1, 128, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = vae.decode(flux2_model.model.process_latent_out(latent))
    decode = import_pack().nodes.guidance._decoder(vae, flux2_model)
    with torch.inference_mode(False), torch.enable_grad():
        cells = latent.clone().requires_grad_(True)
        image = decode(cells)
        (image * torch.linspace(0, 1, image.numel()).view(image.shape)).sum().backward()
    assert image.shape == expected.shape == (1, 64, 64, 3)
    torch.testing.assert_close(image.detach(), expected, atol=1e-4, rtol=0)
    assert torch.isfinite(cells.grad).all() and cells.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def flux2_loras(tmp_path_factory):
    """The FLUX.2 LoRA as diffusers/peft users share it ('transformer.' keys, alpha in diffusers' metadata) and in
    ComfyUI's format without metadata, and a UNO LoRA, in a loras folder registered with ComfyUI's folder_paths."""
    import_pack()
    import folder_paths
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("flux2_loras")
    save_flux2_peft_lora(folder / "tiny_flux2_peft.safetensors")
    save_file(to_comfy_lora(*load_lora_file(folder / "tiny_flux2_peft.safetensors")),
              folder / "tiny_flux2_comfy.safetensors")
    save_file(uno_lora(), folder / "tiny_uno_for_flux2.safetensors")
    folder_paths.add_model_folder_path("loras", str(folder))
    return folder


def test_flux2_lora_changes_comfyui_weights_as_it_changes_the_diffusers_model(flux2_model, flux2_loras):
    """UMO LoRA Loader on ComfyUI's FLUX.2 with a peft file: ComfyUI's patch math gives, for every Black Forest Labs
    weight, exactly what peft's merge adds to the diffusers model's weights (fused q/k/v rows included)."""
    import comfy.lora
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    patched = _backbone_nodes().UMOLoraLoader.execute(flux2_model, "tiny_flux2_peft.safetensors", 1.0)[0]
    assert not flux2_model.patches  # the input MODEL is untouched
    weights = flux2_model.model.state_dict()
    comfy_deltas = {key.removeprefix("diffusion_model."): comfy.lora.calculate_weight(
        patched.patches[key], torch.zeros(weights[key].shape), key) for key in patched.patches}

    base = flux2_transformer()
    before = {key: value.clone() for key, value in base.state_dict().items()}
    config = LoraConfig(r=FLUX2_LORA_RANK, lora_alpha=FLUX2_LORA_ALPHA, target_modules=list(FLUX2_LORA_MODULES))
    model = get_peft_model(base, config)
    set_peft_model_state_dict(model, {f"base_model.model.{key}": value for key, value in flux2_peft_lora().items()})
    merged = model.merge_and_unload().state_dict()
    diffusers_deltas = transformer_to_bfl({key: merged[key] - before[key] for key in before})
    changed = {key for key, delta in diffusers_deltas.items() if delta.abs().max() > 0}
    assert set(comfy_deltas) == changed
    for key in changed:
        torch.testing.assert_close(comfy_deltas[key], diffusers_deltas[key], atol=1e-5, rtol=1e-4, msg=key)


def test_flux2_lora_loader_refuses_cross_family_loads(flux2_model, flux2_loras):
    with pytest.raises(UMOError, match=r"'tiny_uno_for_flux2.safetensors' is a flux LoRA but the model is flux2"):
        _backbone_nodes().UMOLoraLoader.execute(flux2_model, "tiny_uno_for_flux2.safetensors", 1.0)
    for name in ("tiny_flux2_peft.safetensors", "tiny_flux2_comfy.safetensors"):  # the latter: FLUX.2's MLP widths
        with pytest.raises(UMOError, match=rf"'{name}' is a flux2 LoRA but the model is flux; load it on a FLUX.2 "):
            _backbone_nodes().UMOLoraLoader.execute(tiny_flux_model(), name, 1.0)
