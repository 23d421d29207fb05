"""FLUX.1 models from the files people have, offline: the transformer, the autoencoder and LoRAs.

Single files in Black Forest Labs' layout (what ComfyUI loads) or diffusers folders; every path is checked
from its config or header first, so a wrong file is named before any weight is read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open

from ...errors import UMOError
from ..lora_formats import detect_lora_format, load_lora_file, peft_alpha, uno_to_diffusers
from .keys import COMFY_MODEL_PREFIX, TRANSFORMER_REQUIRED, VAE_REQUIRED, flux_bfl_to_diffusers
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
        return _from_diffusers_folder(FluxTransformer2DModel, path, dtype, "FLUX transformer", TRANSFORMER_FILES)
    state_dict = _read_single_file(path, dtype, "FLUX transformer", TRANSFORMER_FILES, TRANSFORMER_REQUIRED,
                                   COMFY_MODEL_PREFIX)
    config = _transformer_config(state_dict, path)
    state_dict = flux_bfl_to_diffusers(state_dict)
    with torch.device("meta"):  # no memory for weights that are replaced right away
        model = FluxTransformer2DModel.from_config(config)
    expected = model.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    misshapen = sorted(key for key in expected.keys() & state_dict.keys()
                       if state_dict[key].shape != expected[key].shape)
    problems = "; ".join(f"{label} {names[:3]}" for label, names in
                         (("missing", missing), ("unknown", unexpected), ("of other shapes", misshapen)) if names)
    if problems:
        raise UMOError(f"FLUX transformer '{path}' does not fit FLUX.1's architecture (weights {problems}, in "
                       f"diffusers' names); give {TRANSFORMER_FILES}")
    model.load_state_dict(state_dict, assign=True)
    return model.eval()


def load_vae(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> AutoencoderKL:
    """FLUX's AutoencoderKL from a diffusers `vae/` folder or Black Forest Labs' single ae.safetensors, offline."""
    from diffusers import AutoencoderKL

    path = Path(path)
    check_vae(path)
    if path.is_dir():
        return _from_diffusers_folder(AutoencoderKL, path, dtype, "FLUX autoencoder", VAE_FILES)
    state_dict = _read_single_file(path, dtype, "FLUX autoencoder", VAE_FILES, VAE_REQUIRED)
    latent_channels = state_dict["decoder.conv_in.weight"].shape[1]
    levels = _count_blocks(state_dict, "encoder.down.")
    # diffusers converts the layout itself; the architecture comes from the file's shapes.
    vae = AutoencoderKL.from_single_file(
        state_dict, config=str(VAE_CONFIG), local_files_only=True, torch_dtype=dtype,
        in_channels=state_dict["encoder.conv_in.weight"].shape[1],
        out_channels=state_dict["decoder.conv_out.weight"].shape[0],
        latent_channels=latent_channels,
        block_out_channels=[state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)],
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
        layers_per_block=_count_blocks(state_dict, "encoder.down.0.block."),
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
                  **_diffusers_config(path, "FluxTransformer2DModel", "FLUX transformer", TRANSFORMER_FILES)}
        return config["joint_attention_dim"], config["pooled_projection_dim"]
    with _open_single_file(path, "FLUX transformer", TRANSFORMER_FILES, TRANSFORMER_REQUIRED,
                           COMFY_MODEL_PREFIX) as (handle, names):
        return (handle.get_slice(names["txt_in.weight"]).get_shape()[1],
                handle.get_slice(names["vector_in.in_layer.weight"]).get_shape()[1])


def check_vae(path: str | Path) -> None:
    """A UMOError unless `path` is a FLUX autoencoder (16 latent channels), read from its folder's config.json or
    its file's header without loading weights."""
    path = Path(path)
    if path.is_dir():
        config = _diffusers_config(path, "AutoencoderKL", "FLUX autoencoder", VAE_FILES)
        latent_channels = config.get("latent_channels", LATENT_CHANNELS)
    else:
        with _open_single_file(path, "FLUX autoencoder", VAE_FILES, VAE_REQUIRED) as (handle, names):
            latent_channels = handle.get_slice(names["decoder.conv_in.weight"]).get_shape()[1]
    if latent_channels != LATENT_CHANNELS:
        raise UMOError(f"autoencoder '{path}' has {latent_channels} latent channels, FLUX's has "
                       f"{LATENT_CHANNELS} (is it a Stable Diffusion VAE?); give {VAE_FILES}")


def _diffusers_config(path: Path, class_name: str, what: str, expected: str) -> dict:
    """The config.json of a diffusers model folder, checked to be one of `class_name`."""
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise UMOError(f"{what} folder '{path}' has no config.json; give {expected}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UMOError(f"{what} folder '{path}': config.json is not readable JSON ({error}); give {expected}") from None
    if not isinstance(config, dict) or config.get("_class_name", class_name) != class_name:
        found = config.get("_class_name") if isinstance(config, dict) else None
        raise UMOError(f"{what} folder '{path}' holds a {found or 'model of an unknown kind'}, not a {class_name}; "
                       f"give {expected}")
    return config


def _from_diffusers_folder(model_class, path: Path, dtype: torch.dtype, what: str, expected: str):
    _diffusers_config(path, model_class.__name__, what, expected)
    return model_class.from_pretrained(path, torch_dtype=dtype, local_files_only=True)


@contextmanager
def _open_single_file(path: Path, what: str, expected: str, required: tuple[str, ...],
                      prefix: str = "") -> Iterator[tuple[object, dict[str, str]]]:
    """The open .safetensors file `path` and its tensor names -> keys, after checking the names in `required` are
    there (those under `prefix` only, without it, when the file has such keys); reads the header only."""
    if not path.is_file():
        raise UMOError(f"{what} '{path}' does not exist; give {expected}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            if prefix and any(key.startswith(prefix) for key in keys):
                keys = [key for key in keys if key.startswith(prefix)]
            names = {key.removeprefix(prefix): key for key in keys}
            missing = [name for name in required if name not in names]
            if missing:
                lora = " (it looks like a LoRA)" if any("lora" in key.lower() for key in keys) else ""
                raise UMOError(f"'{path}' is not a {what}{lora}: it has no tensor '{missing[0]}'; give {expected}")
            yield handle, names
    except (SafetensorError, OSError, ValueError) as error:
        raise UMOError(f"{what} '{path}' is not a readable .safetensors file ({error}); give {expected}") from None


def _read_single_file(path: Path, dtype: torch.dtype, what: str, expected: str, required: tuple[str, ...],
                      prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of the .safetensors file `path` (see _open_single_file), in `dtype`."""
    with _open_single_file(path, what, expected, required, prefix) as (handle, names):
        return {name: handle.get_tensor(key).to(dtype) for name, key in names.items()}


def _count_blocks(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    """How many numbered blocks `prefix`0., `prefix`1., ... the state dict has."""
    return len({key.removeprefix(prefix).split(".")[0] for key in state_dict if key.startswith(prefix)})


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
        num_layers=_count_blocks(state_dict, "double_blocks."),
        num_single_layers=_count_blocks(state_dict, "single_blocks."),
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

