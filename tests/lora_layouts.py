"""Where a UNO LoRA's modules land in the tiny FLUX of tests/tiny_models.py (one double and one single block), and
the comparison of weight deltas: shared by the LoRA layout tests and their ComfyUI counterparts.

Written out independently of umo_core.backbones.lora_formats, so that tests comparing the two can fail.
"""

from __future__ import annotations

import torch

# UNO processor LoRA -> the FluxTransformer2DModel modules whose stacked weights it adapts (diffusers' XLabs converter
# and ComfyUI's USO converter agree).
UNO_TO_DIFFUSERS = {
    "double_blocks.0.processor.qkv_lora1": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                            "transformer_blocks.0.attn.to_v"],
    "double_blocks.0.processor.proj_lora1": ["transformer_blocks.0.attn.to_out.0"],
    "double_blocks.0.processor.qkv_lora2": ["transformer_blocks.0.attn.add_q_proj",
                                            "transformer_blocks.0.attn.add_k_proj",
                                            "transformer_blocks.0.attn.add_v_proj"],
    "double_blocks.0.processor.proj_lora2": ["transformer_blocks.0.attn.to_add_out"],
    "single_blocks.0.processor.qkv_lora": ["single_transformer_blocks.0.attn.to_q",
                                           "single_transformer_blocks.0.attn.to_k",
                                           "single_transformer_blocks.0.attn.to_v"],
    "single_blocks.0.processor.proj_lora": ["single_transformer_blocks.0.proj_out"],
}
# UNO processor LoRA -> ComfyUI's FLUX module ("linear1_qkv": the q, k, v rows of the single block's fused linear1).
UNO_TO_COMFY = {"double_blocks.0.processor.qkv_lora1": "double_blocks.0.img_attn.qkv",
                "double_blocks.0.processor.proj_lora1": "double_blocks.0.img_attn.proj",
                "double_blocks.0.processor.qkv_lora2": "double_blocks.0.txt_attn.qkv",
                "double_blocks.0.processor.proj_lora2": "double_blocks.0.txt_attn.proj",
                "single_blocks.0.processor.qkv_lora": "single_blocks.0.linear1_qkv",
                "single_blocks.0.processor.proj_lora": "single_blocks.0.linear2"}


def assert_same_deltas(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """The same modules with the same (non-zero) weight deltas."""
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].abs().max() > 0, name
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-5, msg=name)
