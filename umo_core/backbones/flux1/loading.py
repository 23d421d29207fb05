"""FLUX.1 models from the files people have, offline: the transformer, the autoencoder and LoRAs.

Single files in Black Forest Labs' layout (what ComfyUI loads) or diffusers folders; every path is checked
from its config or header first, so a wrong file is named before any weight is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ...errors import UMOError
from ..lora_formats import detect_lora_format, load_lora_file, merge_lora_weights, peft_alpha, wrong_backbone
from ..model_files import (
    count_blocks,
    diffusers_config,
    from_diffusers_folder,
    model_from_state_dict,
    open_single_file,
    read_single_file,
)
from .keys import COMFY_MODEL_PREFIX, TRANSFORMER_REQUIRED, VAE_REQUIRED, flux_bfl_to_diffusers
from .lora import uno_to_diffusers
from .runtime import LATENT_CHANNELS

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, FluxTransformer2DModel


# FLUX.1-dev's diffusers configs, shipped so that single files load without the hub; the numbers a file
# fixes (depth, width, text dims, guidance) are read from its tensors on top of them.
CONFIGS = Path(__file__).parent / "configs"
TRANSFORMER_CONFIG = CONFIGS / "flux1-dev-transformer.json"
VAE_CONFIG = CONFIGS / "flux1-vae.json"
TRANSFORMER_FILES = ("flux1-dev.safetensors or flux1-schnell.safetensors (Black Forest Labs' layout, as in "
                     "ComfyUI's models/diffusion_models) or the 'transformer' folder of a diffusers FLUX.1 download")
VAE_FILES = ("FLUX's ae.safetensors (as in ComfyUI's models/vae) or the 'vae' folder of a diffusers FLUX.1 "
             "download")


def load_transformer(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> FluxTransformer2DModel:
    """FluxTransformer2DModel from a diffusers `transformer/` folder or one .safetensors file in Black Forest
    Labs' layout (flux1-dev / flux1-schnell, also with ComfyUI's `model.diffusion_model.` prefix), offline."""
    from diffusers import FluxTransformer2DModel

    path = Path(path)
    if path.is_dir():
        return from_diffusers_folder(FluxTransformer2DModel, path, dtype, "FLUX transformer", TRANSFORMER_FILES)
    state_dict = read_single_file(path, dtype, "FLUX transformer", TRANSFORMER_FILES, TRANSFORMER_REQUIRED,
                                   COMFY_MODEL_PREFIX)
    config = _transformer_config(state_dict, path)
    state_dict = flux_bfl_to_diffusers(state_dict)
    return model_from_state_dict(FluxTransformer2DModel, config, state_dict,
                                 f"FLUX transformer '{path}' does not fit FLUX.1's architecture",
                                 f"give {TRANSFORMER_FILES}")


def load_vae(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> AutoencoderKL:
    """FLUX's AutoencoderKL from a diffusers `vae/` folder or Black Forest Labs' single ae.safetensors, offline."""
    from diffusers import AutoencoderKL

    path = Path(path)
    check_vae(path)
    if path.is_dir():
        return from_diffusers_folder(AutoencoderKL, path, dtype, "FLUX autoencoder", VAE_FILES)
    state_dict = read_single_file(path, dtype, "FLUX autoencoder", VAE_FILES, VAE_REQUIRED)
    latent_channels = state_dict["decoder.conv_in.weight"].shape[1]
    levels = count_blocks(state_dict, "encoder.down.")
    # diffusers converts the layout itself; the architecture comes from the file's shapes.
    vae = AutoencoderKL.from_single_file(
        state_dict, config=str(VAE_CONFIG), local_files_only=True, torch_dtype=dtype,
        in_channels=state_dict["encoder.conv_in.weight"].shape[1],
        out_channels=state_dict["decoder.conv_out.weight"].shape[0],
        latent_channels=latent_channels,
        block_out_channels=[state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)],
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
        layers_per_block=count_blocks(state_dict, "encoder.down.0.block."),
        use_quant_conv="quant_conv.weight" in state_dict, use_post_quant_conv="post_quant_conv.weight" in state_dict,
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in state_dict)
    missing = [name for name, parameter in vae.named_parameters() if parameter.is_meta]
    if missing:
        raise UMOError(f"autoencoder '{path}' lacks {missing[:3]}; give {VAE_FILES}")
    return vae


def transformer_text_widths(path: str | Path) -> tuple[int, int]:
    """The widths of the text embeddings (T5 `prompt_embeds`, CLIP `pooled_prompt_embeds`) the FLUX transformer at
    `path` takes, from its folder's config.json or its file's header: a check of the path that loads no weights."""
    path = Path(path)
    if path.is_dir():
        config = {**json.loads(TRANSFORMER_CONFIG.read_text()),
                  **diffusers_config(path, "FluxTransformer2DModel", "FLUX transformer", TRANSFORMER_FILES)}
        return config["joint_attention_dim"], config["pooled_projection_dim"]
    with open_single_file(path, "FLUX transformer", TRANSFORMER_FILES, TRANSFORMER_REQUIRED,
                           COMFY_MODEL_PREFIX) as (handle, names):
        return (handle.get_slice(names["txt_in.weight"]).get_shape()[1],
                handle.get_slice(names["vector_in.in_layer.weight"]).get_shape()[1])


def check_vae(path: str | Path) -> None:
    """A UMOError unless `path` is a FLUX autoencoder (16 latent channels), read from its folder's config.json or
    its file's header without loading weights."""
    path = Path(path)
    if path.is_dir():
        config = diffusers_config(path, "AutoencoderKL", "FLUX autoencoder", VAE_FILES)
        latent_channels = config.get("latent_channels", LATENT_CHANNELS)
    else:
        with open_single_file(path, "FLUX autoencoder", VAE_FILES, VAE_REQUIRED) as (handle, names):
            latent_channels = handle.get_slice(names["decoder.conv_in.weight"]).get_shape()[1]
    if latent_channels != LATENT_CHANNELS:
        raise UMOError(f"autoencoder '{path}' has {latent_channels} latent channels, FLUX's has "
                       f"{LATENT_CHANNELS} (is it a Stable Diffusion VAE?); give {VAE_FILES}")


