"""LoRA files for every backbone: reading, writing, recognising the key layout, fusing and splitting low-rank pairs.

Each backbone's `lora` module declares its layouts (`Layout`: the key pattern, the family, the conversion to
ComfyUI's keys); `detect_lora_format` tries them in the order of `backbones.LORA_BACKBONES`. Layout names:
- "uno", "flux_diffusers_peft" (FLUX.1, flux1/lora.py), "omnigen2_peft" (omnigen2/lora.py),
  "flux2_diffusers_peft" (FLUX.2, flux2/lora.py);
- "comfy": keys already prefixed `diffusion_model.` (ComfyUI's own format), told apart by each backbone's
  `FAMILY` (its module names, and the layer shapes only its models have) and, for the files this project writes,
  by the backbone in their metadata.
A file's metadata `umo_backbone` (written by the trainer) decides between layouts whose keys look alike (FLUX.1's and
FLUX.2's double blocks have the same module names). Without it, FLUX.1 and FLUX.2 are told apart by what only one
of them has: per-block modulation (FLUX.1) or shared modulation (FLUX.2), and the MLP's width in the layers that
hold it (FLUX.1's is 4 times the width, FLUX.2's gated MLP 3 times). A LoRA of the attention alone fits both.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import UMOError
from ..files import save_tensors
from .text_embedding import BACKBONE_METADATA_KEY

# Metadata the project's trainer writes into its LoRA files (with BACKBONE_METADATA_KEY).
FORMAT_METADATA_KEY = "umo_format"
BASE_MODEL_METADATA_KEY = "umo_base_model"
# A low-rank half in ComfyUI's format: `diffusion_model.<module>.lora_{down,up}.weight` (or peft's lora_A / lora_B).
COMFY_LOW_RANK_KEY = re.compile(r"^diffusion_model\.(?P<module>.+)\.lora_(?P<half>down|up|A|B)\.weight$")
COMFY_HALVES = {"A": "down", "B": "up"}  # peft's names -> ComfyUI's


@dataclass(frozen=True)
class Layout:
    """One LoRA key layout a backbone reads."""

    pattern: re.Pattern  # every key of a file in this layout matches it
    backbone: str  # the registry name of the backbone it is for
    family: str  # the family check_family compares ("flux" for FLUX.1, as the nodes name it)
    description: str  # what it is, with an example key, for the "unrecognised layout" error
    to_comfy: Callable[[dict[str, torch.Tensor], dict[str, str]], dict[str, torch.Tensor]]  # ComfyUI's keys


@dataclass(frozen=True)
class Family:
    """A LoRA family: what `check_family` says about it and how its ComfyUI-format keys look."""

    name: str
    model: str  # "a FLUX.1 model (flux1-dev)": what to load such a LoRA on
    comfy_keys: re.Pattern  # ComfyUI-format keys of the modules its LoRAs adapt
    # Modules (ComfyUI's names, without `diffusion_model.`) that only this family's models have.
    own_modules: re.Pattern | None = None
    # (module pattern, outputs, inputs): layers whose outputs : inputs ratio only this family's models have.
    own_shapes: tuple[tuple[re.Pattern, int, int], ...] = ()

    def only_fits(self, state_dict: dict[str, torch.Tensor]) -> bool:
        """Whether a ComfyUI-format LoRA adapts a module, or a layer of a shape, that only this family has."""
        for module, (outputs, inputs) in comfy_layer_shapes(state_dict).items():
            if self.own_modules is not None and self.own_modules.fullmatch(module):
                return True
            if any(pattern.fullmatch(module) and outputs * ratio_in == inputs * ratio_out
                   for pattern, ratio_out, ratio_in in self.own_shapes):
                return True
        return False


def _layouts() -> dict[str, Layout]:
    from . import lora_layouts

    return lora_layouts()[0]


def _families() -> dict[str, Family]:
    from . import lora_layouts

    return lora_layouts()[1]


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


def detect_lora_format(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """The layout's name (see above) or 'comfy'; anything else is an error listing what is known. Where the keys fit
    several layouts, the backbone named in `metadata` decides."""
    keys = list(state_dict)
    if not keys:
        raise UMOError("the LoRA holds no tensors; download or train it again")
    marked = (metadata or {}).get(BACKBONE_METADATA_KEY)
    layouts = sorted(_layouts().items(), key=lambda item: item[1].backbone != marked)  # stable: marked first
    for name, layout in layouts:
        if all(layout.pattern.match(key) for key in keys):
            return name
    if all(key.startswith("diffusion_model.") for key in keys):
        return "comfy"
    unknown = next(key for key in keys if not key.startswith("diffusion_model."))
    known = ", ".join(layout.description for layout in _layouts().values())
    raise UMOError(f"unrecognised LoRA layout (key '{unknown}'). Recognised: {known} and ComfyUI 'diffusion_model.' "
                   "keys")


def comfy_layer_shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """ComfyUI-format LoRA keys -> {module (without `diffusion_model.`): (outputs, inputs)} of each layer a low-rank
    pair adapts (down/A [rank, inputs], up/B [outputs, rank])."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        match = COMFY_LOW_RANK_KEY.match(key)
        if match is not None and tensor.ndim == 2:
            half = COMFY_HALVES.get(match["half"], match["half"])
            halves.setdefault(match["module"], {})[half] = tensor
    return {module: (pair["up"].shape[0], pair["down"].shape[1]) for module, pair in halves.items()
            if len(pair) == 2}


