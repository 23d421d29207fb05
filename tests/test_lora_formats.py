"""LoRA layouts: real .safetensors files, real diffusers/peft modules (tiny FLUX), and ComfyUI's loader when present.

Shapes follow the real models: a FLUX block of width H has fused qkv [3H, H], outputs [H, H], and the single
block's linear2 / proj_out takes attention + MLP = H + 4H (15360 for FLUX.1's H = 3072).
"""

from __future__ import annotations

import json
import logging
import os
import sys

import pytest
import torch
from diffusers import FluxTransformer2DModel
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file

from umo_core import UMOError
from umo_core.backbones.lora_formats import (
    UNO_TARGET_MODULES,
    check_family,
    detect_lora_format,
    diffusers_to_uno,
    load_lora_file,
    lora_family,
    save_lora_file,
    to_comfy_lora,
    uno_to_diffusers,
)

HEADS, HEAD_DIM = 2, 16
HIDDEN = HEADS * HEAD_DIM
RANK = 4
# Written out independently of the module under test: UNO processor LoRA -> the FluxTransformer2DModel
# modules whose stacked weights it adapts (diffusers' XLabs converter and ComfyUI's USO converter agree).
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
UNO_TO_COMFY = {"double_blocks.0.processor.qkv_lora1": "double_blocks.0.img_attn.qkv",
                "double_blocks.0.processor.proj_lora1": "double_blocks.0.img_attn.proj",
                "double_blocks.0.processor.qkv_lora2": "double_blocks.0.txt_attn.qkv",
                "double_blocks.0.processor.proj_lora2": "double_blocks.0.txt_attn.proj",
                "single_blocks.0.processor.qkv_lora": "single_blocks.0.linear1_qkv",
                "single_blocks.0.processor.proj_lora": "single_blocks.0.linear2"}


def uno_lora(hidden: int = HIDDEN, rank: int = RANK, prefix: str = "", blocks: tuple[int, int] = (1, 1),
             seed: int = 0) -> dict[str, torch.Tensor]:
    """A UNO processor LoRA with random weights; `blocks` = (double, single) block count."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"qkv_lora1": (hidden, 3 * hidden), "proj_lora1": (hidden, hidden), "qkv_lora2": (hidden, 3 * hidden),
              "proj_lora2": (hidden, hidden), "qkv_lora": (hidden, 3 * hidden), "proj_lora": (5 * hidden, hidden)}
    lora = {}
    for module, (inputs, outputs) in shapes.items():
        block, count = ("double_blocks", blocks[0]) if module.endswith(("1", "2")) else ("single_blocks", blocks[1])
        for index in range(count):
            name = f"{prefix}{block}.{index}.processor.{module}"
            lora[f"{name}.down.weight"] = torch.randn(rank, inputs, generator=generator)
            lora[f"{name}.up.weight"] = torch.randn(outputs, rank, generator=generator)
    return lora


def omnigen2_peft_lora(hidden: int = 48, kv: int = 16) -> dict[str, torch.Tensor]:
    """UMO_OmniGen2's layout: peft keys with the adapter name, on the layers and the refiners (k/v narrower: GQA)."""
    outputs = {"to_q": hidden, "to_k": kv, "to_v": kv, "to_out.0": hidden}
    lora = {}
    for layer in ("layers.0", "layers.1", "noise_refiner.0", "ref_image_refiner.0", "context_refiner.0"):
        for module, width in outputs.items():
            lora[f"{layer}.attn.{module}.lora_A.default.weight"] = torch.randn(RANK, hidden)
            lora[f"{layer}.attn.{module}.lora_B.default.weight"] = torch.randn(width, RANK)
    return lora


def tiny_flux() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=32,
                                  pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))


def with_adapter(rank: int, alpha: float, target_modules=UNO_TARGET_MODULES, random_b: bool = True):
    model = tiny_flux()
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                 target_modules=target_modules))
    if random_b:  # peft starts lora_B at zero; a zero delta would make every comparison pass
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter)
    return model