def _transformer_config(state_dict: dict[str, torch.Tensor], path: Path) -> dict:
    """FLUX.1-dev's config with the numbers that the BFL-layout `state_dict` fixes."""
    config = json.loads(TRANSFORMER_CONFIG.read_text())
    hidden, in_channels = state_dict["img_in.weight"].shape
    head_dim = state_dict["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    if hidden % head_dim or head_dim != sum(config["axes_dims_rope"]):
        raise UMOError(f"FLUX transformer '{path}' has attention heads of {head_dim} channels in a width of "
                       f"{hidden}; FLUX's rotary embedding needs heads of {sum(config['axes_dims_rope'])}; "
                       f"give {TRANSFORMER_FILES}")
    config.update(
        in_channels=in_channels, out_channels=state_dict["final_layer.linear.weight"].shape[0],
        num_layers=count_blocks(state_dict, "double_blocks."),
        num_single_layers=count_blocks(state_dict, "single_blocks."),
        attention_head_dim=head_dim, num_attention_heads=hidden // head_dim,
        joint_attention_dim=state_dict["txt_in.weight"].shape[1],
        pooled_projection_dim=state_dict["vector_in.in_layer.weight"].shape[1],
        guidance_embeds="guidance_in.in_layer.weight" in state_dict,  # FLUX.1-schnell has none
    )
    return config


def load_flux_lora(path: str | Path) -> dict[str, torch.Tensor]:
    """A UNO-layout (UMO_UNO, this trainer's) or diffusers-peft FLUX LoRA as peft keys of
    FluxTransformer2DModel (`transformer_blocks.0.attn.to_q.lora_A.weight`), its alpha folded into the ups
    so that B @ A is the weight delta."""
    state_dict, metadata = load_lora_file(path)
    layout = detect_lora_format(state_dict, metadata)
    if layout == "uno":
        return uno_to_diffusers(state_dict)
    if layout != "flux_diffusers_peft":
        raise wrong_backbone(path, layout, state_dict, metadata, "FLUX.1 takes UNO or diffusers FLUX.1 LoRAs")
    alpha = peft_alpha(metadata)
    lora = {}
    for key, tensor in state_dict.items():
        key = key.removeprefix("transformer.").removeprefix("base_model.model.")
        if alpha is not None and ".lora_B." in key:
            tensor = tensor * (alpha / tensor.shape[1])
        lora[key] = tensor
    return lora


def merge_lora(transformer, path: str | Path, strength: float = 1.0) -> int:
    """Add a UNO-layout or diffusers-peft FLUX LoRA into the weights (lora_formats.merge_lora_weights); returns the
    number of layers changed."""
    return merge_lora_weights(transformer, load_flux_lora(path), strength)
