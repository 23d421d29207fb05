"""diffusers -> Black Forest Labs layout for FLUX state dicts, to write the single files that flux1-dev.safetensors
and ae.safetensors are (the layout ComfyUI loads) from tiny diffusers models.

Written as the inverse of the layouts on its own, not from umo_core.backbones.flux1, so that tests comparing
the two can fail. `blocks_to_bfl` is the FLUX family's converter; tests/flux2_layout.py gives it FLUX.2's tables.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from safetensors.torch import save_file

from umo_core.backbones.flux1.loading import TRANSFORMER_CONFIG, VAE_CONFIG

# diffusers module -> BFL module for weights that only change name.
_TOP_LEVEL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
}
_DOUBLE_BLOCK = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
_SINGLE_BLOCK = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
# BFL's RMSNorm of the attention heads keeps its weight as `scale`.
_DOUBLE_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                 "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
_SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
# Fused BFL weights: the diffusers modules stacked along the output rows, in this order.
_DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}


def blocks_to_bfl(state_dict: dict[str, torch.Tensor], top_level: dict[str, str], double_block: dict[str, str],
                  single_block: dict[str, str], single_fused: dict[str, tuple[str, ...]]) -> dict[str, torch.Tensor]:
    """A FLUX-family transformer's diffusers state dict in BFL's names, from the tables of renamed modules (top level,
    double and single blocks) and fused ones; biases where the model has them (FLUX.2 has none). Every weight must
    find a place."""
    unused = set(state_dict)

    def take(key: str) -> torch.Tensor:
        unused.remove(key)
        return state_dict[key]

    bfl = {}
    for diffusers_name, bfl_name in top_level.items():
        for parameter in ("weight", "bias"):
            if f"{diffusers_name}.{parameter}" in state_dict:
                bfl[f"{bfl_name}.{parameter}"] = take(f"{diffusers_name}.{parameter}")
    for parameter in ("weight", "bias"):
        if f"norm_out.linear.{parameter}" in state_dict:
            # diffusers' AdaLayerNormContinuous projects to (scale, shift), BFL's last layer to (shift, scale).
            scale, shift = take(f"norm_out.linear.{parameter}").chunk(2)
            bfl[f"final_layer.adaLN_modulation.1.{parameter}"] = torch.cat([shift, scale])
    for diffusers_block, bfl_block, renames, norms, fused in (
            ("transformer_blocks", "double_blocks", double_block, _DOUBLE_NORMS, _DOUBLE_FUSED),
            ("single_transformer_blocks", "single_blocks", single_block, _SINGLE_NORMS, single_fused)):
        indices = {key.split(".")[1] for key in state_dict if key.startswith(f"{diffusers_block}.")}
        for index in indices:
            source, target = f"{diffusers_block}.{index}.", f"{bfl_block}.{index}."
            for diffusers_name, bfl_name in renames.items():
                for parameter in ("weight", "bias"):
                    if f"{source}{diffusers_name}.{parameter}" in state_dict:
                        bfl[f"{target}{bfl_name}.{parameter}"] = take(f"{source}{diffusers_name}.{parameter}")
            for diffusers_name, bfl_name in norms.items():
                bfl[f"{target}{bfl_name}.scale"] = take(f"{source}{diffusers_name}.weight")
            for bfl_name, parts in fused.items():
                for parameter in ("weight", "bias"):
                    if f"{source}{parts[0]}.{parameter}" in state_dict:
                        bfl[f"{target}{bfl_name}.{parameter}"] = torch.cat(
                            [take(f"{source}{part}.{parameter}") for part in parts])
    assert not unused, f"no BFL name for {sorted(unused)}"
    return bfl


def transformer_to_bfl(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FluxTransformer2DModel's state dict as flux1-dev.safetensors keeps it (`double_blocks.0.img_attn.qkv.weight`)."""
    return blocks_to_bfl(state_dict, _TOP_LEVEL, _DOUBLE_BLOCK, _SINGLE_BLOCK, _SINGLE_FUSED)


# diffusers AutoencoderKL -> the LDM layout of ae.safetensors, as (pattern, replacement) on key names.
_VAE_RENAMES = [
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_(q|k|v)\.", r"\1.mid.attn_1.\2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
]


def vae_to_bfl(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """AutoencoderKL's state dict as ae.safetensors keeps it (`encoder.down.0.block.0.conv1.weight`)."""
    up_levels = len({key.split(".")[2] for key in state_dict if key.startswith("decoder.up_blocks.")})
    bfl = {}
    for key, tensor in state_dict.items():
        name = key
        for pattern, replacement in _VAE_RENAMES:
            name = re.sub(pattern, replacement, name)
        # The decoder's up blocks are numbered from the output in diffusers and from the latent in LDM.
        name = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
                      lambda match: f"decoder.up.{up_levels - 1 - int(match[1])}.block.", name)
        name = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                      lambda match: f"decoder.up.{up_levels - 1 - int(match[1])}.upsample.", name)
        if ".mid.attn_1." in name and name.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        bfl[name] = tensor
    return bfl


def flux1_file_shapes(double_blocks: int = 1, single_blocks: int = 1) -> dict[str, torch.Tensor]:
    """The keys and shapes of flux1-dev.safetensors cut to `double_blocks` + `single_blocks` blocks (meta tensors):
    FLUX.1-dev's own diffusers configuration, in the file layout."""
    config = {**json.loads(TRANSFORMER_CONFIG.read_text()), "num_layers": double_blocks,
              "num_single_layers": single_blocks}
    with torch.device("meta"):
        return transformer_to_bfl(FluxTransformer2DModel.from_config(config).state_dict())


def ae_file_shapes() -> dict[str, torch.Tensor]:
    """The keys and shapes of FLUX's ae.safetensors (meta tensors)."""
    with torch.device("meta"):
        return vae_to_bfl(AutoencoderKL.from_config(json.loads(VAE_CONFIG.read_text())).state_dict())


def save_bfl_file(model: FluxTransformer2DModel | AutoencoderKL, path: Path, prefix: str = "") -> Path:
    """`model` as a single file in BFL's layout (flux1-dev.safetensors, ae.safetensors); `prefix` on every key
    ("model.diffusion_model.": a ComfyUI checkpoint's transformer)."""
    to_bfl = transformer_to_bfl if isinstance(model, FluxTransformer2DModel) else vae_to_bfl
    save_file({prefix + key: tensor.contiguous() for key, tensor in to_bfl(model.state_dict()).items()}, path)
    return path
