"""LoRA layouts on real .safetensors files, and UNO's reference resize rule (no ComfyUI needed)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from umo_core import UMOError
from umo_core.lora_formats import check_family, detect_lora_format, load_lora_file, lora_family, to_comfy_lora
from umo_core.references import reference_long_side, resize_reference

RANK = 4


def _uno(hidden: int = 64, prefix: str = "") -> dict[str, torch.Tensor]:
    modules = {"double_blocks.0.processor.qkv_lora1": (hidden, 3 * hidden),
               "double_blocks.0.processor.proj_lora1": (hidden, hidden),
               "double_blocks.0.processor.qkv_lora2": (hidden, 3 * hidden),
               "double_blocks.0.processor.proj_lora2": (hidden, hidden),
               "single_blocks.0.processor.qkv_lora": (hidden, 3 * hidden),
               "single_blocks.0.processor.proj_lora": (5 * hidden, hidden)}
    lora = {}
    for name, (inputs, outputs) in modules.items():
        lora[f"{prefix}{name}.down.weight"] = torch.randn(RANK, inputs)
        lora[f"{prefix}{name}.up.weight"] = torch.randn(outputs, RANK)
    return lora


def _omnigen2() -> dict[str, torch.Tensor]:
    return {f"layers.0.attn.{m}.lora_{ab}.default.weight": torch.randn(RANK, 8)
            for m in ("to_q", "to_k", "to_v", "to_out.0") for ab in "AB"}


def _saved(tmp_path, name, tensors, metadata=None):
    path = tmp_path / name
    save_file(tensors, path, metadata=metadata)
    return path


def test_uno_layout_from_a_real_file(tmp_path):
    path = _saved(tmp_path, "UMO_UNO.safetensors", _uno(), {"umo_format": "uno"})
    tensors, metadata = load_lora_file(path)
    assert metadata == {"umo_format": "uno"}
    assert detect_lora_format(tensors) == "uno" and lora_family(tensors) == "flux"
    converted = to_comfy_lora(tensors)
    assert set(converted) == {
        f"diffusion_model.{block}.lora_{d}.weight"
        for block in ("double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj", "double_blocks.0.txt_attn.qkv",
                      "double_blocks.0.txt_attn.proj", "single_blocks.0.linear1_qkv", "single_blocks.0.linear2")
        for d in ("up", "down")}
    assert torch.equal(converted["diffusion_model.single_blocks.0.linear2.lora_down.weight"],
                       tensors["single_blocks.0.processor.proj_lora.down.weight"])


def test_prefixed_uno_keys(tmp_path):
    tensors, _ = load_lora_file(_saved(tmp_path, "prefixed.safetensors", _uno(prefix="diffusion_model.")))
    assert detect_lora_format(tensors) == "uno"
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight" in to_comfy_lora(tensors)


def test_omnigen2_peft_layout_is_converted_on_the_fly(tmp_path):
    tensors, _ = load_lora_file(_saved(tmp_path, "UMO_OmniGen2.safetensors", _omnigen2()))
    assert detect_lora_format(tensors) == "omnigen2_peft" and lora_family(tensors) == "omnigen2"
    converted = to_comfy_lora(tensors)
    assert "diffusion_model.layers.0.attn.to_out.0.lora_A.weight" in converted
    assert not any(".default." in key for key in converted)


def test_comfy_layout_passes_through(tmp_path):
    tensors = {"diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": torch.zeros(3, RANK)}
    assert detect_lora_format(tensors) == "comfy" and lora_family(tensors) == "flux"
    assert to_comfy_lora(tensors).keys() == tensors.keys()


def test_unknown_layout_lists_what_is_recognised():
    with pytest.raises(UMOError, match="Recognised: UNO"):
        detect_lora_format({"lora_te_text_model_encoder.weight": torch.zeros(1)})


def test_wrong_family_is_an_error():
    check_family("UMO_UNO.safetensors", "flux", "flux")
    with pytest.raises(UMOError, match="is a omnigen2 LoRA but the model is flux"):
        check_family("UMO_OmniGen2.safetensors", "omnigen2", "flux")
    with pytest.raises(UMOError, match="neither FLUX nor OmniGen2"):
        check_family("UMO_UNO.safetensors", "flux", None)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(UMOError, match="does not exist"):
        load_lora_file(tmp_path / "absent.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(UMOError, match="corrupt.safetensors"):
        load_lora_file(corrupt)


@pytest.mark.parametrize(("count", "expected"), [(1, 512), (2, 320), (4, 320)])
def test_uno_long_side_rule(count, expected):
    assert reference_long_side(count) == expected
    assert reference_long_side(count, override=256) == 256


@pytest.mark.parametrize(("height", "width", "long_side", "expected"), [
    (250, 250, 512, (512, 512)),
    (886, 1280, 320, (208, 320)),  # 221.5 -> 221 -> cropped to 208
    (1280, 886, 512, (512, 352)),  # width 354.4 -> 354 -> cropped to 352
])
def test_resize_and_centre_crop_to_multiples_of_16(height, width, long_side, expected):
    image = torch.rand(height, width, 3)
    resized = resize_reference(image, long_side)
    assert tuple(resized.shape[:2]) == expected and resized.shape[2] == 3
    assert 0 <= resized.min() and resized.max() <= 1
