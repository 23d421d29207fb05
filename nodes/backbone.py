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

from .comfy_compat import lora_patches, model_family, vae_latent_channels
from .node_api import io
from .sockets import collect_references, reference_image_inputs

BACKBONES = {"auto": None, "flux (UNO)": "flux", "flux2": "flux2", "omnigen2": "omnigen2"}
FAMILY_BACKBONES = {"flux": "flux1", "flux2": "flux2", "omnigen2": "omnigen2"}  # family -> umo_core.backbones name
# Width of the text embedding in the conditioning -> the backbone it was made for. ComfyUI's FLUX.2 text encoders
# stack three hidden layers (klein: Qwen3 layers 9, 18, 27; dev: Mistral-3 layers 10, 20, 30).
TEXT_WIDTH_FAMILY = {4096: "flux", 2048: "omnigen2", 7680: "flux2", 12288: "flux2", 15360: "flux2"}
TEXT_ENCODERS = ("T5-XXL 4096 (FLUX.1), Qwen2.5-VL 2048 (OmniGen2), Qwen3-4B 7680 / Qwen3-8B 12288 (FLUX.2 [klein]), "
                 "Mistral-3 15360 (FLUX.2 [dev])")
VAE_LATENT_CHANNELS = {"flux": 16, "omnigen2": 16, "flux2": 128}  # as ComfyUI's VAE encodes (FLUX.2's: 32 x 2 x 2)
VAE_FILES = {"flux": "FLUX.1's autoencoder (ae.safetensors)", "omnigen2": "FLUX.1's autoencoder (ae.safetensors)",
             "flux2": "FLUX.2's autoencoder (flux2-vae.safetensors)"}
# ComfyUI's reference_latents_method for each backbone (FluxKontextMultiReferenceLatentMethod's values).
REFERENCE_METHODS = {"flux": "uxo", "flux2": "index", "omnigen2": None}
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
            description="Applies a UMO LoRA: UNO/UMO_UNO processor keys (FLUX.1), UMO_OmniGen2 peft keys (converted "
                        "on the fly), diffusers/peft FLUX.1 and FLUX.2 LoRAs, or this project's trained LoRAs; a "
                        "LoRA of another model family is refused, naming both.",
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


def conditioning_family(positive: list, backbone: str, vae=None) -> str:
    """'flux', 'flux2' or 'omnigen2': the `backbone` choice (BACKBONES), or with 'auto' the backbone told from the text
    encoder that made `positive` (TEXT_WIDTH_FAMILY) or else from the VAE's latent; checked against both."""
    width = positive[0][0].shape[-1]
    from_text = TEXT_WIDTH_FAMILY.get(width)
    chosen = BACKBONES[backbone]
    channels = None if vae is None else vae_latent_channels(vae)
    from_vae = "flux2" if channels == VAE_LATENT_CHANNELS["flux2"] else None  # FLUX.1 and OmniGen2 share a VAE
    family = chosen or from_text or from_vae
    if family is None:
        raise UMOError(f"UMO Reference Conditioning: a text embedding of width {width} comes from no text encoder "
                       f"the backbones use ({TEXT_ENCODERS}); set backbone to one of {list(BACKBONES)[1:]}")
    if from_text is not None and from_text != family:
        raise UMOError(f"UMO Reference Conditioning: backbone is '{backbone}' but the positive conditioning comes "
                       f"from {_title(from_text)}'s text encoder (width {width}); set backbone to 'auto'")
    if vae is not None:
        check_vae(vae, family, "UMO Reference Conditioning")
    return family


def check_vae(vae, family: str, node: str) -> None:
    """The VAE must be the backbone's own (FLUX.2's makes 128-channel latents, FLUX.1's and OmniGen2's 16); `node`
    names the node in the error."""
    channels = vae_latent_channels(vae)
    if channels != VAE_LATENT_CHANNELS[family]:
        raise UMOError(f"{node}: the VAE makes {channels}-channel latents, but {_title(family)} needs "
                       f"{VAE_FILES[family]}; connect the VAE that goes with the model")


