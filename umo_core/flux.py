"""FLUX with UNO's references in diffusers: loading, one velocity prediction, sampling.

The same functions serve the trainer (with gradient) and headless generation (without).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UMOError
from .lora_formats import detect_lora_format, load_lora_file, peft_alpha, uno_to_diffusers
from .uno import flux_sigmas, pack_latents, text_ids, uno_image_ids, unpack_latents


@dataclass
class TextEmbedding:
    prompt_embeds: torch.Tensor  # [B, L, 4096] T5
    pooled_prompt_embeds: torch.Tensor  # [B, 768] CLIP


def load_transformer(path: str | Path, dtype: torch.dtype = torch.bfloat16):
    """FluxTransformer2DModel from a local diffusers folder (`transformer/` of FLUX.1-dev)."""
    from diffusers import FluxTransformer2DModel

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UMOError(f"FLUX transformer folder '{path}' has no config.json; give the 'transformer' folder "
                       "of a diffusers FLUX.1-dev download")
    return FluxTransformer2DModel.from_pretrained(path, torch_dtype=dtype, local_files_only=True)


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
    b, _, h, w = latent.shape
    tokens = torch.cat([pack_latents(latent)] + [pack_latents(r) for r in references], dim=1)
    ids = uno_image_ids((h, w), [tuple(r.shape[-2:]) for r in references]).to(latent.device)
    sigma = torch.as_tensor(sigma, device=latent.device, dtype=torch.float32).expand(b)
    # Under multi-process training the transformer is wrapped (DistributedDataParallel): call the
    # wrapper, which synchronises the gradients, and read dtype and config from the model inside.
    model = getattr(transformer, "module", transformer)
    dtype = model.dtype
    output = transformer(
        hidden_states=tokens.to(dtype),
        encoder_hidden_states=text.prompt_embeds.to(latent.device, dtype),
        pooled_projections=text.pooled_prompt_embeds.to(latent.device, dtype),
        timestep=sigma.to(dtype),
        img_ids=ids, txt_ids=text_ids(text.prompt_embeds.shape[1]).to(latent.device),
        guidance=torch.full((b,), guidance, device=latent.device, dtype=dtype)
        if model.config.guidance_embeds else None,
        return_dict=False,
    )[0]
    target_tokens = (h // 2) * (w // 2)
    return unpack_latents(output[:, :target_tokens].float(), h, w)


@torch.no_grad()
def sample(transformer, noise: torch.Tensor, text: TextEmbedding, references: list[torch.Tensor],
           steps: int = 25, guidance: float = 4.0, stop_at: int | None = None) -> torch.Tensor:
    """FLUX's Euler sampler from `noise` over the shifted schedule; `stop_at` ends after that many steps."""
    sigmas = flux_sigmas(steps, (noise.shape[2] // 2) * (noise.shape[3] // 2))
    latent = noise
    for i in range(steps if stop_at is None else stop_at):
        velocity = predict_velocity(transformer, latent, sigmas[i], text, references, guidance)
        latent = latent + (sigmas[i + 1] - sigmas[i]) * velocity
    return latent


def load_flux_lora(path: str | Path) -> dict[str, torch.Tensor]:
    """A UNO-layout (UMO_UNO, this trainer's) or diffusers-peft FLUX LoRA as peft keys of
    FluxTransformer2DModel (`transformer_blocks.0.attn.to_q.lora_A.weight`), its alpha folded into the ups
    so that B @ A is the weight delta."""
    state_dict, metadata = load_lora_file(path)
    layout = detect_lora_format(state_dict)
    if layout == "uno":
        return uno_to_diffusers(state_dict)
    if layout != "flux_diffusers_peft":
        raise UMOError(f"LoRA '{path}' is a {layout} LoRA; FLUX takes UNO or diffusers FLUX LoRAs")
    alpha = peft_alpha(metadata)
    lora = {}
    for key, tensor in state_dict.items():
        key = key.removeprefix("transformer.").removeprefix("base_model.model.")
        if alpha is not None and ".lora_B." in key:
            tensor = tensor * (alpha / tensor.shape[1])
        lora[key] = tensor
    return lora


@torch.no_grad()
def merge_lora(transformer, path: str | Path, strength: float = 1.0) -> int:
    """Add a UNO-layout or diffusers-peft FLUX LoRA into the weights: W += s * B @ A.

    Merged, a LoRA costs nothing at inference. Returns the number of layers changed.
    """
    state_dict = load_flux_lora(path)
    merged = 0
    for key, down in state_dict.items():
        if ".lora_A." not in key:
            continue
        up = state_dict[key.replace(".lora_A.", ".lora_B.")]
        weight = transformer.get_submodule(key.split(".lora_A.")[0]).weight
        weight += (strength * up.float() @ down.float()).to(weight)
        merged += 1
    return merged