def peft_deltas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weight delta of every LoRA-wrapped Linear, measured through peft's own forward: (layer(I) - base(I))^T."""
    deltas = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoraLinear):
                eye = torch.eye(module.in_features)
                deltas[name] = (module(eye) - module.base_layer(eye)).T
    return deltas


def uno_deltas(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """UNO's formula (delta = up @ down, no alpha) split onto the diffusers modules."""
    deltas = {}
    for uno_module, modules in UNO_TO_DIFFUSERS.items():
        delta = lora[f"{uno_module}.up.weight"] @ lora[f"{uno_module}.down.weight"]
        deltas.update(zip(modules, delta.chunk(len(modules)), strict=True))
    return deltas


def assert_same_deltas(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].abs().max() > 0, name
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-5, msg=name)


def test_uno_file_is_recognised_and_keeps_its_metadata(tmp_path):
    path = tmp_path / "UMO_UNO.safetensors"
    save_file(uno_lora(), path, metadata={"umo_format": "uno"})
    tensors, metadata = load_lora_file(path)
    assert metadata == {"umo_format": "uno"}
    assert detect_lora_format(tensors) == "uno" and lora_family(tensors) == "flux"
    converted = to_comfy_lora(tensors)
    assert set(converted) == {f"diffusion_model.{module}.lora_{d}.weight"
                              for module in UNO_TO_COMFY.values() for d in ("up", "down")}
    for uno_module, comfy_module in UNO_TO_COMFY.items():
        assert torch.equal(converted[f"diffusion_model.{comfy_module}.lora_down.weight"],
                           tensors[f"{uno_module}.down.weight"])
    assert lora_family(converted) == "flux"  # the converted file still tells its family


def test_prefixed_uno_keys_convert_like_plain_ones():
    plain, prefixed = uno_lora(), uno_lora(prefix="diffusion_model.")
    assert detect_lora_format(prefixed) == "uno"
    assert to_comfy_lora(prefixed).keys() == to_comfy_lora(plain).keys()
    assert uno_to_diffusers(prefixed).keys() == uno_to_diffusers(plain).keys()


def test_uno_to_diffusers_gives_the_same_deltas_through_peft():
    """A UNO LoRA loaded into a real FluxTransformer2DModel with peft (alpha != r) changes the weights by up @ down."""
    uno, scale = uno_lora(), 0.5
    model = with_adapter(RANK, RANK * scale, random_b=False)
    result = set_peft_model_state_dict(model, uno_to_diffusers(uno, scale=scale), adapter_name="default")
    assert not result.unexpected_keys
    assert not [key for key in result.missing_keys if "lora_" in key]
    assert_same_deltas(peft_deltas(model), uno_deltas(uno))
    # The shared qkv down survives the way back: UNO -> diffusers -> UNO is the identity, rank kept.
    back = diffusers_to_uno(get_peft_model_state_dict(model), scale=scale)
    assert back.keys() == uno.keys()
    for key in uno:
        torch.testing.assert_close(back[key], uno[key], rtol=1e-6, atol=0, msg=key)


def test_separately_trained_qkv_fuse_exactly_and_come_back():
    """The trainer's direction: peft q/k/v LoRAs fuse into UNO's qkv (stacked downs, block-diagonal ups, rank x3),
    and loading that UNO file as initialisation gives the original per-module LoRAs back."""
    rank, alpha = 3, 6
    trained = with_adapter(rank, alpha)
    peft_lora = get_peft_model_state_dict(trained)
    uno = diffusers_to_uno(peft_lora, scale=alpha / rank)
    assert detect_lora_format(uno) == "uno"
    assert uno["double_blocks.0.processor.qkv_lora1.down.weight"].shape == (3 * rank, HIDDEN)
    assert uno["double_blocks.0.processor.qkv_lora1.up.weight"].shape == (3 * HIDDEN, 3 * rank)
    assert uno["single_blocks.0.processor.proj_lora.down.weight"].shape == (rank, 5 * HIDDEN)
    assert_same_deltas(uno_deltas(uno), peft_deltas(trained))

    restored = with_adapter(rank, alpha, random_b=False)
    back = uno_to_diffusers(uno, scale=alpha / rank)
    assert back.keys() == peft_lora.keys()
    for key in peft_lora:
        torch.testing.assert_close(back[key], peft_lora[key], rtol=1e-6, atol=0, msg=key)
    set_peft_model_state_dict(restored, back, adapter_name="default")
    assert_same_deltas(peft_deltas(restored), peft_deltas(trained))


