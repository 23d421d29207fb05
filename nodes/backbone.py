"""Backbone nodes: the UMO LoRA loader and one-node reference conditioning."""

from __future__ import annotations

from collections.abc import Callable

import folder_paths
import node_helpers
import torch
from comfy.utils import ProgressBar

from umo_core.backbones import get
from umo_core.backbones.lora_formats import check_family, load_lora_file, lora_family, to_comfy_lora
from umo_core.errors import UMOError

from .comfy_compat import lora_patches, model_family
from .node_api import io
from .sockets import collect_references, reference_image_inputs

BACKBONES = {"auto": None, "flux (UNO)": "flux", "omnigen2": "omnigen2"}
FAMILY_BACKBONES = {"flux": "flux1", "omnigen2": "omnigen2"}  # family -> umo_core.backbones name (its reference rule)
# Width of the text embedding in the conditioning -> the backbone it was made for.
TEXT_WIDTH_FAMILY = {4096: "flux", 2048: "omnigen2"}  # T5-XXL (FLUX), Qwen2.5-VL-3B (OmniGen2)
LOW_RANK_DOWN_KEYS = (".lora_down.weight", ".lora_A.weight")


def _low_rank_modules(lora: dict[str, torch.Tensor]) -> set[str]:
    """Names of the modules a LoRA holds low-rank pairs for (the keys of ComfyUI's LoRA key map)."""
    return {key.removesuffix(suffix) for key in lora for suffix in LOW_RANK_DOWN_KEYS if key.endswith(suffix)}


class UMOLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UMOLoraLoader",
            display_name="UMO LoRA Loader",
            category="UMO",
            description="Applies a UMO LoRA: UNO/UMO_UNO processor keys (FLUX), UMO_OmniGen2 peft keys (converted "
                        "on the fly) or this project's trained LoRAs.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras")),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, lora_name, strength) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        state_dict, metadata = load_lora_file(path)
        family = model_family(model)
        check_family(lora_name, lora_family(state_dict, metadata), family)
        lora = to_comfy_lora(state_dict, metadata)  # the metadata carries peft's alpha
        patches, known_modules = lora_patches(model, lora)
        # ComfyUI's loader silently skips LoRA layers the model lacks: a half-applied LoRA is an error here.
        modules = _low_rank_modules(lora)
        unknown = sorted(modules - known_modules)
        if unknown:
            raise UMOError(f"LoRA '{lora_name}': {len(unknown)} of {len(modules)} layers do not exist in this "
                           f"{family or 'model'} (e.g. '{unknown[0]}'); it was made for a different architecture "
                           "or size")
        if not patches:
            raise UMOError(f"LoRA '{lora_name}' matches no layer of this {family or 'model'}: "
                           "it was made for a different architecture or size")
        patched = model.clone()
        patched.add_patches(patches, strength)
        return io.NodeOutput(patched)


def conditioning_family(positive: list, backbone: str) -> str:
    """'flux' or 'omnigen2': the `backbone` choice, checked against the text encoder that made `positive`."""
    width = positive[0][0].shape[-1]
    detected = TEXT_WIDTH_FAMILY.get(width)
    chosen = BACKBONES[backbone]
    if chosen is None and detected is None:
        raise UMOError(f"UMO Reference Conditioning: a text embedding of width {width} is neither FLUX's T5 (4096) "
                       "nor OmniGen2's Qwen2.5-VL (2048); set backbone to 'flux (UNO)' or 'omnigen2'")
    if chosen is not None and detected is not None and chosen != detected:
        raise UMOError(f"UMO Reference Conditioning: backbone is '{backbone}' but the positive conditioning comes "
                       f"from the {detected} text encoder (width {width}); set backbone to 'auto'")
    return chosen or detected


def _with_references(conditioning: list, latents: list[torch.Tensor], flux: bool) -> list:
    """Append the latents to the conditioning's references (like chained ReferenceLatent nodes)."""
    conditioning = node_helpers.conditioning_set_values(conditioning, {"reference_latents": latents}, append=True)
    if flux:  # what FluxKontextMultiReferenceLatentMethod("uxo/uno") sets
        conditioning = node_helpers.conditioning_set_values(conditioning, {"reference_latents_method": "uxo"})
    return conditioning


def attach_references(positive: list, negative: list | None, vae, references: list[torch.Tensor], family: str,
                      long_side: int = 0, on_encoded: Callable[[int], None] | None = None) -> tuple[list, list | None]:
    """Encode reference photos [H,W,3] by the backbone's rule and attach them to `positive` (and `negative`
    when given): UNO's resize and the uxo/uno placement for 'flux', OmniGen2's convention for 'omnigen2'.

    UMO Reference Conditioning's work, shared with the face fix (one reference per face). `long_side` > 0
    overrides UNO's long side; `on_encoded(n)` is called after the n-th reference is encoded.
    """
    flux = family == "flux"
    rule = get(FAMILY_BACKBONES[family])
    latents = []
    for reference in references:
        rgb = reference[..., :3]
        if flux:
            prepared = rule.resize_reference(rgb, len(references), long_side)
        else:
            prepared = rule.resize_reference(rgb, len(references))
        latents.append(vae.encode(prepared[None]))
        if on_encoded is not None:
            on_encoded(len(latents))
    return tuple(None if c is None else _with_references(c, latents, flux) for c in (positive, negative))


class ReferenceConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UMOReferenceConditioning",
            display_name="UMO Reference Conditioning",
            category="UMO",
            description="Encodes the reference photos and attaches them to the conditioning: UNO's resize rule and "
                        "the uxo/uno placement for FLUX, the OmniGen2 convention for OmniGen2.",
            inputs=[
                io.Conditioning.Input("positive"),
                io.Vae.Input("vae"),
                io.Combo.Input("backbone", options=list(BACKBONES), default="auto",
                               tooltip="auto: told from the text encoder (T5 -> FLUX, Qwen2.5-VL -> OmniGen2)"),
                io.Int.Input("long_side", default=0, min=0, max=2048, step=16,
                             tooltip="FLUX: reference long side; 0 = UNO's rule (512 for one reference, 320 for more)"),
                io.Conditioning.Input("negative", optional=True, tooltip="also gets the references (OmniGen2 CFG)"),
            ]
            + reference_image_inputs(),
            outputs=[io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative")],
        )

    @classmethod
    def execute(cls, positive, vae, backbone, long_side, negative=None, images=None, **single_images) -> io.NodeOutput:
        references = collect_references(images, single_images)
        if not references:
            raise UMOError("UMO Reference Conditioning: connect at least one reference image")
        family = conditioning_family(positive, backbone)
        bar = ProgressBar(len(references))
        return io.NodeOutput(*attach_references(positive, negative, vae, references, family, long_side,
                                                on_encoded=bar.update_absolute))
