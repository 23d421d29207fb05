"""LoRA files for UMO's backbones: reading, writing, recognising the key layout, converting between layouts.

Layouts (the README's "LoRA files and key layouts"), as `detect_lora_format` names them:
- "uno": UNO / UMO_UNO / this project's trainer, FLUX processor keys
  `double_blocks.{i}.processor.{qkv_lora1,proj_lora1,qkv_lora2,proj_lora2}.{down,up}.weight`,
  `single_blocks.{i}.processor.{qkv_lora,proj_lora}.{down,up}.weight` (optionally `diffusion_model.`-prefixed);
  no alpha: delta = up @ down.
- "omnigen2_peft": UMO_OmniGen2, peft keys `layers.{i}.attn.to_q.lora_A.default.weight` ...
- "flux_diffusers_peft": peft LoRA of diffusers' FluxTransformer2DModel,
  `[transformer.]transformer_blocks.{i}.attn.to_q.lora_A[.default].weight` ...; delta = B @ A * alpha / r.
- "comfy": keys already prefixed `diffusion_model.` (ComfyUI's own format, e.g. UMO's converted OmniGen2 file).

How UNO's modules sit in the two FLUX implementations (the same mapping ComfyUI's USO/UNO converter and
diffusers' XLabs converter use):
- double block: qkv_lora1 = image q,k,v (ComfyUI `img_attn.qkv`, diffusers `attn.to_q/to_k/to_v`),
  proj_lora1 = image output (`img_attn.proj`, `attn.to_out.0`), qkv_lora2 / proj_lora2 the same for the
  text stream (`txt_attn.*`, `attn.add_{q,k,v}_proj` / `attn.to_add_out`);
- single block: qkv_lora = the q,k,v rows of `linear1` (diffusers `attn.to_q/to_k/to_v`), proj_lora =
  `linear2` (diffusers `proj_out`), whose input is attention + MLP (3072 + 12288 = 15360 in FLUX.1).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import UMOError
from ..files import save_tensors

# Metadata the project's trainer writes into its LoRA files.
FORMAT_METADATA_KEY = "umo_format"
BASE_MODEL_METADATA_KEY = "umo_base_model"

# UNO processor module -> (the module of ComfyUI's FLUX it adapts, the FluxTransformer2DModel modules it spans).
UNO_MODULES = {
    "qkv_lora1": ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    "proj_lora1": ("img_attn.proj", ("attn.to_out.0",)),
    "qkv_lora2": ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    "proj_lora2": ("txt_attn.proj", ("attn.to_add_out",)),
    "qkv_lora": ("linear1_qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    "proj_lora": ("linear2", ("proj_out",)),
}
# UNO / ComfyUI block name -> diffusers block name.
DIFFUSERS_BLOCKS = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}
BLOCK_NAME = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.")

UNO_KEY = re.compile(r"^(?:diffusion_model\.)?(?:"
                     r"(?P<double>double_blocks)\.(?P<i>\d+)\.processor\.(?P<dm>qkv_lora[12]|proj_lora[12])|"
                     r"(?P<single>single_blocks)\.(?P<j>\d+)\.processor\.(?P<sm>qkv_lora|proj_lora))"
                     r"\.(?P<direction>down|up)\.weight$")
OMNIGEN2_MODULE = r"(?:layers|noise_refiner|ref_image_refiner|context_refiner)\.\d+\.attn\.(?:to_q|to_k|to_v|to_out\.0)"
OMNIGEN2_KEY = re.compile(rf"^(?:base_model\.model\.|transformer\.)?(?P<module>{OMNIGEN2_MODULE})"
                          r"\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")
# Every Linear of FluxTransformer2DModel (the test checks this list against the real class).
FLUX_DIFFUSERS_MODULE = (
    r"transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.(?:0\.proj|2)|ff_context\.net\.(?:0\.proj|2)|norm1\.linear|norm1_context\.linear)"
    r"|single_transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v)|proj_mlp|proj_out|norm\.linear)"
    r"|x_embedder|context_embedder|proj_out|norm_out\.linear"
    r"|time_text_embed\.(?:timestep_embedder|guidance_embedder|text_embedder)\.linear_[12]"
)
FLUX_DIFFUSERS_KEY = re.compile(rf"^(?:transformer\.|base_model\.model\.)?(?P<module>{FLUX_DIFFUSERS_MODULE})"
                                r"\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")
# ComfyUI-format keys of the modules UMO's LoRAs adapt, to tell the family of an already converted file.
COMFY_FAMILY_KEYS = {
    "flux": re.compile(r"^diffusion_model\.(?:double_blocks\.\d+\.(?:img|txt)_attn\.(?:qkv|proj)"
                       r"|single_blocks\.\d+\.(?:linear1_qkv|linear1|linear2))\.(?:lora_(?:up|down|A|B)\.weight|alpha)$"),
    "omnigen2": re.compile(rf"^diffusion_model\.{OMNIGEN2_MODULE}\.(?:lora_(?:up|down|A|B)\.weight|alpha)$"),
}
LAYOUT_KEYS = {"uno": UNO_KEY, "omnigen2_peft": OMNIGEN2_KEY, "flux_diffusers_peft": FLUX_DIFFUSERS_KEY}
FAMILIES = {"uno": "flux", "flux_diffusers_peft": "flux", "omnigen2_peft": "omnigen2"}
FAMILY_MODELS = {"flux": "a FLUX.1 model (flux1-dev)", "omnigen2": "an OmniGen2 model"}

# peft `target_modules` (a full-match regex over module names) of a FluxTransformer2DModel LoRA that
# `diffusers_to_uno` can save in UNO's layout; a plain name list would also catch the top-level `proj_out`.
UNO_TARGET_MODULES = (r"transformer_blocks\.\d+\.attn\."
                      r"(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
                      r"|single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_out)")


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
        raise UMOError(f"LoRA file '{path}' is not a readable .safetensors file ({error}); "
                       "download or convert it again") from None
    if not tensors:
        raise UMOError(f"LoRA file '{path}' holds no tensors; download or train it again")
    return tensors, metadata


def save_lora_file(path: str | Path, state_dict: dict[str, torch.Tensor],
                   metadata: dict[str, str] | None = None) -> None:
    """Write a .safetensors LoRA with `save_tensors`: an interrupted save never leaves a truncated LoRA behind,
    and the file gets the usual permissions."""
    path = Path(path)
    metadata = dict(metadata or {})
    not_text = [key for key, value in metadata.items() if not isinstance(key, str) or not isinstance(value, str)]
    if not_text:
        raise UMOError(f"LoRA metadata for '{path}' must map text to text; convert {not_text} to str")
    save_tensors(path, state_dict, metadata)


def detect_lora_format(state_dict: dict[str, torch.Tensor]) -> str:
    """'uno', 'omnigen2_peft', 'flux_diffusers_peft' or 'comfy'; anything else is an error listing what is known."""
    keys = list(state_dict)
    if not keys:
        raise UMOError("the LoRA holds no tensors; download or train it again")
    for layout, pattern in LAYOUT_KEYS.items():
        if all(pattern.match(key) for key in keys):
            return layout
    if all(key.startswith("diffusion_model.") for key in keys):
        return "comfy"
    unknown = next(key for key in keys if not key.startswith("diffusion_model."))
    raise UMOError(
        f"unrecognised LoRA layout (key '{unknown}'). Recognised: UNO/UMO_UNO processor keys "
        "('double_blocks.0.processor.qkv_lora1.down.weight'), UMO_OmniGen2 peft keys "
        "('layers.0.attn.to_q.lora_A.default.weight'), diffusers/peft FluxTransformer2DModel keys "
        "('transformer.transformer_blocks.0.attn.to_q.lora_A.weight') and ComfyUI 'diffusion_model.' keys"
    )


def lora_family(state_dict: dict[str, torch.Tensor]) -> str | None:
    """'flux' or 'omnigen2'; None for ComfyUI-format keys of other modules (the LoRA may be for any model)."""
    layout = detect_lora_format(state_dict)
    if layout != "comfy":
        return FAMILIES[layout]
    for family, pattern in COMFY_FAMILY_KEYS.items():
        if all(pattern.match(key) for key in state_dict):
            return family
    return None


def check_family(lora_name: str, lora_family_name: str | None, model_family: str | None) -> None:
    """A LoRA meant for another backbone is an error, never a silent no-op."""
    if lora_family_name is not None and lora_family_name != model_family:
        raise UMOError(f"LoRA '{lora_name}' is a {lora_family_name} LoRA but the model is "
                       f"{model_family or 'neither FLUX nor OmniGen2'}; load it on {FAMILY_MODELS[lora_family_name]}")


def peft_alpha(metadata: dict[str, str]) -> float | None:
    """lora_alpha from diffusers' `lora_adapter_metadata` entry (a LoraConfig as JSON), if the file has one."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    config = json.loads(raw)
    if config.get("alpha_pattern") or config.get("transformer.alpha_pattern"):
        raise UMOError("LoRA with a per-module alpha_pattern is not supported; merge the alphas into lora_B first")
    alpha = config.get("lora_alpha", config.get("transformer.lora_alpha"))
    return None if alpha is None else float(alpha)


