"""FLUX.1 with UNO's references at run time: latents in and out of the autoencoder, one velocity prediction.
The same functions serve the trainer (with gradient) and headless generation (without); sampling is flow.sample.
"""

from __future__ import annotations

import torch

from ..flux_family import transformer_output
from ..text_embedding import TextEmbedding
from .uno import pack_latents, text_ids, uno_image_ids, unpack_latents

LATENT_CHANNELS = 16  # FLUX.1's autoencoder; the transformer packs them into 2x2 patches of 64


def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """Images [B,H,W,3] in 0..1 -> normalised FLUX latents [B,16,H/8,W/8] (the transformer's space)."""
    pixels = images.movedim(-1, 1).to(vae.device, vae.dtype) * 2 - 1
    latent = vae.encode(pixels).latent_dist.mode()
    return (latent - vae.config.shift_factor) * vae.config.scaling_factor


def decode_latents(vae, latent: torch.Tensor) -> torch.Tensor:
    """Normalised latents -> images [B,H,W,3] in 0..1 (differentiable)."""
    raw = latent.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    return ((vae.decode(raw).sample.float() + 1) / 2).clamp(0, 1).movedim(1, -1)


def predict_velocity(transformer, latent: torch.Tensor, sigma: torch.Tensor | float, text: TextEmbedding,
                     references: list[torch.Tensor], guidance: float = 1.0) -> torch.Tensor:
    """The flow velocity for the target latent [B,16,h,w] with UNO's references (each [B,16,hk,wk])."""
    _, _, h, w = latent.shape
    tokens = torch.cat([pack_latents(latent)] + [pack_latents(r) for r in references], dim=1)
    ids = uno_image_ids((h, w), [tuple(r.shape[-2:]) for r in references])
    output = transformer_output(transformer, tokens, ids, text_ids(text.prompt_embeds.shape[1]), text, sigma, guidance)
    target_tokens = (h // 2) * (w // 2)
    return unpack_latents(output[:, :target_tokens].float(), h, w)
