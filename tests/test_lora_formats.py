"""LoRA layouts: real .safetensors files and real diffusers/peft modules (tiny FLUX); ComfyUI's loader is in
tests/comfyui/test_lora_patches_comfyui.py.

Shapes follow the real models: a FLUX block of width H has fused qkv [3H, H], outputs [H, H], and the single
block's linear2 / proj_out takes attention + MLP = H + 4H (15360 for FLUX.1's H = 3072).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file

from tests.flux2_layout import transformer_to_bfl as flux2_transformer_to_bfl
from tests.flux_layout import transformer_to_bfl as flux1_transformer_to_bfl
from tests.lora_layouts import UNO_TO_COMFY, UNO_TO_DIFFUSERS, assert_same_deltas
from tests.tiny_models import (
    HIDDEN,
    LORA_RANK,
    add_lora,
    omnigen2_peft_lora,
    tiny_flux2_transformer,
    tiny_flux_transformer,
    uno_lora,
)
from umo_core import UMOError
from umo_core.backbones import get
from umo_core.backbones.flux1.lora import UNO_TARGET_MODULES, diffusers_to_uno, uno_to_diffusers
from umo_core.backbones.flux2.lora import FLUX2_TARGET_MODULES
from umo_core.backbones.lora_formats import (
    check_family,
    detect_lora_format,
    load_lora_file,
    lora_family,
    save_lora_file,
    to_comfy_lora,
)


def with_adapter(rank: int, alpha: float, target_modules=UNO_TARGET_MODULES, random_b: bool = True):
    """The tiny FLUX with a peft LoRA; `random_b`: lora_B random (peft starts it at zero: a zero delta would make
    every comparison pass)."""
    return add_lora(tiny_flux_transformer(), rank, alpha, target_modules, lora_b_std=1.0 if random_b else None)


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
    model = with_adapter(LORA_RANK, LORA_RANK * scale, random_b=False)
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
    uno["double_blocks.0.processor.qkv_lora1.up.weight"] = torch.zeros(3 * HIDDEN, LORA_RANK + 1)
    with pytest.raises(UMOError, match=r"qkv_lora1 has mismatched shapes \(down \[4, 32\], up \[96, 5\]\)"):
        uno_to_diffusers(uno)


def test_modules_uno_cannot_hold_are_an_error():
    trained = with_adapter(2, 2, target_modules=["to_q", "ff.net.2"])
    with pytest.raises(UMOError, match=r"ff\.net\.2.*no place in UNO's layout"):
        diffusers_to_uno(get_peft_model_state_dict(trained))


def test_every_flux_linear_is_a_flux_diffusers_lora():
    """The recognised module names are checked against the real FluxTransformer2DModel: a LoRA on all its Linears."""
    model = tiny_flux_transformer()
    linears = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    add_lora(model, 2, 2, target_modules=linears)
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
    tensors = {"diffusion_model.input_blocks.1.1.proj_in.lora_up.weight": torch.zeros(8, LORA_RANK),
               "diffusion_model.input_blocks.1.1.proj_in.lora_down.weight": torch.zeros(LORA_RANK, 8)}
    assert detect_lora_format(tensors) == "comfy" and lora_family(tensors) is None
    assert to_comfy_lora(tensors) == tensors


@pytest.mark.parametrize("keys", [
    ["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"],
    ["double_blocks.0.processor.qkv_lora1.down.weight", "layers.0.attn.to_q.lora_A.default.weight"],  # mixed
    ["double_blocks.0.processor.qkv_lora.down.weight"],  # single-block module name in a double block
])
def test_unknown_layouts_list_what_is_recognised(keys):
    with pytest.raises(UMOError, match="Recognised: UNO.*FluxTransformer2DModel.*OmniGen2.*diffusion_model"):
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


# FLUX.1 or FLUX.2: ComfyUI-format LoRAs of the real modules (Black Forest Labs' names, as ComfyUI's models have them)
# of the tiny FluxTransformer2DModel and Flux2Transformer2DModel.

def comfy_lora(bfl: dict[str, torch.Tensor], modules: str, names: tuple[str, str] = ("lora_down", "lora_up"),
               alpha: bool = False) -> dict[str, torch.Tensor]:
    """A ComfyUI-format LoRA (rank 2) of every matrix of a Black Forest Labs state dict whose module fully matches
    `modules`: down [2, inputs] and up [outputs, 2] under `names`, and an `.alpha` per module where asked."""
    generator = torch.Generator().manual_seed(0)
    lora = {}
    for key, weight in bfl.items():
        module = key.removesuffix(".weight")
        if weight.ndim == 2 and re.fullmatch(modules, module):
            lora[f"diffusion_model.{module}.{names[0]}.weight"] = torch.randn(2, weight.shape[1], generator=generator)
            lora[f"diffusion_model.{module}.{names[1]}.weight"] = torch.randn(weight.shape[0], 2, generator=generator)
            if alpha:
                lora[f"diffusion_model.{module}.alpha"] = torch.tensor(2.0)
    assert lora, modules
    return lora


def flux1_bfl() -> dict[str, torch.Tensor]:
    return flux1_transformer_to_bfl(tiny_flux_transformer().state_dict())


def flux2_bfl() -> dict[str, torch.Tensor]:
    return flux2_transformer_to_bfl(tiny_flux2_transformer().state_dict())


BLOCK_MODULES = r"(?:double|single)_blocks\.\d+\..*"
ATTENTION = r"double_blocks\.\d+\.(?:img|txt)_attn\.(?:qkv|proj)"


@pytest.mark.parametrize(("model", "modules", "family"), [
    pytest.param(flux1_bfl, BLOCK_MODULES, "flux", id="flux1-blocks"),  # per-block img_mod, txt_mod, modulation
    pytest.param(flux1_bfl, r"single_blocks\.\d+\.linear[12]", "flux", id="flux1-single"),  # q, k, v + MLP of 4 widths
    pytest.param(flux1_bfl, rf"{ATTENTION}|double_blocks\.\d+\.img_mlp\.[02]", "flux", id="flux1-attention-mlp"),
    pytest.param(flux2_bfl, rf"{BLOCK_MODULES}|(?:double_stream_modulation_(?:img|txt)|single_stream_modulation)\.lin",
                 "flux2", id="flux2-blocks-modulation"),
    pytest.param(flux2_bfl, r"single_blocks\.\d+\.linear1", "flux2", id="flux2-linear1"),  # + gated MLP 2 x 3 widths
    pytest.param(flux2_bfl, r"single_blocks\.\d+\.linear2", "flux2", id="flux2-linear2"),
    pytest.param(flux2_bfl, rf"{ATTENTION}|double_blocks\.\d+\.txt_mlp\.[02]", "flux2", id="flux2-attention-mlp"),
    pytest.param(flux2_bfl, r"double_stream_modulation_img\.lin", "flux2", id="flux2-shared-modulation"),
    pytest.param(flux1_bfl, ATTENTION, None, id="flux1-attention"),  # the same names and shapes in both
    pytest.param(flux2_bfl, ATTENTION, None, id="flux2-attention"),
])
def test_comfy_format_flux1_and_flux2_are_told_by_what_only_one_has(model, modules, family):
    for names, alpha in ((("lora_down", "lora_up"), False), (("lora_A", "lora_B"), True)):
        lora = comfy_lora(model(), modules, names, alpha)
        assert detect_lora_format(lora) == "comfy"
        assert lora_family(lora) == family, names


def test_attention_only_comfy_loras_take_the_backbone_from_the_metadata():
    for model in (flux1_bfl, flux2_bfl):
        lora = comfy_lora(model(), ATTENTION)
        assert lora_family(lora, {"umo_backbone": "flux2"}) == "flux2"
        assert lora_family(lora, {"umo_backbone": "flux1"}) == "flux"


def test_every_flux2_layout_is_a_flux2_lora(tmp_path):
    """The trainer's two files (with and without the backbone in their metadata), the diffusers/peft file people share
    ('transformer.' keys, the alpha in diffusers' metadata) and the ComfyUI-format file they convert it to."""
    model = add_lora(tiny_flux2_transformer(), rank=2, alpha=2, target_modules=FLUX2_TARGET_MODULES, lora_b_std=0.5)
    peft_lora = get_peft_model_state_dict(model)
    files = get("flux2").lora_files(peft_lora)
    shared = {f"transformer.{key}": value for key, value in peft_lora.items()}
    shared_metadata = {"lora_adapter_metadata": json.dumps({"r": 2, "lora_alpha": 4})}
    layouts = {"ours, peft": files["lora_diffusers.safetensors"], "ours, ComfyUI": files["lora_comfy.safetensors"],
               "diffusers/peft": (shared, shared_metadata), "ComfyUI": (to_comfy_lora(shared, shared_metadata), {})}
    for name, (tensors, metadata) in layouts.items():
        path = tmp_path / f"{name}.safetensors"
        save_lora_file(path, tensors, metadata)
        tensors, metadata = load_lora_file(path)
        for with_metadata in (metadata, {}):
            assert lora_family(tensors, with_metadata) == "flux2", (name, with_metadata)
    assert detect_lora_format(shared) == "flux2_diffusers_peft"
    assert {detect_lora_format(layouts[name][0]) for name in ("ours, ComfyUI", "ComfyUI")} == {"comfy"}
    with pytest.raises(UMOError, match="'klein_lora.safetensors' is a flux2 LoRA but the model is flux; load it on a "
                                       r"FLUX.2 model \(klein or dev\)"):
        check_family("klein_lora.safetensors", lora_family(layouts["ComfyUI"][0]), "flux")