def to_comfy_lora(state_dict: dict[str, torch.Tensor],
                  metadata: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Keys that ComfyUI's LoRA loader (`comfy.lora.load_lora` with the model's key map) applies.

    ComfyUI converts UNO keys itself only for full-depth FLUX files (its check looks for double block 18 and
    single block 37), so UNO keys are always converted here, the way ComfyUI's own converter does. diffusers
    keys go under `transformer.`, which ComfyUI's FLUX key map accepts (q/k/v land in the fused qkv rows);
    peft's alpha comes from diffusers' metadata when the file has it (ComfyUI scales by alpha / rank).
    """
    layout = detect_lora_format(state_dict)
    converted = {}
    for key, tensor in state_dict.items():
        if layout == "uno":
            match = UNO_KEY.match(key)
            block = match["double"] or match["single"]
            index = match["i"] or match["j"]
            comfy_module = UNO_MODULES[match["dm"] or match["sm"]][0]
            converted[f"diffusion_model.{block}.{index}.{comfy_module}.lora_{match['direction']}.weight"] = tensor
        elif layout == "omnigen2_peft":
            match = OMNIGEN2_KEY.match(key)
            converted[f"diffusion_model.{match['module']}.lora_{match['ab']}.weight"] = tensor
        elif layout == "flux_diffusers_peft":
            match = FLUX_DIFFUSERS_KEY.match(key)
            converted[f"transformer.{match['module']}.lora_{match['ab']}.weight"] = tensor
        else:
            converted[key] = tensor
    alpha = peft_alpha(metadata or {}) if layout == "flux_diffusers_peft" else None
    if alpha is not None:
        for key in [key for key in converted if key.endswith(".lora_A.weight")]:
            converted[key.removesuffix(".lora_A.weight") + ".alpha"] = torch.tensor(alpha)
    return converted


def _peft_pairs(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """FluxTransformer2DModel peft keys -> {module name: {"A": down, "B": up}}, prefixes and adapter name removed."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        match = FLUX_DIFFUSERS_KEY.match(key)
        if match is None:
            raise UMOError(f"LoRA key '{key}' is not a peft key of diffusers' FluxTransformer2DModel "
                           "(e.g. 'transformer_blocks.0.attn.to_q.lora_A.weight')")
        pairs.setdefault(match["module"], {})[match["ab"]] = tensor
    halves = [module for module, pair in pairs.items() if len(pair) != 2]
    if halves:
        raise UMOError(f"LoRA has lora_A without lora_B (or the reverse) for {halves[:3]}; the file is incomplete")
    return pairs


