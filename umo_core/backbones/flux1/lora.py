"""FLUX.1's LoRA layouts: UNO's processor keys and diffusers' peft keys, converted between and to ComfyUI's.

- "uno": UNO / UMO_UNO / this project's trainer, FLUX processor keys
  `double_blocks.{i}.processor.{qkv_lora1,proj_lora1,qkv_lora2,proj_lora2}.{down,up}.weight`,
  `single_blocks.{i}.processor.{qkv_lora,proj_lora}.{down,up}.weight` (optionally `diffusion_model.`-prefixed);
  no alpha: delta = up @ down.
- "flux_diffusers_peft": peft LoRA of diffusers' FluxTransformer2DModel,
  `[transformer.]transformer_blocks.{i}.attn.to_q.lora_A[.default].weight` ...; delta = B @ A * alpha / r.

How UNO's modules sit in the two FLUX implementations (the same mapping ComfyUI's USO/UNO converter and
diffusers' XLabs converter use):
- double block: qkv_lora1 = image q,k,v (ComfyUI `img_attn.qkv`, diffusers `attn.to_q/to_k/to_v`),
  proj_lora1 = image output (`img_attn.proj`, `attn.to_out.0`), qkv_lora2 / proj_lora2 the same for the
  text stream (`txt_attn.*`, `attn.add_{q,k,v}_proj` / `attn.to_add_out`);
- single block: qkv_lora = the q,k,v rows of `linear1` (diffusers `attn.to_q/to_k/to_v`), proj_lora =
  `linear2` (diffusers `proj_out`), whose input is attention + MLP (3072 + 12288 = 15360 in FLUX.1).
"""

from __future__ import annotations

import re

import torch

from ...errors import UMOError
from ..flux_family import BLOCK_NAME, DOUBLE_BLOCK_ATTENTION
from ..lora_formats import Family, Layout, fuse_pairs, peft_alpha, peft_key, peft_pairs, split_fused

BACKBONE = "flux1"

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

UNO_KEY = re.compile(r"^(?:diffusion_model\.)?(?:"
                     r"(?P<double>double_blocks)\.(?P<i>\d+)\.processor\.(?P<dm>qkv_lora[12]|proj_lora[12])|"
                     r"(?P<single>single_blocks)\.(?P<j>\d+)\.processor\.(?P<sm>qkv_lora|proj_lora))"
                     r"\.(?P<direction>down|up)\.weight$")
# Every Linear of FluxTransformer2DModel (the test checks this list against the real class).
FLUX_DIFFUSERS_MODULE = (
    r"transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.(?:0\.proj|2)|ff_context\.net\.(?:0\.proj|2)|norm1\.linear|norm1_context\.linear)"
    r"|single_transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v)|proj_mlp|proj_out|norm\.linear)"
    r"|x_embedder|context_embedder|proj_out|norm_out\.linear"
    r"|time_text_embed\.(?:timestep_embedder|guidance_embedder|text_embedder)\.linear_[12]"
)
FLUX_DIFFUSERS_KEY = peft_key(FLUX_DIFFUSERS_MODULE)
PEFT_EXAMPLE = "transformer_blocks.0.attn.to_q.lora_A.weight"

# peft `target_modules` (a full-match regex over module names) of a FluxTransformer2DModel LoRA that
# `diffusers_to_uno` can save in UNO's layout; a plain name list would also catch the top-level `proj_out`.
UNO_TARGET_MODULES = DOUBLE_BLOCK_ATTENTION + r"|single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_out)"