def test_trainer_file_with_metadata_loads_like_uno(tmp_path):
    trained = with_adapter(2, 2)
    path = tmp_path / "run" / "lora_uno.safetensors"
    metadata = {"umo_format": "uno", "umo_base_model": "flux1-dev"}
    save_lora_file(path, diffusers_to_uno(get_peft_model_state_dict(trained)), metadata)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    tensors, read_metadata = load_lora_file(path)
    assert read_metadata == metadata
    assert detect_lora_format(tensors) == "uno" and lora_family(tensors) == "flux"
    assert_same_deltas(uno_deltas(tensors), peft_deltas(trained))


def test_missing_qkv_parts_add_nothing():
    """A peft LoRA on q and v only: UNO's fused qkv gets zero rows for k."""
    trained = with_adapter(2, 2, target_modules=["to_q", "to_v"])
    uno = diffusers_to_uno(get_peft_model_state_dict(trained))
    assert set(uno) == {f"{m}.{d}.weight" for m in ("double_blocks.0.processor.qkv_lora1",
                                                    "single_blocks.0.processor.qkv_lora") for d in ("down", "up")}
    fused = "double_blocks.0.processor.qkv_lora1"
    q, k, v = (uno[f"{fused}.up.weight"] @ uno[f"{fused}.down.weight"]).chunk(3)
    deltas = peft_deltas(trained)
    torch.testing.assert_close(q, deltas["transformer_blocks.0.attn.to_q"])
    assert not k.any()
    torch.testing.assert_close(v, deltas["transformer_blocks.0.attn.to_v"])


def test_mismatched_uno_shapes_are_an_error():
    uno = uno_lora()
    uno["double_blocks.0.processor.qkv_lora1.up.weight"] = torch.zeros(3 * HIDDEN, RANK + 1)
    with pytest.raises(UMOError, match=r"qkv_lora1 has mismatched shapes \(down \[4, 32\], up \[96, 5\]\)"):
        uno_to_diffusers(uno)


def test_modules_uno_cannot_hold_are_an_error():
    trained = with_adapter(2, 2, target_modules=["to_q", "ff.net.2"])
    with pytest.raises(UMOError, match=r"ff\.net\.2.*no place in UNO's layout"):
        diffusers_to_uno(get_peft_model_state_dict(trained))


def test_every_flux_linear_is_a_flux_diffusers_lora():
    """The recognised module names are checked against the real FluxTransformer2DModel: a LoRA on all its Linears."""
    model = tiny_flux()
    linears = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=linears))
    peft_lora = get_peft_model_state_dict(model)
    assert len(peft_lora) == 2 * len(linears)
    for prefix in ("", "transformer."):
        state_dict = {prefix + key: value for key, value in peft_lora.items()}
        assert detect_lora_format(state_dict) == "flux_diffusers_peft" and lora_family(state_dict) == "flux"
        converted = to_comfy_lora(state_dict)
        assert set(converted) == {"transformer." + key for key in peft_lora}
    # peft's own state dict names the adapter; that form is recognised as well.
    named = {key.replace(".weight", ".default.weight"): value for key, value in peft_lora.items()}
    assert set(to_comfy_lora(named)) == {"transformer." + key for key in peft_lora}


def test_diffusers_alpha_metadata_becomes_comfyui_alpha():
    peft_lora = get_peft_model_state_dict(with_adapter(2, 8))
    metadata = {"lora_adapter_metadata": json.dumps({"transformer.r": 2, "transformer.lora_alpha": 8})}
    converted = to_comfy_lora(peft_lora, metadata)
    alphas = {key: value for key, value in converted.items() if key.endswith(".alpha")}
    assert len(alphas) == len(peft_lora) // 2 and all(value.item() == 8 for value in alphas.values())
    assert not any(key.endswith(".alpha") for key in to_comfy_lora(peft_lora))