def check_long_side(long_side: int, family: str, node: str) -> None:
    """`long_side` > 0 sets UNO's reference rule: FLUX.1 only; `node` names the node in the error."""
    if long_side and family != "flux":
        raise UMOError(f"{node}: long_side ({long_side}) sets UNO's rule for FLUX.1; {_title(family)} references "
                       f"follow {_title(family)}'s own rule, as its LoRAs were trained: set long_side to 0")


def _with_references(conditioning: list, latents: list[torch.Tensor], family: str) -> list:
    """Append the latents to the conditioning's references (like chained ReferenceLatent nodes) and set the backbone's
    reference method (what FluxKontextMultiReferenceLatentMethod sets)."""
    conditioning = node_helpers.conditioning_set_values(conditioning, {"reference_latents": latents}, append=True)
    method = REFERENCE_METHODS[family]
    if method is not None:
        conditioning = node_helpers.conditioning_set_values(conditioning, {"reference_latents_method": method})
    return conditioning


def _title(family: str) -> str:
    return get(FAMILY_BACKBONES[family]).title


def prepare_reference(rgb: torch.Tensor, family: str, count: int, long_side: int = 0) -> torch.Tensor:
    """One reference photo [H,W,3] of `count` -> the image the backbone's VAE encodes, by the library's rule for the
    backbone (umo_core.backbones.<name>.references): UNO's long side for 'flux' (`long_side` > 0 overrides it), the
    FLUX.2 pipelines' rule for 'flux2', OmniGen2's one megapixel for 'omnigen2'."""
    rule = get(FAMILY_BACKBONES[family])
    if family == "flux":
        return rule.resize_reference(rgb, count, long_side)
    return rule.resize_reference(rgb, count)


def attach_references(positive: list, negative: list | None, vae, references: list[torch.Tensor], family: str,
                      long_side: int = 0, on_encoded: Callable[[int], None] | None = None) -> tuple[list, list | None]:
    """Encode reference photos [H,W,3] by the backbone's rule (prepare_reference) and attach them to `positive` (and
    `negative` when given) the backbone's way: the uxo/uno placement for 'flux', ComfyUI's `index` method for 'flux2'
    (reference i at time 10 (i + 1), as diffusers' FLUX.2 pipelines place them), none for 'omnigen2'.

    UMO Reference Conditioning's work, shared with the face fix (one reference per face). `long_side` > 0
    overrides UNO's long side (FLUX.1 only: the callers check_long_side before any long work); `on_encoded(n)` is
    called after the n-th reference is encoded.
    """
    latents = []
    for reference in references:
        latents.append(vae.encode(prepare_reference(reference[..., :3], family, len(references), long_side)[None]))
        if on_encoded is not None:
            on_encoded(len(latents))
    return tuple(None if c is None else _with_references(c, latents, family) for c in (positive, negative))


class ReferenceConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UMOReferenceConditioning",
            display_name="UMO Reference Conditioning",
            category="UMO",
            description="Encodes the reference photos and attaches them to the conditioning: UNO's resize rule and "
                        "the uxo/uno placement for FLUX.1, FLUX.2's own rule and ComfyUI's index placement for "
                        "FLUX.2 [klein]/[dev], the OmniGen2 convention for OmniGen2.",
            inputs=[
                io.Conditioning.Input("positive"),
                io.Vae.Input("vae"),
                io.Combo.Input("backbone", options=list(BACKBONES), default="auto",
                               tooltip="auto: told from the text encoder (T5 -> FLUX.1, Qwen3 or Mistral-3 -> FLUX.2, "
                                       "Qwen2.5-VL -> OmniGen2), else from the VAE (FLUX.2's)"),
                io.Int.Input("long_side", default=0, min=0, max=2048, step=16,
                             tooltip="FLUX.1 only: reference long side; 0 = UNO's rule (512 for one reference, 320 "
                                     "for more). FLUX.2 and OmniGen2 need 0 (their own rules)"),
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
        family = conditioning_family(positive, backbone, vae)
        check_long_side(long_side, family, "UMO Reference Conditioning")
        bar = ProgressBar(len(references))
        return io.NodeOutput(*attach_references(positive, negative, vae, references, family, long_side,
                                                on_encoded=bar.update_absolute))