def diffusers_to_uno(state_dict: dict[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """peft LoRA of FluxTransformer2DModel (`transformer_blocks.0.attn.to_q.lora_A.weight` ...) -> UNO layout.

    `scale` is peft's alpha / r, folded into the ups (UNO has no alpha). UNO fuses q, k and v into one LoRA
    (lora_formats.fuse_pairs: exact; the rank is kept when the three downs are equal, tripled otherwise). Modules
    UNO has no place for (the MLPs, modulation, embedders) are an error, never dropped.
    """
    pairs = peft_pairs(state_dict, FLUX_DIFFUSERS_KEY, PEFT_EXAMPLE)
    converted = {}
    placed = set()
    block_indices = {(match[1], int(match[2])) for match in map(BLOCK_NAME.match, pairs) if match}
    for uno_block, diffusers_block in DIFFUSERS_BLOCKS.items():
        indices = sorted(index for block, index in block_indices if block == diffusers_block)
        uno_modules = [m for m in UNO_MODULES if m.endswith(("1", "2")) == (uno_block == "double_blocks")]
        for index, uno_module in ((index, m) for index in indices for m in uno_modules):
            names = [f"{diffusers_block}.{index}.{m}" for m in UNO_MODULES[uno_module][1]]
            if not any(name in pairs for name in names):
                continue
            placed.update(name for name in names if name in pairs)
            down, up = fuse_pairs([pairs.get(name) for name in names], scale)
            key = f"{uno_block}.{index}.processor.{uno_module}"
            converted[f"{key}.down.weight"], converted[f"{key}.up.weight"] = down, up
    unplaced = sorted(set(pairs) - placed)
    if unplaced:
        raise UMOError(f"LoRA modules {unplaced[:4]} have no place in UNO's layout (it adapts attention q/k/v and "
                       f"outputs only); train with target_modules=UNO_TARGET_MODULES")
    return converted


def uno_to_diffusers(state_dict: dict[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """UNO layout -> peft keys of FluxTransformer2DModel (`transformer_blocks.0.attn.to_q.lora_A.weight` ...).

    The keys are what `peft.set_peft_model_state_dict` takes (no adapter name). The ups are divided by `scale`
    (peft's alpha / r of the adapter they are loaded into), so the weight deltas are UNO's exactly. A fused qkv
    LoRA becomes three LoRAs (lora_formats.split_fused: exact).
    """
    if not all(UNO_KEY.match(key) for key in state_dict):
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
        name = f"{block}.{index}.processor.{uno_module}"
        if len(pair) != 2:
            raise UMOError(f"LoRA has only the {list(pair)[0]} half of {name}; the file is incomplete")
        modules = UNO_MODULES[uno_module][1]
        for module, (down, up) in zip(modules, split_fused(pair["down"], pair["up"], len(modules), name, scale)):
            converted[f"{DIFFUSERS_BLOCKS[block]}.{index}.{module}.lora_A.weight"] = down
            converted[f"{DIFFUSERS_BLOCKS[block]}.{index}.{module}.lora_B.weight"] = up
    return converted


def uno_to_comfy(state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """UNO keys -> ComfyUI's FLUX keys. ComfyUI converts UNO keys itself only for full-depth FLUX files (its check
    looks for double block 18 and single block 37), so they are always converted here, as its converter does."""
    converted = {}
    for key, tensor in state_dict.items():
        match = UNO_KEY.match(key)
        block = match["double"] or match["single"]
        index = match["i"] or match["j"]
        comfy_module = UNO_MODULES[match["dm"] or match["sm"]][0]
        converted[f"diffusion_model.{block}.{index}.{comfy_module}.lora_{match['direction']}.weight"] = tensor
    return converted


def diffusers_to_comfy(state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """diffusers keys go under `transformer.`, which ComfyUI's FLUX key map accepts (q/k/v land in the fused qkv
    rows); peft's alpha comes from diffusers' metadata when the file has it (ComfyUI scales by alpha / rank)."""
    converted = {}
    for key, tensor in state_dict.items():
        match = FLUX_DIFFUSERS_KEY.match(key)
        converted[f"transformer.{match['module']}.lora_{match['ab']}.weight"] = tensor
    alpha = peft_alpha(metadata)
    if alpha is not None:
        for key in [key for key in converted if key.endswith(".lora_A.weight")]:
            converted[key.removesuffix(".lora_A.weight") + ".alpha"] = torch.tensor(alpha)
    return converted


LAYOUTS = {
    "uno": Layout(UNO_KEY, BACKBONE, "flux", "UNO/UMO_UNO processor keys "
                  "('double_blocks.0.processor.qkv_lora1.down.weight')", uno_to_comfy),
    "flux_diffusers_peft": Layout(FLUX_DIFFUSERS_KEY, BACKBONE, "flux", "diffusers/peft FluxTransformer2DModel keys "
                                  "('transformer.transformer_blocks.0.attn.to_q.lora_A.weight')", diffusers_to_comfy),
}
# ComfyUI-format keys of FLUX.1's block modules, to tell the family of an already converted file; FLUX.2's blocks
# share most names, so what only FLUX.1 has decides between them: per-block modulation, and an MLP 4 times the width
# (the single block's linear1 holds q, k, v and the MLP's input: 3 + 4 widths; linear2 takes attention + MLP: 1 + 4).
FAMILY = Family(
    "flux", "a FLUX.1 model (flux1-dev)",
    re.compile(r"^diffusion_model\.(?:double_blocks\.\d+\.(?:img|txt)_(?:attn\.(?:qkv|proj)|mlp\.[02]|mod\.lin)"
               r"|single_blocks\.\d+\.(?:linear1_qkv|linear1|linear2|modulation\.lin))"
               r"\.(?:lora_(?:up|down|A|B)\.weight|alpha)$"),
    own_modules=re.compile(r"double_blocks\.\d+\.(?:img|txt)_mod\.lin|single_blocks\.\d+\.modulation\.lin"),
    own_shapes=((re.compile(r"single_blocks\.\d+\.linear1"), 7, 1), (re.compile(r"single_blocks\.\d+\.linear2"), 1, 5),
                (re.compile(r"double_blocks\.\d+\.(?:img|txt)_mlp\.0"), 4, 1),
                (re.compile(r"double_blocks\.\d+\.(?:img|txt)_mlp\.2"), 1, 4)))
