"""FLUX.2's LoRA layouts: diffusers' peft keys of Flux2Transformer2DModel, and ComfyUI's (Black Forest Labs' module
names), converted between each other exactly.

- "flux2_diffusers_peft": `[transformer.]transformer_blocks.{i}.attn.to_q.lora_A[.default].weight` ...; delta =
  B @ A (* alpha / r where diffusers' metadata has an alpha). FLUX.2's double blocks share FLUX.1's module names, so
  a file is told apart by its single blocks (`attn.to_qkv_mlp_proj`, `attn.to_out`), its feed-forward names
  (`ff.linear_in`) or the backbone in its metadata (the trainer writes it).
- ComfyUI: `diffusion_model.{BFL module}.lora_down.weight` / `lora_up.weight`, the alpha folded into the up (no
  `.alpha`: ComfyUI then scales by 1). ComfyUI's FLUX.2 model keeps Black Forest Labs' names, and its LoRA key map
  takes `diffusion_model.<module>` for every weight (comfy.lora.model_lora_keys_unet), so the file loads with the
  plain LoraLoaderModelOnly. q, k and v are fused into one `qkv` LoRA (lora_formats.fuse_pairs: exact).

diffusers module -> BFL module (diffusers' convert_flux2_transformer_checkpoint_to_diffusers is the reverse):
- double block i: attn.to_q/to_k/to_v -> img_attn.qkv, attn.add_q_proj/add_k_proj/add_v_proj -> txt_attn.qkv,
  attn.to_out.0 -> img_attn.proj, attn.to_add_out -> txt_attn.proj, ff.linear_in/linear_out -> img_mlp.0/2,
  ff_context.linear_in/linear_out -> txt_mlp.0/2;
- single block i: attn.to_qkv_mlp_proj -> linear1, attn.to_out -> linear2 (attention and MLP fused in both).
"""

from __future__ import annotations

import re

import torch

from ...errors import UMOError
from ..flux_family import BLOCK_NAME, DOUBLE_BLOCK_ATTENTION
from ..lora_formats import Family, Layout, fuse_pairs, peft_alpha, peft_key, peft_pairs, split_fused

BACKBONE = "flux2"

# Every Linear of Flux2Transformer2DModel (the test checks this list against the real class).
FLUX2_DIFFUSERS_MODULE = (
    r"transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.(?:linear_in|linear_out)|ff_context\.(?:linear_in|linear_out))"
    r"|single_transformer_blocks\.\d+\.attn\.(?:to_qkv_mlp_proj|to_out)"
    r"|x_embedder|context_embedder|proj_out|norm_out\.linear"
    r"|(?:double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.linear"
    r"|time_guidance_embed\.(?:timestep_embedder|guidance_embedder)\.linear_[12]"
)
FLUX2_DIFFUSERS_KEY = peft_key(FLUX2_DIFFUSERS_MODULE)
PEFT_EXAMPLE = "single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight"

# The LoRA the trainer trains: attention in and out of every block, as UMO's LoRAs adapt FLUX.1 (the single blocks'
# projections are fused with their MLP, so their whole input and output projections).
FLUX2_TARGET_MODULES = DOUBLE_BLOCK_ATTENTION + r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)"

# BFL module (in a block) -> the diffusers modules (in the same block) it fuses, in the order of its rows.
DOUBLE_BLOCK = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                "img_attn.proj": ("attn.to_out.0",), "txt_attn.proj": ("attn.to_add_out",),
                "img_mlp.0": ("ff.linear_in",), "img_mlp.2": ("ff.linear_out",),
                "txt_mlp.0": ("ff_context.linear_in",), "txt_mlp.2": ("ff_context.linear_out",)}
SINGLE_BLOCK = {"linear1": ("attn.to_qkv_mlp_proj",), "linear2": ("attn.to_out",)}
BLOCKS = {"double_blocks": ("transformer_blocks", DOUBLE_BLOCK),
          "single_blocks": ("single_transformer_blocks", SINGLE_BLOCK)}
COMFY_KEY = re.compile(r"^diffusion_model\.(?P<block>double_blocks|single_blocks)\.(?P<index>\d+)\."
                       r"(?P<module>img_attn\.qkv|txt_attn\.qkv|img_attn\.proj|txt_attn\.proj|img_mlp\.[02]|txt_mlp\.[02]"
                       r"|linear1|linear2)\.lora_(?P<direction>down|up)\.weight$")


