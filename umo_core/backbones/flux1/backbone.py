"""FLUX.1 with UNO's references: the backbone contract (contract.Backbone) over this folder's modules (loading,
runtime and text_encoders through flux_family.FluxFamily; the rest here)."""

from __future__ import annotations

from pathlib import Path

import torch

from ...images import ImageLike
from ..flux_family import FluxFamily
from ..lora_formats import BASE_MODEL_METADATA_KEY, FORMAT_METADATA_KEY
from ..text_embedding import BACKBONE_METADATA_KEY, POOLED_KEY, PROMPT_KEY
from . import loading, references, runtime
from .lora import UNO_TARGET_MODULES, diffusers_to_uno
from .uno import flux_sigmas


class Flux1(FluxFamily):
    loading, runtime, package = loading, runtime, __package__
    name = "flux1"
    family = "flux"
    title = "FLUX.1 (UNO)"
    latent_channels = runtime.LATENT_CHANNELS
    latent_scale = 8
    text_keys = (PROMPT_KEY, POOLED_KEY)
    lora_target_modules = UNO_TARGET_MODULES
    transformer_files = loading.TRANSFORMER_FILES
    vae_files = loading.VAE_FILES
    text_encoder_files = "a diffusers FLUX folder with text_encoder/, tokenizer/, text_encoder_2/ and tokenizer_2/"

    @staticmethod
    def sampling_defaults(transformer_path: Path) -> tuple[int, float]:
        """UNO's: 25 steps, distilled guidance 4."""
        return 25, 4.0

    @staticmethod
    def classifier_free_guidance(transformer_path: Path) -> bool:
        """UNO's guidance is FLUX.1-dev's distilled guidance, an input of the transformer."""
        return False

    @staticmethod
    def reference_shape(height: int, width: int, count: int) -> tuple[int, int]:
        return references.reference_shape(height, width, references.reference_long_side(count))

    @staticmethod
    def resize_reference(image: ImageLike, count: int, long_side: int | None = None) -> torch.Tensor:
        """UNO's rule; `long_side` (> 0) overrides its 512 / 320 (the conditioning node's setting)."""
        return references.resize_reference(image, references.reference_long_side(count, long_side))

    @staticmethod
    def sigmas(steps: int, latent_hw: tuple[int, int]) -> torch.Tensor:
        return flux_sigmas(steps, (latent_hw[0] // 2) * (latent_hw[1] // 2))

    @staticmethod
    def load_lora(path: Path) -> dict[str, torch.Tensor]:
        return loading.load_flux_lora(path)

    def lora_files(self, lora: dict[str, torch.Tensor]) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
        """peft layout (diffusers' names) and UNO's layout (UMO_UNO's, which ComfyUI loads)."""
        marked = {BACKBONE_METADATA_KEY: self.name}
        return {"lora_diffusers.safetensors": (lora, marked),
                "lora_uno.safetensors": (diffusers_to_uno(lora), {**marked, FORMAT_METADATA_KEY: "uno",
                                                                   BASE_MODEL_METADATA_KEY: "flux1-dev"})}


BACKBONE = Flux1()
