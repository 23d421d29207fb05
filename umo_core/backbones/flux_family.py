"""What the FLUX-family backbones (`flux1/`, `flux2/`: diffusers' FluxTransformer2DModel and
Flux2Transformer2DModel) share; each folder keeps its own rules (files, latents, ids, schedule, LoRA layouts).

- `FluxFamily`: the contract's members that a backbone folder's own modules implement under the contract's names,
  so the backbone's class only names its modules and adds what is its own;
- `transformer_output`: one call of such a transformer on packed tokens and their position ids;
- `DOUBLE_BLOCK_ATTENTION`: the double blocks' attention projections, named alike in both transformers (a peft
  target_modules part); `BLOCK_NAME`: a block module's name (block kind, index).
"""

from __future__ import annotations

import re
from importlib import import_module
from pathlib import Path
from types import ModuleType

import torch

from .text_embedding import TextEmbedding

DOUBLE_BLOCK_ATTENTION = (r"transformer_blocks\.\d+\.attn\."
                          r"(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)")
BLOCK_NAME = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.")


class FluxFamily:
    """Members read from the backbone folder's `loading` (transformer_text_widths, check_vae, load_transformer,
    load_vae) and `runtime` (encode_images, decode_latents, predict_velocity) modules, and from its `text_encoders`
    module (load_text_encoders, encode_prompts), imported when first used: it needs transformers. A subclass sets
    `loading`, `runtime` and `package` (the folder's package, `__package__` of its backbone.py)."""

    loading: ModuleType
    runtime: ModuleType
    package: str

    def transformer_text_widths(self, path: Path) -> tuple[int, ...]:
        return self.loading.transformer_text_widths(path)

    def check_vae(self, path: Path) -> None:
        self.loading.check_vae(path)

    def load_transformer(self, path: Path, dtype: torch.dtype = torch.bfloat16):
        return self.loading.load_transformer(path, dtype)

    def load_vae(self, path: Path, dtype: torch.dtype = torch.bfloat16):
        return self.loading.load_vae(path, dtype)

    def encode_images(self, vae, images: torch.Tensor) -> torch.Tensor:
        return self.runtime.encode_images(vae, images)

    def decode_latents(self, vae, latent: torch.Tensor) -> torch.Tensor:
        return self.runtime.decode_latents(vae, latent)

    def predict_velocity(self, transformer, latent: torch.Tensor, sigma, text: TextEmbedding,
                         reference_latents: list[torch.Tensor], guidance: float) -> torch.Tensor:
        return self.runtime.predict_velocity(transformer, latent, sigma, text, reference_latents, guidance)

    def load_text_encoders(self, folder: Path, dtype: torch.dtype, device: str | torch.device):
        return import_module(f"{self.package}.text_encoders").load_text_encoders(folder, dtype, device)

    def encode_prompts(self, encoders, prompts: list[str]) -> TextEmbedding:
        return import_module(f"{self.package}.text_encoders").encode_prompts(encoders, prompts)


def transformer_output(transformer, tokens: torch.Tensor, image_ids: torch.Tensor, text_ids: torch.Tensor,
                       text: TextEmbedding, sigma: torch.Tensor | float, guidance: float) -> torch.Tensor:
    """The transformer's output tokens for the image tokens [B, N, C] (target and references) placed by `image_ids`
    and the text placed by `text_ids`, at `sigma`; `guidance` goes to transformers that embed it, CLIP's pooled
    vector to those that take one (FLUX.1)."""
    b, device = tokens.shape[0], tokens.device
    sigma = torch.as_tensor(sigma, device=device, dtype=torch.float32).expand(b)
    # Under multi-process training the transformer is wrapped (DistributedDataParallel): call the wrapper, which
    # synchronises the gradients, and read dtype and config from the model inside.
    model = getattr(transformer, "module", transformer)
    dtype = model.dtype
    pooled = {} if text.pooled_prompt_embeds is None else {
        "pooled_projections": text.pooled_prompt_embeds.to(device, dtype)}
    return transformer(
        hidden_states=tokens.to(dtype),
        encoder_hidden_states=text.prompt_embeds.to(device, dtype),
        **pooled,
        timestep=sigma.to(dtype),
        img_ids=image_ids.to(device), txt_ids=text_ids.to(device),
        guidance=torch.full((b,), guidance, device=device, dtype=dtype) if model.config.guidance_embeds else None,
        return_dict=False,
    )[0]
