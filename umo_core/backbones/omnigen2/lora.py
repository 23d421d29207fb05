"""OmniGen2's LoRA layout: UMO_OmniGen2's peft keys (`layers.{i}.attn.to_q.lora_A.default.weight` ...), which ComfyUI
takes prefixed `diffusion_model.` and without `.default.` (what UMO's converter script writes)."""

from __future__ import annotations

import re

import torch

from ..lora_formats import Family, Layout, peft_key

OMNIGEN2_MODULE = r"(?:layers|noise_refiner|ref_image_refiner|context_refiner)\.\d+\.attn\.(?:to_q|to_k|to_v|to_out\.0)"
OMNIGEN2_KEY = peft_key(OMNIGEN2_MODULE)


def peft_to_comfy(state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    converted = {}
    for key, tensor in state_dict.items():
        match = OMNIGEN2_KEY.match(key)
        converted[f"diffusion_model.{match['module']}.lora_{match['ab']}.weight"] = tensor
    return converted


LAYOUTS = {"omnigen2_peft": Layout(OMNIGEN2_KEY, "omnigen2", "omnigen2", "UMO_OmniGen2 peft keys "
                                   "('layers.0.attn.to_q.lora_A.default.weight')", peft_to_comfy)}
FAMILY = Family("omnigen2", "an OmniGen2 model", re.compile(
    rf"^diffusion_model\.{OMNIGEN2_MODULE}\.(?:lora_(?:up|down|A|B)\.weight|alpha)$"))