def diffusers_to_uno(state_dict: dict[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """peft LoRA of FluxTransformer2DModel (`transformer_blocks.0.attn.to_q.lora_A.weight` ...) -> UNO layout.

    `scale` is peft's alpha / r, folded into the ups (UNO has no alpha). UNO fuses q, k and v into one LoRA:
    when the three downs are equal (a LoRA that came from UNO's layout) they stay shared and the rank is kept;
    otherwise the downs are stacked and the ups placed block-diagonally, which is exact but triples the rank of
    the qkv LoRAs. A q/k/v module without a LoRA contributes zero rows. Modules UNO has no place for (the MLPs,
    modulation, embedders) are an error, never dropped.
    """
    pairs = _peft_pairs(state_dict)
    converted = {}
    placed = set()
    block_indices = {(match[1], int(match[2])) for match in map(BLOCK_NAME.match, pairs) if match}
    for uno_block, diffusers_block in DIFFUSERS_BLOCKS.items():
        indices = sorted(index for block, index in block_indices if block == diffusers_block)
        uno_modules = [m for m in UNO_MODULES if m.endswith(("1", "2")) == (uno_block == "double_blocks")]
        for index, uno_module in ((index, m) for index in indices for m in uno_modules):
            names = [f"{diffusers_block}.{index}.{m}" for m in UNO_MODULES[uno_module][1]]
            present = [pairs[name] for name in names if name in pairs]
            if not present:
                continue
            placed.update(name for name in names if name in pairs)
            downs = [pairs[name]["A"] if name in pairs else None for name in names]
            ups = [pairs[name]["B"] * scale if name in pairs else None for name in names]
            key = f"{uno_block}.{index}.processor.{uno_module}"
            if all(down is not None for down in downs) and all(torch.equal(downs[0], down) for down in downs[1:]):
                converted[f"{key}.down.weight"] = downs[0].clone()
                converted[f"{key}.up.weight"] = torch.cat(ups)
                continue
            reference = present[0]
            inputs, outputs = reference["A"].shape[1], reference["B"].shape[0]
            downs = [down if down is not None else reference["A"].new_zeros(0, inputs) for down in downs]
            ups = [up if up is not None else reference["B"].new_zeros(outputs, 0) for up in ups]
            converted[f"{key}.down.weight"] = torch.cat(downs)
            converted[f"{key}.up.weight"] = torch.block_diag(*ups)
    unplaced = sorted(set(pairs) - placed)
    if unplaced:
        raise UMOError(f"LoRA modules {unplaced[:4]} have no place in UNO's layout (it adapts attention q/k/v and "
                       f"outputs only); train with target_modules=UNO_TARGET_MODULES")
    return converted


def uno_to_diffusers(state_dict: dict[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """UNO layout -> peft keys of FluxTransformer2DModel (`transformer_blocks.0.attn.to_q.lora_A.weight` ...).

    The keys are what `peft.set_peft_model_state_dict` takes (no adapter name). The ups are divided by `scale`
    (peft's alpha / r of the adapter they are loaded into), so the weight deltas are UNO's exactly. A fused qkv
    LoRA of rank R becomes three LoRAs: when its up is block-diagonal in three equal blocks (what
    `diffusers_to_uno` writes for separately trained q, k, v) each gets its own rank R/3 part back; otherwise all
    three share UNO's down (rank R each, as diffusers' XLabs converter does). Both are exact.
    """
    if detect_lora_format(state_dict) != "uno":
        raise UMOError("uno_to_diffusers needs a LoRA in UNO's processor layout "
                       "('double_blocks.0.processor.qkv_lora1.down.weight' ...)")
    fused: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        match = UNO_KEY.match(key)
        block = match["double"] or match["single"]
        module = (block, match["i"] or match["j"], match["dm"] or match["sm"])
        fused.setdefault(module, {})[match["direction"]] = tensor
    converted = {}
    for (block, index, uno_module), pair in fused.items():
        if len(pair) != 2:
            raise UMOError(f"LoRA has only the {list(pair)[0]} half of {block}.{index}.processor.{uno_module}; "
                           "the file is incomplete")
        down, up = pair["down"], pair["up"] / scale
        modules = UNO_MODULES[uno_module][1]
        parts = len(modules)
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1] or up.shape[0] % parts:
            raise UMOError(f"LoRA module {block}.{index}.processor.{uno_module} has mismatched shapes "
                           f"(down {list(down.shape)}, up {list(up.shape)}); the file is damaged")
        rank, outputs = down.shape[0], up.shape[0] // parts
        ups = up.split(outputs)
        if parts > 1 and rank % parts == 0:
            width = rank // parts
            blocks = [part[:, i * width:(i + 1) * width] for i, part in enumerate(ups)]
            block_diagonal = torch.equal(torch.block_diag(*blocks), up)
        else:
            block_diagonal = False
        for i, module in enumerate(modules):
            name = f"{DIFFUSERS_BLOCKS[block]}.{index}.{module}"
            if block_diagonal:
                converted[f"{name}.lora_A.weight"] = down[i * width:(i + 1) * width].clone()
                converted[f"{name}.lora_B.weight"] = blocks[i].clone()
            else:
                converted[f"{name}.lora_A.weight"] = down.clone()
                converted[f"{name}.lora_B.weight"] = ups[i].clone()
    return converted
