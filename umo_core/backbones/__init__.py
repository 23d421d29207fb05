"""The generator side: one folder per backbone and what backbones share.

- `get(name)`: the one place a backbone is chosen by name; each `<name>/backbone.py` holds `BACKBONE`, which
  implements the contract (`contract.Backbone`). Nothing outside `<name>/` imports from that folder.
- Shared: `flow` (rectified-flow Euler sampling, clean estimate, seed noise, generation), `lora_formats` (LoRA
  files, layout detection, fused low-rank pairs), `references` (resize machinery), `text_embedding` (the prompt
  embedding file), `model_files` and `text_encoder_files` (model files and text encoder folders, read offline),
  `flux_family` (what the FLUX-family backbones share).
- `flux1/` (FLUX.1 with UNO's references) and `flux2/` (FLUX.2 [klein] and [dev]) are trainable backbones;
  `omnigen2/` holds only OmniGen2's LoRA layout and reference rule, for the ComfyUI nodes.
"""

from __future__ import annotations

from importlib import import_module

from ..errors import UMOError

TRAINABLE = ("flux1", "flux2")  # what --backbone takes
DEFAULT = "flux1"
NAMES = (*TRAINABLE, "omnigen2")  # OmniGen2: its LoRA layout and reference rule only, for the nodes
LORA_BACKBONES = ("flux1", "omnigen2", "flux2")  # whose LoRA layouts lora_formats recognises, in this order


def get(name: str):
    """The backbone `name`: a `contract.Backbone` for the TRAINABLE ones; OmniGen2's has only the reference rule."""
    if name not in NAMES:
        raise UMOError(f"backbone '{name}' is not one of {', '.join(TRAINABLE)}")
    return import_module(f"{__name__}.{name}.backbone").BACKBONE


def lora_layouts() -> tuple[dict, dict]:
    """Every recognised LoRA layout by name (`lora_formats.Layout`) and every family by name
    (`lora_formats.Family`), from each backbone's `lora` module (LAYOUTS, FAMILY)."""
    layouts, families = {}, {}
    for name in LORA_BACKBONES:
        module = import_module(f"{__name__}.{name}.lora")
        layouts.update(module.LAYOUTS)
        families[module.FAMILY.name] = module.FAMILY
    return layouts, families
