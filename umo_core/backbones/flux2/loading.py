"""FLUX.2 models from the files people have, offline: the transformer and the autoencoder, and the variant of a
transformer (which decides the sampling defaults).

Single files in Black Forest Labs' layout (flux-2-klein-4b.safetensors, flux-2-dev.safetensors ..., as ComfyUI's
models/diffusion_models holds them, also with ComfyUI's `model.diffusion_model.` prefix; flux2-vae.safetensors as in
models/vae) or diffusers folders. The architecture numbers are read from the file's tensors on top of the shipped
configs; diffusers' own converters map the names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import UMOError
from .. import model_files
from .runtime import LATENT_CHANNELS

CONFIGS = Path(__file__).parent / "configs"
# The real architectures (diffusers' transformer/config.json of each download), shipped for single files and the
# bench; the numbers a single file fixes are read from it on top of TRANSFORMER_CONFIG.
TRANSFORMER_CONFIGS = {name: CONFIGS / f"flux2-{name}-transformer.json" for name in ("klein-4b", "klein-9b", "dev")}
TRANSFORMER_CONFIG = TRANSFORMER_CONFIGS["klein-4b"]
VAE_CONFIG = CONFIGS / "flux2-vae.json"
COMFY_MODEL_PREFIX = "model.diffusion_model."
TRANSFORMER_REQUIRED = ("img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "final_layer.linear.weight",
                        "single_stream_modulation.lin.weight", "double_blocks.0.img_attn.norm.query_norm.scale")
VAE_REQUIRED = ("encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight", "bn.running_mean",
                "bn.running_var")
TRANSFORMER_FILES = ("a FLUX.2 transformer: flux-2-klein-4b.safetensors, flux-2-klein-base-4b.safetensors, the 9B "
                     "ones or flux-2-dev.safetensors (Black Forest Labs' layout, as in ComfyUI's "
                     "models/diffusion_models) or the 'transformer' folder of a diffusers FLUX.2 download")
VAE_FILES = ("the FLUX.2 autoencoder: flux2-vae.safetensors (as in ComfyUI's models/vae) or the 'vae' folder of a "
             "diffusers FLUX.2 download")


@dataclass(frozen=True)
class Variant:
    """What a FLUX.2 transformer is, for the sampling defaults (those of the diffusers pipelines)."""

    name: str
    distilled: bool  # klein's step-distilled models: few steps, no classifier-free guidance
    steps: int
    guidance: float
    classifier_free_guidance: bool  # guidance above 1 is a second pass on the empty prompt (klein base)


DISTILLED = Variant("klein (distilled)", True, 4, 1.0, False)
BASE = Variant("klein base", False, 50, 4.0, True)
DEV = Variant("dev", False, 50, 4.0, False)  # guidance-distilled: guidance is an input of the transformer


def transformer_variant(path: str | Path) -> Variant:
    """dev when the transformer embeds guidance; for klein, distilled or base from the diffusers download's
    model_index.json (`is_distilled`) or, for a single file, its name (Black Forest Labs name the base models
    `flux-2-klein-base-*`)."""
    path = Path(path)
    if transformer_config(path)["guidance_embeds"]:
        return DEV
    if path.is_dir():
        index = path.parent / "model_index.json"
        distilled = index.is_file() and _model_index(index).get("is_distilled", False)
    else:
        distilled = "base" not in path.name.lower()
    return DISTILLED if distilled else BASE


def _model_index(index: Path) -> dict:
    """A diffusers download's model_index.json (the variant's `is_distilled`)."""
    try:
        value = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UMOError(f"'{index}' (beside the FLUX.2 transformer folder) is not readable JSON ({error}); fetch it "
                       "again: it says whether the model is distilled") from None
    if not isinstance(value, dict):
        raise UMOError(f"'{index}' (beside the FLUX.2 transformer folder) is not a JSON object; fetch it again: it "
                       "says whether the model is distilled")
    return value


def transformer_config(path: str | Path) -> dict:
    """The diffusers config of the transformer at `path`: its folder's config.json, or the shipped one with the
    numbers its single file's header fixes. Reads no weights."""
    path = Path(path)
    config = json.loads(TRANSFORMER_CONFIG.read_text())
    if path.is_dir():
        return {**config, **model_files.diffusers_config(path, "Flux2Transformer2DModel", "FLUX.2 transformer",
                                                         TRANSFORMER_FILES)}
    with model_files.open_single_file(path, "FLUX.2 transformer", TRANSFORMER_FILES, TRANSFORMER_REQUIRED,
                                      COMFY_MODEL_PREFIX) as (handle, names):
        def shape(name: str) -> list[int]:
            return handle.get_slice(names[name]).get_shape()

        hidden, in_channels = shape("img_in.weight")
        head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
        if hidden % head_dim or head_dim % 4:
            raise UMOError(f"FLUX.2 transformer '{path}' has attention heads of {head_dim} channels in a width of "
                           f"{hidden}; give {TRANSFORMER_FILES}")
        config.update(
            in_channels=in_channels, out_channels=shape("final_layer.linear.weight")[0],
            num_layers=model_files.count_blocks(names, "double_blocks."),
            num_single_layers=model_files.count_blocks(names, "single_blocks."),
            attention_head_dim=head_dim, num_attention_heads=hidden // head_dim,
            # FLUX.2's rotary embedding splits a head into four equal axes (4 x 32 in the real models).
            axes_dims_rope=[head_dim // 4] * 4,
            joint_attention_dim=shape("txt_in.weight")[1],
            timestep_guidance_channels=shape("time_in.in_layer.weight")[1],
            mlp_ratio=shape("double_blocks.0.img_mlp.0.weight")[0] / 2 / hidden,  # SwiGLU: gate and value rows
            guidance_embeds="guidance_in.in_layer.weight" in names,
        )
    return config


def transformer_text_widths(path: str | Path) -> tuple[int]:
    """The width of the text embedding (`prompt_embeds`) the transformer at `path` takes; reads no weights."""
    return (transformer_config(path)["joint_attention_dim"],)


def load_transformer(path: str | Path, dtype: torch.dtype = torch.bfloat16):
    """Flux2Transformer2DModel from a diffusers `transformer/` folder or one .safetensors file in Black Forest
    Labs' layout, offline."""
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    path = Path(path)
    if path.is_dir():
        return model_files.from_diffusers_folder(Flux2Transformer2DModel, path, dtype, "FLUX.2 transformer",
                                                 TRANSFORMER_FILES)
    config = transformer_config(path)
    state_dict = model_files.read_single_file(path, dtype, "FLUX.2 transformer", TRANSFORMER_FILES,
                                              TRANSFORMER_REQUIRED, COMFY_MODEL_PREFIX)
    state_dict = convert_flux2_transformer_checkpoint_to_diffusers(state_dict)
    return model_files.model_from_state_dict(Flux2Transformer2DModel, config, state_dict,
                                             f"FLUX.2 transformer '{path}' does not fit FLUX.2's architecture",
                                             f"give {TRANSFORMER_FILES}")


def check_vae(path: str | Path) -> None:
    """A UMOError unless `path` is FLUX.2's autoencoder (32 latent channels and the batch-norm statistics), read from
    its folder's config.json or its file's header without loading weights."""
    path = Path(path)
    if path.is_dir():
        config = model_files.diffusers_config(path, "AutoencoderKLFlux2", "FLUX.2 autoencoder", VAE_FILES)
        latent_channels = config.get("latent_channels", 32)
    else:
        with model_files.open_single_file(path, "FLUX.2 autoencoder", VAE_FILES, VAE_REQUIRED) as (handle, names):
            latent_channels = handle.get_slice(names["decoder.conv_in.weight"]).get_shape()[1]
    if latent_channels * 4 != LATENT_CHANNELS:
        raise UMOError(f"autoencoder '{path}' has {latent_channels} latent channels, FLUX.2's has "
                       f"{LATENT_CHANNELS // 4} (is it FLUX.1's ae.safetensors?); give {VAE_FILES}")


def load_vae(path: str | Path, dtype: torch.dtype = torch.bfloat16):
    """AutoencoderKLFlux2 from a diffusers `vae/` folder or the single flux2-vae.safetensors (the LDM layout that
    diffusers' converter reads, plus the batch-norm statistics), offline."""
    from diffusers import AutoencoderKLFlux2
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    path = Path(path)
    check_vae(path)
    if path.is_dir():
        return model_files.from_diffusers_folder(AutoencoderKLFlux2, path, dtype, "FLUX.2 autoencoder", VAE_FILES)
    state_dict = model_files.read_single_file(path, dtype, "FLUX.2 autoencoder", VAE_FILES, VAE_REQUIRED)
    levels = model_files.count_blocks(state_dict, "encoder.down.")
    config = {**json.loads(VAE_CONFIG.read_text()),
              "latent_channels": state_dict["decoder.conv_in.weight"].shape[1],
              "block_out_channels": [state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]
                                     for i in range(levels)],
              "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
              "layers_per_block": model_files.count_blocks(state_dict, "encoder.down.0.block."),
              "use_quant_conv": "quant_conv.weight" in state_dict,
              "use_post_quant_conv": "post_quant_conv.weight" in state_dict,
              "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in state_dict}
    converted = convert_ldm_vae_checkpoint(state_dict, config)
    converted.update({key: value for key, value in state_dict.items() if key.startswith("bn.")})
    converted.setdefault("bn.num_batches_tracked", torch.tensor(0))  # a counter that only training uses
    return model_files.model_from_state_dict(AutoencoderKLFlux2, config, converted,
                                             f"FLUX.2 autoencoder '{path}' does not fit FLUX.2's architecture",
                                             f"give {VAE_FILES}")
