"""FLUX.1's weight names: the tensors that identify a file, and Black Forest Labs' layout -> diffusers'.

ComfyUI and Black Forest Labs' files (flux1-dev.safetensors) use BFL's names with fused q,k,v weights;
diffusers' FluxTransformer2DModel splits them. The table is our own: diffusers' single-file converter
cuts fused weights at FLUX.1's width of 3072, so other widths (the tests' tiny files) need this one.
"""

from __future__ import annotations

import torch

# ComfyUI's all-in-one checkpoints keep the transformer under this prefix, beside the VAE and text encoders.
COMFY_MODEL_PREFIX = "model.diffusion_model."
# Tensors a single file must have to be taken for a FLUX transformer / autoencoder (BFL names).
TRANSFORMER_REQUIRED = ("img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "vector_in.in_layer.weight",
                        "final_layer.linear.weight", "double_blocks.0.img_attn.norm.query_norm.scale")
VAE_REQUIRED = ("encoder.conv_in.weight", "encoder.conv_out.weight", "encoder.down.0.block.0.conv1.weight",
                "decoder.conv_in.weight", "decoder.conv_out.weight")

# BFL module -> diffusers module(s) of FluxTransformer2DModel. Fused weights (several targets) stack the
# targets along the output rows, `hidden` rows each and the rest for the last (the single blocks' MLP input).
BFL_TOP_LEVEL = {
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
BFL_DOUBLE_BLOCK = {
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.norm.query_norm": ("attn.norm_q",),
    "img_attn.norm.key_norm": ("attn.norm_k",),
    "txt_attn.norm.query_norm": ("attn.norm_added_q",),
    "txt_attn.norm.key_norm": ("attn.norm_added_k",),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
}
BFL_SINGLE_BLOCK = {
    "modulation.lin": ("norm.linear",),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "norm.query_norm": ("attn.norm_q",),
    "norm.key_norm": ("attn.norm_k",),
    "linear2": ("proj_out",),
}
BFL_BLOCKS = {"double_blocks": ("transformer_blocks", BFL_DOUBLE_BLOCK),
              "single_blocks": ("single_transformer_blocks", BFL_SINGLE_BLOCK)}




def flux_bfl_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A FLUX transformer state dict in Black Forest Labs' layout (`double_blocks.0.img_attn.qkv.weight`) as
    FluxTransformer2DModel's (`transformer_blocks.0.attn.to_q.weight`); empties `state_dict` as it goes.

    Keys it does not know are kept as they are, for the caller to report. (diffusers' own single-file converter
    cuts the fused weights at FLUX.1's width of 3072, so other widths, the tests' tiny files among them, need
    this one.)"""
    hidden = state_dict["img_in.weight"].shape[0]
    converted = {}
    for key in list(state_dict):
        tensor = state_dict.pop(key)
        module, parameter = key.rsplit(".", 1)
        parameter = "weight" if parameter == "scale" else parameter  # BFL's RMSNorm names its weight `scale`
        group, _, rest = module.partition(".")
        if group in BFL_BLOCKS and rest.partition(".")[0].isdigit():
            index, _, inner = rest.partition(".")
            prefix, table = f"{BFL_BLOCKS[group][0]}.{index}.", BFL_BLOCKS[group][1]
        else:
            prefix, inner, table = "", module, BFL_TOP_LEVEL
        targets = table.get(inner)
        if targets is None:
            converted[key] = tensor
            continue
        if inner == "final_layer.adaLN_modulation.1":
            # BFL's last layer reads (shift, scale) from this projection, diffusers' AdaLayerNormContinuous
            # (scale, shift).
            tensor = torch.cat(tensor.chunk(2)[::-1])
        rows = [hidden] * (len(targets) - 1)
        pieces = tensor.split(rows + [tensor.shape[0] - sum(rows)]) if rows else (tensor,)
        for target, piece in zip(targets, pieces):
            # Pieces of a fused weight get their own storage: parameters that share one cannot be saved.
            converted[f"{prefix}{target}.{parameter}"] = piece.clone() if rows else piece
    return converted

