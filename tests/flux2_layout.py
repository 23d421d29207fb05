"""diffusers -> Black Forest Labs layout for FLUX.2 transformers, to write the single files that
flux-2-klein-4b.safetensors is (the layout ComfyUI loads) from tiny diffusers models; FLUX.2's autoencoder goes
through tests.flux_layout.vae_to_bfl (FLUX.1's names plus its own `bn.*` latent normalisation).

Written as the inverse of diffusers' own converter (`convert_flux2_transformer_checkpoint_to_diffusers`) on its own,
so that the test comparing the two can fail. ComfyUI's model detection fixes FLUX.2's rotary axes (4 x 32, heads of
128) and reads the width, the depth and the text width from the file, so a test model is narrow by having few heads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
from safetensors.torch import save_file

from tests.flux_layout import blocks_to_bfl, vae_to_bfl

KLEIN_4B_TEXT_WIDTH = 7680  # Qwen3-4B's hidden states of three layers, stacked (2560 x 3)
FLUX2_HEAD_DIM = 128

_TOP_LEVEL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
}
_DOUBLE_BLOCK = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
_SINGLE_BLOCK = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}


def flux2_transformer(double_blocks: int = 1, single_blocks: int = 1, heads: int = 2,
                      text_width: int = KLEIN_4B_TEXT_WIDTH, guidance: bool = False) -> Flux2Transformer2DModel:
    """FLUX.2's transformer with `heads` heads of 128 (klein 4B: 24, dev: 48), random weights from a fixed seed;
    `guidance`: a guidance embedder (dev; klein is guidance-distilled without one)."""
    torch.manual_seed(0)
    model = Flux2Transformer2DModel(num_layers=double_blocks, num_single_layers=single_blocks,
                                    attention_head_dim=FLUX2_HEAD_DIM, num_attention_heads=heads,
                                    joint_attention_dim=text_width, guidance_embeds=guidance)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05 + (parameter.ndim == 1))
    return model.eval()


def transformer_to_bfl(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flux2Transformer2DModel's state dict as BFL's FLUX.2 files keep it (`double_blocks.0.img_attn.qkv.weight`)."""
    return blocks_to_bfl(state_dict, _TOP_LEVEL, _DOUBLE_BLOCK, _SINGLE_BLOCK, {})


def flux2_file_shapes(double_blocks: int = 1, single_blocks: int = 1, heads: int = 2) -> dict[str, torch.Tensor]:
    """The keys and shapes of a FLUX.2 [klein]-style file (meta tensors)."""
    with torch.device("meta"):
        model = Flux2Transformer2DModel(num_layers=double_blocks, num_single_layers=single_blocks,
                                        attention_head_dim=FLUX2_HEAD_DIM, num_attention_heads=heads,
                                        joint_attention_dim=KLEIN_4B_TEXT_WIDTH, guidance_embeds=False)
        return transformer_to_bfl(model.state_dict())


def flux2_vae() -> AutoencoderKLFlux2:
    """FLUX.2's autoencoder at its real size (ComfyUI fixes the VAE's channels and reads only the latent's), random
    weights from a fixed seed and a latent normalisation that is not the identity."""
    torch.manual_seed(1)
    vae = AutoencoderKLFlux2()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=generator) * 0.1)
        vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=generator) + 0.5)
    return vae.eval()


# The modules of FLUX.2's blocks a LoRA adapts (attention in and out, and the feed-forward of the double block).
FLUX2_LORA_MODULES = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                      "transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.add_k_proj",
                      "transformer_blocks.0.attn.to_out.0",
                      "transformer_blocks.0.ff.linear_in", "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
                      "single_transformer_blocks.0.attn.to_out")
FLUX2_LORA_RANK, FLUX2_LORA_ALPHA = 4, 8.0


def flux2_peft_lora() -> dict[str, torch.Tensor]:
    """A peft LoRA of the tiny Flux2Transformer2DModel (keys without prefix or adapter name), random A and B; the
    text stream's q/k/v only partly adapted (k), as ComfyUI's fused qkv then gets rows of zeros."""
    shapes = {name: parameter.shape for name, parameter in flux2_transformer().named_parameters()}
    generator = torch.Generator().manual_seed(5)
    lora = {}
    for module in FLUX2_LORA_MODULES:
        outputs, inputs = shapes[f"{module}.weight"]
        lora[f"{module}.lora_A.weight"] = torch.randn(FLUX2_LORA_RANK, inputs, generator=generator) * 0.1
        lora[f"{module}.lora_B.weight"] = torch.randn(outputs, FLUX2_LORA_RANK, generator=generator) * 0.1
    return lora


def save_flux2_peft_lora(path: Path) -> Path:
    """flux2_peft_lora() as diffusers/peft users share it: 'transformer.' keys, the alpha in diffusers' metadata."""
    save_file({f"transformer.{key}": tensor for key, tensor in flux2_peft_lora().items()}, path,
              metadata={"lora_adapter_metadata": json.dumps({"r": FLUX2_LORA_RANK, "lora_alpha": FLUX2_LORA_ALPHA})})
    return path


def save_flux2_bfl_file(model: Flux2Transformer2DModel | AutoencoderKLFlux2, path: Path, prefix: str = "") -> Path:
    """A Flux2Transformer2DModel or AutoencoderKLFlux2 as the single file Black Forest Labs publish (BFL's names);
    `prefix` on every key ("model.diffusion_model.": a ComfyUI checkpoint's transformer)."""
    to_bfl = vae_to_bfl if isinstance(model, AutoencoderKLFlux2) else transformer_to_bfl
    save_file({prefix + key: tensor.contiguous() for key, tensor in to_bfl(model.state_dict()).items()}, path)
    return path
