"""FLUX.2 at run time, as diffusers' Flux2Pipeline and Flux2KleinPipeline run it.

Latents: the autoencoder's 32 channels at 1/8 of the image, patchified 2x2 into 128 channels at 1/16 and normalised
with the autoencoder's batch-norm statistics; that [B,128,H/16,W/16] tensor is the transformer's space, one token
per latent pixel. The transformer sees `[text | target | ref1 | ref2 ...]`; position ids have four axes (time, row,
column, layer): text token l is (0, 0, 0, l), target token (i, j) is (0, i, j, 0) and reference k's token (i, j) is
(scale + scale * k, i, j, 0) with scale REFERENCE_INDEX_SCALE (10): references are told apart by the first axis
only (Flux2KleinPipeline._prepare_image_ids; ComfyUI's `index` reference method with `ref_index_scale` 10). The output
is sliced back to the target tokens. The schedule is diffusers' FlowMatchEulerDiscreteScheduler with FLUX.2's
empirical shift (compute_empirical_mu of the target token count and the step count).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..flux_family import transformer_output
from ..text_embedding import TextEmbedding

LATENT_CHANNELS = 128  # 32 autoencoder channels x a 2x2 patch
LATENT_SCALE = 16  # image pixels per latent pixel: 8 (autoencoder) x 2 (patch)
REFERENCE_INDEX_SCALE = 10
SCHEDULER_CONFIG = Path(__file__).parent / "configs" / "flux2-scheduler.json"


def patchify(latent: torch.Tensor) -> torch.Tensor:
    """Autoencoder latent [B,C,H,W] -> [B,4C,H/2,W/2], each 2x2 patch's channels in (channel, row, column) order."""
    b, c, h, w = latent.shape
    patches = latent.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return patches.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latent: torch.Tensor) -> torch.Tensor:
    """Inverse of `patchify`."""
    b, c, h, w = latent.shape
    patches = latent.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return patches.reshape(b, c // 4, h * 2, w * 2)


def _batch_norm(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The autoencoder's latent statistics (mean, standard deviation) [1,128,1,1], as `like`."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """Images [B,H,W,3] in 0..1 -> normalised FLUX.2 latents [B,128,H/16,W/16] (the distribution's mode)."""
    pixels = images.movedim(-1, 1).to(vae.device, vae.dtype) * 2 - 1
    latent = patchify(vae.encode(pixels).latent_dist.mode())
    mean, std = _batch_norm(vae, latent)
    return (latent - mean) / std


def decode_latents(vae, latent: torch.Tensor) -> torch.Tensor:
    """Normalised latents -> images [B,H,W,3] in 0..1 (differentiable)."""
    latent = latent.to(vae.dtype)
    mean, std = _batch_norm(vae, latent)
    raw = unpatchify(latent * std + mean)
    return ((vae.decode(raw).sample.float() + 1) / 2).clamp(0, 1).movedim(1, -1)


def pack_latents(latent: torch.Tensor) -> torch.Tensor:
    """[B,C,h,w] -> tokens [B, h*w, C], row-major."""
    return latent.flatten(2).transpose(1, 2)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_latents` for a latent of `height` x `width`."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, height, width)


def grid_ids(height: int, width: int, time: int = 0) -> torch.Tensor:
    """Position ids [height*width, 4] of a latent grid: (time, row, column, 0), row-major."""
    return torch.cartesian_prod(torch.tensor([time]), torch.arange(height), torch.arange(width), torch.arange(1))


def image_ids(target_hw: tuple[int, int], reference_hws: list[tuple[int, int]],
              scale: int = REFERENCE_INDEX_SCALE) -> torch.Tensor:
    """Ids [N,4] of the `[target | refs]` tokens: the target at time 0, reference k at scale + scale * k."""
    grids = [grid_ids(*target_hw)] + [grid_ids(h, w, scale + scale * k) for k, (h, w) in enumerate(reference_hws)]
    return torch.cat(grids)


def text_ids(tokens: int) -> torch.Tensor:
    """Ids [tokens,4] of the text: (0, 0, 0, l)."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(tokens))


def predict_velocity(transformer, latent: torch.Tensor, sigma: torch.Tensor | float, text: TextEmbedding,
                     references: list[torch.Tensor], guidance: float = 1.0) -> torch.Tensor:
    """The flow velocity for the target latent [B,128,h,w] with the references' latents (each [B,128,hk,wk]).

    `guidance` goes to the transformers that embed it (FLUX.2 [dev]). Klein has no guidance embedding: with the
    text's negative_prompt_embeds (given for klein base only) and guidance above 1 it is classifier-free guidance,
    Flux2KleinPipeline's `negative + guidance * (positive - negative)`; the trainer's rollout runs guidance 1."""
    _, _, h, w = latent.shape
    tokens = torch.cat([pack_latents(latent)] + [pack_latents(r) for r in references], dim=1)
    ids = image_ids((h, w), [tuple(r.shape[-2:]) for r in references])
    output = transformer_output(transformer, tokens, ids, text_ids(text.prompt_embeds.shape[1]), text, sigma,
                                guidance)[:, :h * w]
    if text.negative_prompt_embeds is not None and guidance > 1:
        negative_text = TextEmbedding(text.negative_prompt_embeds)
        negative = transformer_output(transformer, tokens, ids, text_ids(negative_text.prompt_embeds.shape[1]),
                                      negative_text, sigma, guidance)[:, :h * w]
        output = negative + guidance * (output - negative)
    return unpack_latents(output.float(), h, w)


def flux2_sigmas(steps: int, image_tokens: int) -> torch.Tensor:
    """The pipelines' schedule: steps + 1 sigmas from 1 down to 0, FLUX.2's empirical shift for `image_tokens`
    target tokens and `steps` steps, through diffusers' scheduler and its shipped configuration."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(json.loads(SCHEDULER_CONFIG.read_text()))
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(image_tokens, steps))
    return scheduler.sigmas.float().cpu()
