"""Everything the pack reads from, or strips off, ComfyUI's objects beyond its public node API, in one place.

ComfyUI moves these between versions without notice. Each item has a test in tests/comfyui/test_comfy_compat.py,
run against a real ComfyUI, that fails with a message naming the ComfyUI change. Checked against ComfyUI 0.3.64,
0.8.0 and 0.12.1.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import comfy.lora
import comfy.model_base
import torch

# What ComfyUI's model loading sets on its layers (comfy.ops, comfy.model_patcher) and their forward then follows:
# weight casting (low VRAM, and the dynamic VRAM of ComfyUI 0.8+ on NVIDIA, which also forces casting), low-VRAM
# patch functions, and dynamic VRAM's device allocation `_v` with the weights staged in it.
LAYER_LOADING_STATE = ("comfy_cast_weights", "comfy_force_cast_weights", "weight_function", "bias_function",
                       "weight_lowvram_function", "bias_lowvram_function", "_v", "_v_weight", "_v_bias",
                       "_v_signature")

# comfy.model_base class -> the pack's name for the backbone, subclasses first (FLUX.2's class is a Flux).
# ComfyUI before 0.8 has no Flux2 class.
MODEL_CLASS_FAMILIES = (("Flux2", "flux2"), ("Omnigen2", "omnigen2"), ("Flux", "flux"))


@contextmanager
def without_layer_loading_state(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`module` with LAYER_LOADING_STATE taken off its layers for the duration, then put back.

    Through that state a layer's forward reads the weights ComfyUI staged for it (cast copies, a device allocation
    that cannot be copied) instead of the layer's own; a copy of the module made meanwhile runs on its own weights.
    """
    held = [(layer, {name: vars(layer).pop(name) for name in LAYER_LOADING_STATE if name in vars(layer)})
            for layer in module.modules()]
    try:
        yield module
    finally:
        for layer, state in held:
            vars(layer).update(state)


def sampling_schedule(post_cfg_args: dict) -> torch.Tensor | None:
    """The sigma schedule of the sampling run a `sampler_post_cfg_function` call belongs to.

    ComfyUI's sampler puts each run's own `sample_sigmas` tensor into the transformer options; None for callers
    that do not.
    """
    return post_cfg_args.get("model_options", {}).get("transformer_options", {}).get("sample_sigmas")


def model_family(model) -> str | None:
    """'flux', 'flux2' or 'omnigen2' for a MODEL (ComfyUI's ModelPatcher), told by its model class; None otherwise."""
    for class_name, family in MODEL_CLASS_FAMILIES:
        model_class = getattr(comfy.model_base, class_name, None)
        if model_class is not None and isinstance(model.model, model_class):
            return family
    return None


def lora_patches(model, lora: dict[str, torch.Tensor]) -> tuple[dict, set[str]]:
    """ComfyUI's patches for `lora` (keys in ComfyUI's LoRA format) on MODEL, and the names of the modules that
    MODEL's LoRA key map knows (what LoraLoaderModelOnly does, without its silent skipping)."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    return comfy.lora.load_lora(lora, key_map, log_missing=False), set(key_map)


def vae_autoencoder(vae) -> torch.nn.Module:
    """The torch module behind a VAE (ComfyUI's comfy.sd.VAE): its `decode` takes the VAE's own latent."""
    return vae.first_stage_model


def vae_latent_channels(vae) -> int:
    """Channels of the latent the VAE's encode gives (16 for FLUX.1's autoencoder, 128 for FLUX.2's)."""
    return vae.latent_channels


def vae_decoded_image(vae, decoded: torch.Tensor) -> torch.Tensor:
    """The autoencoder's output [B,3,H,W] -> an IMAGE [B,H,W,3] in 0..1, as VAEDecode returns it."""
    return vae.process_output(decoded.float()).movedim(1, -1)


def vae_dtype(vae) -> torch.dtype:
    return vae.vae_dtype


def latent_for_vae(model, latent: torch.Tensor) -> torch.Tensor:
    """A latent in the model's sampling space -> the VAE's latent (the model's latent format: scale and shift)."""
    return model.model.process_latent_out(latent)