def test_omnigen2_peft_layout_is_converted_like_umos_script(tmp_path):
    path = tmp_path / "UMO_OmniGen2.safetensors"
    save_file(omnigen2_peft_lora(), path)
    tensors, _ = load_lora_file(path)
    assert detect_lora_format(tensors) == "omnigen2_peft" and lora_family(tensors) == "omnigen2"
    converted = to_comfy_lora(tensors)
    # UMO's comfyui/OmniGen2/convert_ckpt.py: "diffusion_model." + key without ".default."
    assert converted.keys() == {"diffusion_model." + key.replace(".default.", ".") for key in tensors}
    assert torch.equal(converted["diffusion_model.context_refiner.0.attn.to_k.lora_B.weight"],
                       tensors["context_refiner.0.attn.to_k.lora_B.default.weight"])
    # The file UMO's script writes is ComfyUI's format and still an OmniGen2 LoRA.
    assert detect_lora_format(converted) == "comfy" and lora_family(converted) == "omnigen2"
    assert to_comfy_lora(converted).keys() == converted.keys()


def test_comfy_keys_of_other_models_pass_through_with_no_family():
    tensors = {"diffusion_model.input_blocks.1.1.proj_in.lora_up.weight": torch.zeros(8, RANK),
               "diffusion_model.input_blocks.1.1.proj_in.lora_down.weight": torch.zeros(RANK, 8)}
    assert detect_lora_format(tensors) == "comfy" and lora_family(tensors) is None
    assert to_comfy_lora(tensors) == tensors


@pytest.mark.parametrize("keys", [
    ["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"],
    ["double_blocks.0.processor.qkv_lora1.down.weight", "layers.0.attn.to_q.lora_A.default.weight"],  # mixed
    ["double_blocks.0.processor.qkv_lora.down.weight"],  # single-block module name in a double block
])
def test_unknown_layouts_list_what_is_recognised(keys):
    with pytest.raises(UMOError, match="Recognised: UNO.*OmniGen2.*FluxTransformer2DModel.*diffusion_model"):
        detect_lora_format(dict.fromkeys(keys, torch.zeros(1)))


def test_family_mismatch_names_the_file_and_the_fix():
    check_family("UMO_UNO.safetensors", "flux", "flux")
    check_family("some_lora.safetensors", None, "omnigen2")
    with pytest.raises(UMOError, match="'UMO_OmniGen2.safetensors' is a omnigen2 LoRA but the model is flux; "
                                       "load it on an OmniGen2 model"):
        check_family("UMO_OmniGen2.safetensors", "omnigen2", "flux")
    with pytest.raises(UMOError, match="UMO_UNO.safetensors.*neither FLUX nor OmniGen2.*FLUX.1"):
        check_family("UMO_UNO.safetensors", "flux", None)


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(UMOError, match="'.*absent.safetensors' does not exist"):
        load_lora_file(tmp_path / "absent.safetensors")
    cut = tmp_path / "cut.safetensors"
    save_file(uno_lora(), cut)
    cut.write_bytes(cut.read_bytes()[:200])
    pickled = tmp_path / "lora.ckpt"
    torch.save(uno_lora(), pickled)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    for path in (cut, pickled, empty):
        with pytest.raises(UMOError, match=f"'{path}' is not a readable .safetensors file"):
            load_lora_file(path)
    nothing = tmp_path / "nothing.safetensors"
    save_file({}, nothing)
    with pytest.raises(UMOError, match="'.*nothing.safetensors' holds no tensors"):
        load_lora_file(nothing)


def test_a_failed_save_leaves_the_old_file(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_lora_file(path, uno_lora(), {"umo_format": "uno"})
    before = path.read_bytes()
    with pytest.raises(UMOError, match="metadata"):
        save_lora_file(path, uno_lora(seed=1), {"rank": 4})
    with pytest.raises(AttributeError):  # safetensors fails half way: not a tensor
        save_lora_file(path, {"a": torch.zeros(1), "b": "not a tensor"})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]


# ComfyUI's own loader (only where a ComfyUI checkout is given).
needs_comfyui = pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout")