def lora_family(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str | None:
    """The family ('flux', 'flux2', 'omnigen2') of a LoRA; None for ComfyUI-format keys of other modules, or of
    modules that several families have in the same shapes (FLUX.1's and FLUX.2's attention: the LoRA may be for
    either). The backbone in the metadata of the project's files decides first."""
    layout = detect_lora_format(state_dict, metadata)
    if layout != "comfy":
        return _layouts()[layout].family
    marked = (metadata or {}).get(BACKBONE_METADATA_KEY)
    for layout_info in _layouts().values():
        if layout_info.backbone == marked:
            return layout_info.family
    fitting = [family for family in _families().values()
               if all(family.comfy_keys.match(key) for key in state_dict)]
    if len(fitting) > 1:
        fitting = [family for family in fitting if family.only_fits(state_dict)]
    return fitting[0].name if len(fitting) == 1 else None


def check_family(lora_name: str, lora_family_name: str | None, model_family: str | None) -> None:
    """A LoRA meant for another backbone is an error, never a silent no-op."""
    if lora_family_name is not None and lora_family_name != model_family:
        raise UMOError(f"LoRA '{lora_name}' is a {lora_family_name} LoRA but the model is "
                       f"{model_family or 'neither FLUX nor OmniGen2'}; load it on "
                       f"{_families()[lora_family_name].model}")


def wrong_backbone(path: str | Path, layout: str, state_dict: dict[str, torch.Tensor], metadata: dict[str, str],
                   takes: str) -> UMOError:
    """The error for a LoRA file of a layout a backbone does not take: the file, its layout, the model it is for
    and `takes` (what the backbone takes)."""
    family = lora_family(state_dict, metadata)
    made_for = f" (for {_families()[family].model})" if family else ""
    return UMOError(f"LoRA '{path}' is a {layout} LoRA{made_for}; {takes}")


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
    """Keys that ComfyUI's LoRA loader (`comfy.lora.load_lora` with the model's key map) applies; ComfyUI-format
    files pass through."""
    layout = detect_lora_format(state_dict, metadata)
    if layout == "comfy":
        return dict(state_dict)
    return _layouts()[layout].to_comfy(state_dict, metadata or {})


def peft_key(modules: str) -> re.Pattern:
    """The peft LoRA keys of the modules `modules` (a regex of module names) match: with or without diffusers'
    `transformer.` or peft's `base_model.model.` prefix and the adapter name `default`; groups `module` and `ab`."""
    return re.compile(rf"^(?:transformer\.|base_model\.model\.)?(?P<module>{modules})"
                      r"\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


def peft_pairs(state_dict: dict[str, torch.Tensor], pattern: re.Pattern,
               example: str) -> dict[str, dict[str, torch.Tensor]]:
    """peft keys (`pattern` with groups `module` and `ab`) -> {module name: {"A": down, "B": up}}, prefixes and
    adapter name removed; `example`: a key of the layout, for the error."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        match = pattern.match(key)
        if match is None:
            raise UMOError(f"LoRA key '{key}' is not a peft key of the transformer (e.g. '{example}')")
        pairs.setdefault(match["module"], {})[match["ab"]] = tensor
    halves = [module for module, pair in pairs.items() if len(pair) != 2]
    if halves:
        raise UMOError(f"LoRA has lora_A without lora_B (or the reverse) for {halves[:3]}; the file is incomplete")
    return pairs


def fuse_pairs(parts: list[dict[str, torch.Tensor] | None], scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank pairs ({"A": down, "B": up}, or None for a part without a LoRA) of modules whose outputs one fused
    module stacks (q, k, v in one qkv) -> that module's (down, up), `scale` folded into the up. Equal downs (a LoRA
    that came from a fused file) stay shared and keep the rank; otherwise the downs are stacked and the ups placed
    block-diagonally: exact, with the rank summed. A part without a LoRA contributes zero rows."""
    present = [part for part in parts if part is not None]
    downs = [part["A"] if part is not None else None for part in parts]
    ups = [part["B"] * scale if part is not None else None for part in parts]
    if all(down is not None for down in downs) and all(torch.equal(downs[0], down) for down in downs[1:]):
        return downs[0].clone(), torch.cat(ups)
    inputs, outputs = present[0]["A"].shape[1], present[0]["B"].shape[0]
    downs = [down if down is not None else present[0]["A"].new_zeros(0, inputs) for down in downs]
    ups = [up if up is not None else present[0]["B"].new_zeros(outputs, 0) for up in ups]
    return torch.cat(downs), torch.block_diag(*ups)


def split_fused(down: torch.Tensor, up: torch.Tensor, parts: int, name: str,
                scale: float = 1.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The inverse of `fuse_pairs`: a fused module's (down, up) -> (A, B) per part, B divided by `scale`. A
    block-diagonal up in `parts` equal blocks gives each part its own rank back; otherwise every part shares the
    down (full rank each, as diffusers' XLabs converter does). Both are exact. `name`: the module, for errors."""
    up = up / scale
    if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1] or up.shape[0] % parts:
        raise UMOError(f"LoRA module {name} has mismatched shapes (down {list(down.shape)}, up {list(up.shape)}); "
                       "the file is damaged")
    rank, outputs = down.shape[0], up.shape[0] // parts
    ups = up.split(outputs)
    if parts > 1 and rank % parts == 0:
        width = rank // parts
        blocks = [part[:, i * width:(i + 1) * width] for i, part in enumerate(ups)]
        if torch.equal(torch.block_diag(*blocks), up):
            return [(down[i * width:(i + 1) * width].clone(), blocks[i].clone()) for i in range(parts)]
    return [(down.clone(), part.clone()) for part in ups]


@torch.no_grad()
def merge_lora_weights(transformer: torch.nn.Module, lora: dict[str, torch.Tensor], strength: float = 1.0) -> int:
    """Add a LoRA given as peft keys with B @ A the delta (contract.Backbone.load_lora) into the transformer's
    weights: W += strength * B @ A. Merged, a LoRA costs nothing at inference. Returns the number of layers changed."""
    merged = 0
    for key, down in lora.items():
        if ".lora_A." not in key:
            continue
        up = lora[key.replace(".lora_A.", ".lora_B.")]
        weight = transformer.get_submodule(key.split(".lora_A.")[0]).weight
        weight += (strength * up.float() @ down.float()).to(weight)
        merged += 1
    return merged
