"""Rectified flow, shared by every backbone: Euler steps, the one-step clean estimate, sampling from a seed, and one
generated image (what `python -m umo_core generate` and the trainer's evaluation both call, so a seed gives the same
image in either).

x_t = (1 - t) x0 + t noise and v = noise - x0; the backbone gives the schedule and the velocity.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .text_embedding import TextEmbedding


def euler_step(latent: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """Flow-matching Euler: x_{next} = x + (sigma_next - sigma) * v, with v = noise - x0."""
    return latent + (sigma_next - sigma) * velocity


def clean_estimate(latent: torch.Tensor, velocity: torch.Tensor, sigma) -> torch.Tensor:
    """One-step clean estimate of rectified flow: x_t = (1-t) x0 + t noise, v = noise - x0 => x0 = x_t - t v."""
    return latent - sigma * velocity


def needs_negative_prompt(backbone, transformer_path: Path, guidance: float) -> bool:
    """Whether sampling the transformer at `guidance` is classifier-free guidance (FLUX.2 [klein] base above 1), for
    which the text embedding must carry negative_prompt_embeds; sampling does it where the text carries them."""
    return guidance > 1 and backbone.classifier_free_guidance(transformer_path)


@torch.no_grad()
def sample(backbone, transformer, noise: torch.Tensor, text: TextEmbedding, references: list[torch.Tensor],
           steps: int, guidance: float, stop_at: int | None = None) -> torch.Tensor:
    """The backbone's Euler sampler from `noise` over its schedule; `stop_at` ends after that many steps."""
    sigmas = backbone.sigmas(steps, tuple(noise.shape[2:]))
    latent = noise
    for i in range(steps if stop_at is None else stop_at):
        velocity = backbone.predict_velocity(transformer, latent, sigmas[i], text, references, guidance)
        latent = euler_step(latent, velocity, sigmas[i], sigmas[i + 1])
    return latent


def seed_noise(backbone, seed: int, height: int, width: int) -> torch.Tensor:
    """The starting noise [1, C, H/s, W/s] of a height x width image, drawn on the CPU from `seed` so that it is the
    same on every device."""
    generator = torch.Generator().manual_seed(seed)
    scale = backbone.latent_scale
    return torch.randn(1, backbone.latent_channels, height // scale, width // scale, generator=generator)


@torch.no_grad()
def generate_image(backbone, transformer, vae, text: TextEmbedding, references: list[torch.Tensor], seed: int,
                   height: int, width: int, steps: int, guidance: float) -> torch.Tensor:
    """One image [H,W,3] float 0..1 on the CPU, sampled from `seed`'s noise with `steps` Euler steps.

    text: one prompt's embedding; references: per person the latent (backbone.encode_images of
    backbone.resize_reference). The noise goes to the autoencoder's device, where the latents live.
    """
    noise = seed_noise(backbone, seed, height, width).to(vae.device)
    latent = sample(backbone, transformer, noise, text, references, steps, guidance)
    return backbone.decode_latents(vae, latent)[0].cpu()
