"""LoRA files for UMO's backbones: reading, recognising the key layout, converting for ComfyUI.

Layouts (umo-method.md section 5):
- "uno": UNO / UMO_UNO / this project's trainer, FLUX processor keys
  `double_blocks.{i}.processor.{qkv_lora1,proj_lora1,qkv_lora2,proj_lora2}.{down,up}.weight`,
  `single_blocks.{i}.processor.{qkv_lora,proj_lora}.{down,up}.weight`; no alpha (scale 1).
- "omnigen2_peft": UMO_OmniGen2, peft keys `layers.{i}.attn.to_q.lora_A.default.weight` ...
- "comfy": keys already prefixed `diffusion_model.` (ComfyUI's own format).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import UMOError

UNO_KEY = re.compile(r"^(?:diffusion_model\.)?(double|single)_blocks\.\d+\.processor\.\w+\.(down|up)\.weight$")
OMNIGEN2_KEY = re.compile(r"^(?:(?:base_model\.model|transformer)\.)?(layers|context_refiner|noise_refiner|"
                          r"ref_image_refiner)\.\d+\.attn\.to_(q|k|v|out\.0)\.lora_(A|B)(\.default)?\.weight$")
FAMILIES = {"uno": "flux", "omnigen2_peft": "omnigen2"}

# UNO processor module -> the FLUX module of ComfyUI's model it adapts (the mapping ComfyUI's
# own USO/UNO converter uses; it only triggers for full-depth files, so we apply it ourselves).
UNO_TO_COMFY = {
    "qkv_lora1": "img_attn.qkv", "proj_lora1": "img_attn.proj",
    "qkv_lora2": "txt_attn.qkv", "proj_lora2": "txt_attn.proj",
    "qkv_lora": "linear1_qkv", "proj_lora": "linear2",
}


def load_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of a .safetensors LoRA file."""
    path = Path(path)
    if not path.is_file():
        raise UMOError(f"LoRA file '{path}' does not exist; put it in ComfyUI/models/loras")
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise UMOError(f"LoRA file '{path}' is not a readable .safetensors file ({error}); download it again") from None
    if not tensors:
        raise UMOError(f"LoRA file '{path}' holds no tensors")
    return tensors, metadata


def detect_lora_format(state_dict: dict[str, torch.Tensor]) -> str:
    """'uno', 'omnigen2_peft' or 'comfy'; anything else is an error listing what is recognised."""
    keys = list(state_dict)
    if all(UNO_KEY.match(k) for k in keys):
        return "uno"
    if all(OMNIGEN2_KEY.match(k) for k in keys):
        return "omnigen2_peft"
    if all(k.startswith("diffusion_model.") for k in keys):
        return "comfy"
    raise UMOError(
        f"unrecognised LoRA layout (first key '{keys[0]}'). Recognised: UNO/UMO_UNO processor keys "
        "('double_blocks.0.processor.qkv_lora1.down.weight'), UMO_OmniGen2 peft keys "
        "('layers.0.attn.to_q.lora_A.default.weight') and ComfyUI 'diffusion_model.' keys"
    )


def lora_family(state_dict: dict[str, torch.Tensor]) -> str | None:
    """'flux' or 'omnigen2' for the UMO layouts; None for 'comfy' keys (any model)."""
    return FAMILIES.get(detect_lora_format(state_dict))


def check_family(lora_name: str, lora_family_name: str | None, model_family: str | None) -> None:
    """A LoRA meant for another backbone is an error, never a silent no-op."""
    if lora_family_name is not None and lora_family_name != model_family:
        expected = {"flux": "a FLUX.1 model (flux1-dev)", "omnigen2": "an OmniGen2 model"}[lora_family_name]
        raise UMOError(f"LoRA '{lora_name}' is a {lora_family_name} LoRA but the model is "
                       f"{model_family or 'neither FLUX nor OmniGen2'}; load it on {expected}")


def to_comfy_lora(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys ComfyUI's LoRA loader (`comfy.lora.load_lora` with the model's key map) applies."""
    layout = detect_lora_format(state_dict)
    converted = {}
    for key, tensor in state_dict.items():
        if layout == "uno":
            block, _, module, direction, _ = key.removeprefix("diffusion_model.").rsplit(".", 4)
            block = block.removesuffix(".processor")
            converted[f"diffusion_model.{block}.{UNO_TO_COMFY[module]}.lora_{direction}.weight"] = tensor
        elif layout == "omnigen2_peft":
            # ComfyUI maps OmniGen2 module paths without prefix; peft adds an adapter name.
            key = re.sub(r"^(base_model\.model|transformer)\.", "", key).replace(".default.", ".")
            converted[key] = tensor
        else:
            converted[key] = tensor
    return converted
