"""ComfyUI's own LoRA code (as LoraLoaderModelOnly runs it) applying this pack's converted LoRA files, and the
trainer's own lora_uno.safetensors, to ComfyUI's FLUX and OmniGen2 models: the weight deltas are the LoRAs'."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from tests.comfyui.conftest import comfy_import_path, flux_config
from tests.conftest import trainer_args
from tests.lora_layouts import UNO_TO_COMFY, UNO_TO_DIFFUSERS, assert_same_deltas
from tests.tiny_models import (
    HEAD_DIM,
    HEADS,
    HIDDEN,
    POOLED_DIM,
    ROPE_AXES,
    TEXT_DIM,
    omnigen2_peft_lora,
    tiny_flux_transformer,
    uno_lora,
)
from training.rerefl import main
from umo_core.backbones.flux1.loading import merge_lora
from umo_core.backbones.flux1.lora import uno_to_diffusers
from umo_core.backbones.lora_formats import load_lora_file, to_comfy_lora


def on_cpu_patcher(model):
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


@pytest.fixture(scope="module")
def comfy_flux():
    """ComfyUI's FLUX with the sizes of the tiny diffusers FLUX (tests/tiny_models.py), on the meta device."""
    comfy_import_path()
    import comfy.model_base
    import comfy.supported_models

    config = comfy.supported_models.Flux(flux_config(vec_in_dim=POOLED_DIM, context_in_dim=TEXT_DIM,
                                                     hidden_size=HIDDEN, num_heads=HEADS,
                                                     axes_dim=list(ROPE_AXES[HEAD_DIM])))
    with torch.device("meta"):
        return on_cpu_patcher(comfy.model_base.Flux(config, device="meta"))


def comfy_lora_deltas(patcher, lora: dict[str, torch.Tensor], caplog) -> dict[str, torch.Tensor]:
    """ComfyUI's LoRA path as LoraLoaderModelOnly runs it (convert_lora, key map, load_lora, patch math): the weight
    delta of every patched weight."""
    comfy_import_path()
    import comfy.lora
    import comfy.lora_convert

    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora), key_map)
    assert "lora key not loaded" not in caplog.text
    patched = patcher.clone()
    patched.add_patches(patches, 1.0)
    weights = patcher.model.state_dict()
    return {key: comfy.lora.calculate_weight(patched.patches[key], torch.zeros(weights[key].shape), key)
            for key in patched.patches}


def in_comfy_weights(uno_module_deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The delta of each UNO processor module -> the delta of ComfyUI's FLUX weight it lands in."""
    deltas = {}
    for uno_module, comfy_module in UNO_TO_COMFY.items():
        delta = uno_module_deltas[uno_module]
        if comfy_module.endswith("linear1_qkv"):  # q, k, v are the first 3H rows of linear1 (then the MLP)
            delta = torch.cat([delta, torch.zeros(4 * HIDDEN, HIDDEN)])
            comfy_module = comfy_module.replace("linear1_qkv", "linear1")
        deltas[f"diffusion_model.{comfy_module}.weight"] = delta
    return deltas


def test_comfyui_applies_uno_and_diffusers_loras_with_uno_deltas(comfy_flux, caplog):
    """Both conversions, through ComfyUI's own loader into its fused FLUX weights, give UNO's deltas."""
    uno = uno_lora()
    expected = in_comfy_weights({module: uno[f"{module}.up.weight"] @ uno[f"{module}.down.weight"]
                                 for module in UNO_TO_COMFY})
    for lora in (to_comfy_lora(uno), to_comfy_lora(uno_to_diffusers(uno))):
        assert_same_deltas(comfy_lora_deltas(comfy_flux, lora, caplog), expected)


def test_comfyui_converts_full_depth_uno_files_the_same_way():
    """ComfyUI's own USO/UNO converter (it runs for full-depth FLUX files only) gives the keys we give."""
    comfy_import_path()
    import comfy.lora_convert

    uno = uno_lora(hidden=2, rank=1, blocks=(19, 38))
    assert comfy.lora_convert.convert_lora(uno).keys() == to_comfy_lora(uno).keys()


def test_comfyui_omnigen2_key_map_takes_every_converted_key(caplog):
    comfy_import_path()
    import comfy.model_base
    import comfy.supported_models

    config = comfy.supported_models.Omnigen2({
        "image_model": "omnigen2", "axes_dim_rope": [8, 4, 4], "axes_lens": [64, 64, 64], "ffn_dim_multiplier": None,
        "hidden_size": 48, "in_channels": 16, "multiple_of": 16, "norm_eps": 1e-5, "num_attention_heads": 3,
        "num_kv_heads": 1, "num_layers": 2, "num_refiner_layers": 1, "out_channels": None, "patch_size": 2,
        "text_feat_dim": 32, "timestep_scale": 1000.0})
    with torch.device("meta"):
        patcher = on_cpu_patcher(comfy.model_base.Omnigen2(config, device="meta"))
    lora = omnigen2_peft_lora()
    deltas = comfy_lora_deltas(patcher, to_comfy_lora(lora), caplog)
    assert len(deltas) == len(lora) // 2
    for key, delta in deltas.items():
        module = key.removeprefix("diffusion_model.").removesuffix(".weight")
        up, down = (lora[f"{module}.lora_{ab}.default.weight"] for ab in "BA")
        torch.testing.assert_close(delta, up @ down)


def test_trained_lora_has_the_same_effect_in_diffusers_and_in_comfyui(trainer_inputs, comfy_flux, tmp_path, caplog):
    """The trainer's own lora_uno.safetensors: merged into the diffusers model (headless generation) and
    applied by ComfyUI's LoRA code to its fused FLUX weights (the pack's loader path), the weight
    deltas are the ones the trainer trained (peft's B @ A of lora_diffusers.safetensors)."""
    root, data, pack = trainer_inputs
    assert main(trainer_args(root, data, pack, tmp_path / "run", 2)) == 0
    trained = load_file(tmp_path / "run" / "lora_diffusers.safetensors")
    trained_deltas = {module: trained[f"{module}.lora_B.weight"] @ trained[f"{module}.lora_A.weight"]
                      for module in (k.removesuffix(".lora_A.weight") for k in trained if ".lora_A." in k)}

    base = tiny_flux_transformer()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merge_lora(base, tmp_path / "run" / "lora_uno.safetensors")
    for module, delta in trained_deltas.items():
        merged = base.state_dict()[f"{module}.weight"] - before[f"{module}.weight"]
        torch.testing.assert_close(merged, delta, rtol=1e-5, atol=1e-6, msg=module)

    expected = in_comfy_weights({uno_module: torch.cat([trained_deltas[m] for m in modules])
                                 for uno_module, modules in UNO_TO_DIFFUSERS.items()})
    uno_file = to_comfy_lora(*load_lora_file(tmp_path / "run" / "lora_uno.safetensors"))
    assert_same_deltas(comfy_lora_deltas(comfy_flux, uno_file, caplog), expected)