def peft_lora(state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """A FLUX.2 peft file's tensors as `set_peft_model_state_dict` keys (no prefix, no adapter name), diffusers'
    alpha folded into lora_B so that B @ A is the delta."""
    alpha = peft_alpha(metadata)
    lora = {}
    for module, pair in peft_pairs(state_dict, FLUX2_DIFFUSERS_KEY, PEFT_EXAMPLE).items():
        scale = alpha / pair["A"].shape[0] if alpha is not None else 1.0
        lora[f"{module}.lora_A.weight"], lora[f"{module}.lora_B.weight"] = pair["A"], pair["B"] * scale
    return lora


def diffusers_to_comfy(state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """peft keys (alpha from diffusers' metadata) -> ComfyUI's FLUX.2 keys; modules without a place in Black Forest
    Labs' blocks (embedders, modulation, the output layer) are an error, never dropped."""
    pairs = peft_pairs(peft_lora(state_dict, metadata), FLUX2_DIFFUSERS_KEY, PEFT_EXAMPLE)
    indices = {(match[1], int(match[2])) for match in
               map(BLOCK_NAME.match, pairs) if match}
    converted, placed = {}, set()
    for comfy_block, (diffusers_block, table) in BLOCKS.items():
        for index in sorted(i for block, i in indices if block == diffusers_block):
            for comfy_module, modules in table.items():
                names = [f"{diffusers_block}.{index}.{m}" for m in modules]
                if not any(name in pairs for name in names):
                    continue
                placed.update(names)
                down, up = fuse_pairs([pairs.get(name) for name in names])
                key = f"diffusion_model.{comfy_block}.{index}.{comfy_module}"
                converted[f"{key}.lora_down.weight"], converted[f"{key}.lora_up.weight"] = down, up
    unplaced = sorted(set(pairs) - placed)
    if unplaced:
        raise UMOError(f"LoRA modules {unplaced[:4]} have no place in ComfyUI's FLUX.2 blocks; train the blocks' "
                       "attention and MLP projections only (FLUX2_TARGET_MODULES)")
    return converted


def comfy_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's FLUX.2 keys (this module's) -> peft keys, B @ A the delta (lora_formats.split_fused: exact)."""
    fused: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        match = COMFY_KEY.match(key)
        if match is None:
            raise UMOError(f"LoRA key '{key}' is not a FLUX.2 block module in ComfyUI's names "
                           "(e.g. 'diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight')")
        fused.setdefault((match["block"], match["index"], match["module"]), {})[match["direction"]] = tensor
    converted = {}
    for (block, index, comfy_module), pair in fused.items():
        name = f"{block}.{index}.{comfy_module}"
        if len(pair) != 2:
            raise UMOError(f"LoRA has only the {list(pair)[0]} half of {name}; the file is incomplete")
        diffusers_block, table = BLOCKS[block]
        modules = table[comfy_module]
        for module, (down, up) in zip(modules, split_fused(pair["down"], pair["up"], len(modules), name)):
            converted[f"{diffusers_block}.{index}.{module}.lora_A.weight"] = down
            converted[f"{diffusers_block}.{index}.{module}.lora_B.weight"] = up
    return converted


LAYOUTS = {"flux2_diffusers_peft": Layout(
    FLUX2_DIFFUSERS_KEY, BACKBONE, "flux2", "diffusers/peft Flux2Transformer2DModel keys "
    "('single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight')", diffusers_to_comfy)}
# ComfyUI-format keys of FLUX.2's modules. Its blocks share FLUX.1's names, so what only FLUX.2 has decides between
# them (without the backbone in the metadata): the modulation shared by all blocks, and a gated MLP 3 times the width
# (the double block's mlp.0 gives gate and value, 2 x 3 widths; the single block's linear1 gives q, k, v and both,
# 3 + 6 widths; linear2 takes attention + MLP, 1 + 3).
FAMILY = Family(
    "flux2", "a FLUX.2 model (klein or dev)",
    re.compile(r"^diffusion_model\.(?:double_blocks\.\d+\.(?:img|txt)_(?:attn\.(?:qkv|proj)|mlp\.[02])"
               r"|single_blocks\.\d+\.(?:linear1_qkv|linear1|linear2)"
               r"|double_stream_modulation_(?:img|txt)\.lin|single_stream_modulation\.lin)"
               r"\.(?:lora_(?:up|down|A|B)\.weight|alpha)$"),
    own_modules=re.compile(r"double_stream_modulation_(?:img|txt)\.lin|single_stream_modulation\.lin"),
    own_shapes=((re.compile(r"single_blocks\.\d+\.linear1"), 9, 1), (re.compile(r"single_blocks\.\d+\.linear2"), 1, 4),
                (re.compile(r"double_blocks\.\d+\.(?:img|txt)_mlp\.0"), 6, 1),
                (re.compile(r"double_blocks\.\d+\.(?:img|txt)_mlp\.2"), 1, 3)))
