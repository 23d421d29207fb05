"""Images from a prompt and UNO's references with FLUX.1: the seed's noise, Euler sampling, decoding.

Headless generation (`python -m umo_core generate`) and the trainer's evaluation images both come from
`generate_image`, so a seed gives the same image in either.
"""

from __future__ import annotations

import torch

from .runtime import LATENT_CHANNELS, decode_latents, sample
from .text_embedding import TextEmbedding

LATENT_SCALE = 8  # FLUX.1's autoencoder: one latent pixel per 8x8 image pixels


def seed_noise(seed: int, height: int, width: int) -> torch.Tensor:
    """The starting noise [1,16,H/8,W/8] of a height x width image, drawn on the CPU from `seed` so that it is
    the same on every device."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, LATENT_CHANNELS, height // LATENT_SCALE, width // LATENT_SCALE, generator=generator)


@torch.no_grad()
def generate_image(transformer, vae, text: TextEmbedding, references: list[torch.Tensor], seed: int, height: int,
                   width: int, steps: int, guidance: float) -> torch.Tensor:
    """One image [H,W,3] float 0..1 on the CPU, sampled from `seed`'s noise with `steps` Euler steps.

    text: one prompt's embedding; references: per person the latent [1,16,hk,wk] (runtime.encode_images of
    references.resize_reference). The noise goes to the autoencoder's device, where the latents live.
    """
    noise = seed_noise(seed, height, width).to(vae.device)
    latent = sample(transformer, noise, text, references, steps, guidance)
    return decode_latents(vae, latent)[0].cpu()