def _comfy():
    path = os.environ["COMFYUI_PATH"]
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.lora
    import comfy.lora_convert
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    return comfy


def _patcher(comfy, model):
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


@pytest.fixture(scope="module")
def comfy_flux():
    return make_comfy_flux()


def make_comfy_flux():
    """ComfyUI's FLUX with the tiny diffusers model's sizes (width 32, 2 heads), on the meta device."""
    from tests.comfyui.conftest import flux_config

    comfy = _comfy()
    config = comfy.supported_models.Flux(flux_config(vec_in_dim=16, context_in_dim=32, hidden_size=HIDDEN,
                                                     num_heads=HEADS, axes_dim=[4, 6, 6]))
    with torch.device("meta"):
        return _patcher(comfy, comfy.model_base.Flux(config, device="meta"))


def _comfy_deltas(comfy, patcher, lora: dict[str, torch.Tensor], caplog) -> dict[str, torch.Tensor]:
    """ComfyUI's LoRA path as LoraLoaderModelOnly runs it (convert_lora, key map, load_lora, patch math)."""
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora), key_map)
    assert "lora key not loaded" not in caplog.text
    patched = patcher.clone()
    patched.add_patches(patches, 1.0)
    weights = patcher.model.state_dict()
    return {key: comfy.lora.calculate_weight(patched.patches[key], torch.zeros(weights[key].shape), key)
            for key in patched.patches}


@needs_comfyui
def test_comfyui_applies_uno_and_diffusers_loras_with_uno_deltas(comfy_flux, caplog):
    """Both conversions, through ComfyUI's own loader into its fused FLUX weights, give UNO's deltas."""
    comfy = _comfy()
    uno = uno_lora()
    expected = {}
    for uno_module, comfy_module in UNO_TO_COMFY.items():
        delta = uno[f"{uno_module}.up.weight"] @ uno[f"{uno_module}.down.weight"]
        if comfy_module.endswith("linear1_qkv"):  # q, k, v are the first 3H rows of linear1 (then the MLP)
            delta = torch.cat([delta, torch.zeros(4 * HIDDEN, HIDDEN)])
            comfy_module = comfy_module.replace("linear1_qkv", "linear1")
        expected[f"diffusion_model.{comfy_module}.weight"] = delta
    for lora in (to_comfy_lora(uno), to_comfy_lora(uno_to_diffusers(uno))):
        assert_same_deltas(_comfy_deltas(comfy, comfy_flux, lora, caplog), expected)


@needs_comfyui
def test_comfyui_converts_full_depth_uno_files_the_same_way():
    """ComfyUI's own USO/UNO converter (it runs for full-depth FLUX files only) gives the keys we give."""
    comfy = _comfy()
    uno = uno_lora(hidden=2, rank=1, blocks=(19, 38))
    assert comfy.lora_convert.convert_lora(uno).keys() == to_comfy_lora(uno).keys()


@needs_comfyui
def test_comfyui_omnigen2_key_map_takes_every_converted_key(caplog):
    comfy = _comfy()
    config = comfy.supported_models.Omnigen2({
        "image_model": "omnigen2", "axes_dim_rope": [8, 4, 4], "axes_lens": [64, 64, 64], "ffn_dim_multiplier": None,
        "hidden_size": 48, "in_channels": 16, "multiple_of": 16, "norm_eps": 1e-5, "num_attention_heads": 3,
        "num_kv_heads": 1, "num_layers": 2, "num_refiner_layers": 1, "out_channels": None, "patch_size": 2,
        "text_feat_dim": 32, "timestep_scale": 1000.0})
    with torch.device("meta"):
        patcher = _patcher(comfy, comfy.model_base.Omnigen2(config, device="meta"))
    lora = omnigen2_peft_lora()
    deltas = _comfy_deltas(comfy, patcher, to_comfy_lora(lora), caplog)
    assert len(deltas) == len(lora) // 2
    for key, delta in deltas.items():
        module = key.removeprefix("diffusion_model.").removesuffix(".weight")
        up, down = (lora[f"{module}.lora_{ab}.default.weight"] for ab in "BA")
        torch.testing.assert_close(delta, up @ down)
