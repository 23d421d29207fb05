"""The backbone contract: what the trainer, `generate`, the evaluation and the nodes' LoRA and reference helpers
need from a generator model, and nothing else.

A backbone is one folder `umo_core/backbones/<name>/` whose `backbone.py` holds `BACKBONE`, an object with the
members of `Backbone` below; `umo_core.backbones.get(name)` is the one place a backbone is chosen by name. Code
outside the folder never imports from it. What every flow-matching backbone shares (Euler steps, the one-step clean
estimate, sampling, the seed's noise) is in `flow.py`; the LoRA file machinery in `lora_formats.py`; the resize
machinery in `references.py`; the text-embedding file in `text_embedding.py`.

Latents are the transformer's space: [B, latent_channels, H / latent_scale, W / latent_scale] for an H x W image,
normalised as the transformer takes them; the flow is rectified (x_t = (1 - t) x0 + t noise, v = noise - x0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from .text_embedding import TextEmbedding


class Backbone(Protocol):
    """A generator model the trainer and `generate` run. Members in the order a training step uses them."""

    name: str  # registry name, written into LoRA and text-embedding metadata ("flux1", "flux2")
    family: str  # the LoRA family of its files (lora_formats.check_family; "flux" for FLUX.1)
    title: str  # for messages: "FLUX.1 (UNO)"
    latent_channels: int
    latent_scale: int  # image pixels per latent pixel along a side
    text_keys: tuple[str, ...]  # the tensors of its text-embedding file: [L, width] first, then [width] ones
    lora_target_modules: str  # peft target_modules (a full-match regex) of the LoRA the trainer trains
    transformer_files: str  # what --transformer takes, for help and errors
    vae_files: str  # what --vae takes
    text_encoder_files: str  # what --text-encoders takes

    def sampling_defaults(self, transformer_path: Path) -> tuple[int, float]:
        """The steps (generate and the trainer's rollout) and guidance (generate) for the transformer at the path."""

    def classifier_free_guidance(self, transformer_path: Path) -> bool:
        """Whether the transformer at the path is sampled with classifier-free guidance when guidance is above 1: a
        second pass on the text embedding's negative_prompt_embeds (see flow.needs_negative_prompt)."""

    # Loading, offline, from a diffusers folder or the single files people download; a wrong file is named from
    # its config or header before any weight is read.
    def transformer_text_widths(self, path: Path) -> tuple[int, ...]:
        """The widths of `text_keys` the transformer at `path` takes (header or config only)."""

    def check_vae(self, path: Path) -> None:
        """A UMOError unless `path` is this backbone's autoencoder (header or config only)."""

    def load_transformer(self, path: Path, dtype: torch.dtype) -> torch.nn.Module: ...

    def load_vae(self, path: Path, dtype: torch.dtype) -> torch.nn.Module: ...

    # Images <-> latents (images [B,H,W,3] float 0..1; decode is differentiable).
    def encode_images(self, vae, images: torch.Tensor) -> torch.Tensor: ...

    def decode_latents(self, vae, latent: torch.Tensor) -> torch.Tensor: ...

    # The reference rule: resize (here) and placement (inside predict_velocity).
    def reference_shape(self, height: int, width: int, count: int) -> tuple[int, int]:
        """(height, width) of a height x width photo after the rule, with `count` references in the sample."""

    def resize_reference(self, image, count: int) -> torch.Tensor:
        """One reference photo (uint8 or float [H,W,3]) -> float [h,w,3] 0..1 by the rule."""

    def predict_velocity(self, transformer, latent: torch.Tensor, sigma: torch.Tensor | float, text: TextEmbedding,
                         references: list[torch.Tensor], guidance: float) -> torch.Tensor:
        """The flow velocity of the target latent, with the references' latents placed by the backbone's rule."""

    def sigmas(self, steps: int, latent_hw: tuple[int, int]) -> torch.Tensor:
        """The sampling schedule: steps + 1 values from 1 down to 0 for a target latent of latent_hw."""

    # Text: the encoders, from a local folder only, and the prompts' embeddings (what the pipeline's encode_prompt
    # gives), in the dtype and on the device of the encoders.
    def load_text_encoders(self, folder: Path, dtype: torch.dtype, device: str | torch.device): ...

    def encode_prompts(self, encoders, prompts: list[str]) -> TextEmbedding: ...

    # LoRA files.
    def load_lora(self, path: Path) -> dict[str, torch.Tensor]:
        """A LoRA file for this backbone as peft keys of its diffusers transformer, alpha folded into lora_B (B @ A
        is the delta); one clear error for a LoRA of another backbone."""

    def lora_files(self, lora: dict[str, torch.Tensor]) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
        """The trained peft LoRA (B @ A is the delta) as the files the trainer writes: name -> (tensors, metadata)."""
