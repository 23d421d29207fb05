"""FLUX.2 ([klein] 4B / 9B, base and distilled; [dev]): the backbone contract (contract.Backbone) over this
folder's modules (loading, runtime and text_encoders through flux_family.FluxFamily; the rest here)."""

from __future__ import annotations

from pathlib import Path

import torch

from ...images import ImageLike
from ..flux_family import FluxFamily
from ..lora_formats import FORMAT_METADATA_KEY, detect_lora_format, load_lora_file, lora_family, wrong_backbone
from ..text_embedding import BACKBONE_METADATA_KEY, PROMPT_KEY
from . import loading, references, runtime
from .lora import FLUX2_TARGET_MODULES, comfy_to_diffusers, diffusers_to_comfy, peft_lora


class Flux2(FluxFamily):
    loading, runtime, package = loading, runtime, __package__
    name = "flux2"
    family = "flux2"
    title = "FLUX.2"
    latent_channels = runtime.LATENT_CHANNELS
    latent_scale = runtime.LATENT_SCALE
    text_keys = (PROMPT_KEY,)
    lora_target_modules = FLUX2_TARGET_MODULES
    transformer_files = loading.TRANSFORMER_FILES
    vae_files = loading.VAE_FILES
    text_encoder_files = ("a diffusers FLUX.2 [klein] or [dev] folder with text_encoder/ (Qwen3 or Mistral-3) and "
                          "tokenizer/")

    @staticmethod
    def sampling_defaults(transformer_path: Path) -> tuple[int, float]:
        """The pipelines' steps and guidance for the transformer's variant (klein distilled 4 / 1, base and dev
        50 / 4)."""
        variant = loading.transformer_variant(transformer_path)
        return variant.steps, variant.guidance

    @staticmethod
    def classifier_free_guidance(transformer_path: Path) -> bool:
        """Klein base's: Flux2KleinPipeline samples it with classifier-free guidance; distilled klein and dev (whose
        guidance is embedded) without."""
        return loading.transformer_variant(transformer_path).classifier_free_guidance

    @staticmethod
    def reference_shape(height: int, width: int, count: int) -> tuple[int, int]:
        return references.reference_shape(height, width)

    @staticmethod
    def resize_reference(image: ImageLike, count: int) -> torch.Tensor:
        """The pipelines' rule, the same for any number of references."""
        return references.resize_reference(image)

    @staticmethod
    def sigmas(steps: int, latent_hw: tuple[int, int]) -> torch.Tensor:
        return runtime.flux2_sigmas(steps, latent_hw[0] * latent_hw[1])

    def load_lora(self, path: Path) -> dict[str, torch.Tensor]:
        """A FLUX.2 LoRA in peft or ComfyUI's layout as peft keys, B @ A the delta."""
        state_dict, metadata = load_lora_file(path)
        layout = detect_lora_format(state_dict, metadata)
        if layout == "flux2_diffusers_peft":
            return peft_lora(state_dict, metadata)
        if layout == "comfy" and lora_family(state_dict, metadata) == self.family:
            return comfy_to_diffusers(state_dict)
        raise wrong_backbone(path, layout, state_dict, metadata, "FLUX.2 takes peft or ComfyUI FLUX.2 LoRAs (the "
                             "trainer's lora_diffusers.safetensors or lora_comfy.safetensors of --backbone flux2)")

    def lora_files(self, lora: dict[str, torch.Tensor]) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
        """peft layout (diffusers' names) and ComfyUI's (Black Forest Labs' names)."""
        marked = {BACKBONE_METADATA_KEY: self.name}
        return {"lora_diffusers.safetensors": (lora, marked),
                "lora_comfy.safetensors": (diffusers_to_comfy(lora, {}), {**marked, FORMAT_METADATA_KEY: "comfy"})}


BACKBONE = Flux2()
