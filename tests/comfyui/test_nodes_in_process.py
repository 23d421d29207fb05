"""Pack nodes called in the test process with ComfyUI's own model classes, where a server run cannot reach:
ComfyUI detects OmniGen2 only at its full 4B size, so the OmniGen2 model is built on the meta device."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from tests.comfyui.conftest import (
    COMFYUI_PATH,
    comfy_extras_module,
    detected_model,
    flux_vae,
    import_pack,
    omnigen2_peft_lora,
    tiny_flux_model,
    uno_lora,
)
from tests.conftest import PHOTOS, ROOT
from tests.official_packs import make_official_pack
from umo_core import UMOError
from umo_core.backbones.flux1.references import resize_reference
from umo_core.backbones.omnigen2 import references as omnigen2_references

# ComfyUI tells an OmniGen2 file by this key and gives it the released model's sizes.
OMNIGEN2_FILE_MARKER = "time_caption_embed.timestep_embedder.linear_1.bias"


@pytest.fixture(scope="module")
def omnigen2_model():
    """ComfyUI's OmniGen2 as its model detection configures the released checkpoint (on the meta device)."""
    return detected_model({OMNIGEN2_FILE_MARKER: torch.empty(1024, device="meta")})


@pytest.fixture(scope="module")
def flux_model():
    return tiny_flux_model()


def flux_diffusers_lora(alpha: float) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A peft LoRA of diffusers' FluxTransformer2DModel (q, k, v of block 0) with its alpha in the metadata."""
    generator = torch.Generator().manual_seed(3)
    lora = {}
    for module in ("to_q", "to_k", "to_v"):
        key = f"transformer.transformer_blocks.0.attn.{module}"
        lora[f"{key}.lora_A.weight"] = torch.randn(4, 3072, generator=generator)
        lora[f"{key}.lora_B.weight"] = torch.randn(3072, 4, generator=generator)
    return lora, {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": alpha})}


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """A loras folder registered with ComfyUI's folder_paths, holding the test LoRAs."""
    import_pack()
    import folder_paths

    folder = tmp_path_factory.mktemp("loras")
    save_file(omnigen2_peft_lora(), folder / "tiny_omnigen2.safetensors")
    save_file(omnigen2_peft_lora(layers=40), folder / "too_deep_omnigen2.safetensors")  # OmniGen2 has 32 layers
    save_file(uno_lora(), folder / "tiny_uno.safetensors")
    tensors, metadata = flux_diffusers_lora(alpha=2.0)
    save_file(tensors, folder / "tiny_flux_diffusers.safetensors", metadata=metadata)
    folder_paths.add_model_folder_path("loras", str(folder))
    return folder


def _backbone_nodes():
    return import_pack().nodes.backbone


def test_lora_loader_converts_omnigen2_peft_keys_and_changes_the_weights(omnigen2_model, loras):
    patched = _backbone_nodes().UMOLoraLoader.execute(omnigen2_model, "tiny_omnigen2.safetensors", 0.5)[0]
    assert len(patched.patches) == 8  # to_q, to_k, to_v, to_out.0 of two layers
    assert not omnigen2_model.patches  # the input MODEL is untouched
    # ComfyUI's own patch math, as it runs when the model is loaded for sampling.
    weight = _patched_weight(omnigen2_model, patched, "diffusion_model.layers.1.attn.to_out.0.weight")
    lora = omnigen2_peft_lora()
    up, down = (lora[f"layers.1.attn.to_out.0.lora_{ab}.default.weight"] for ab in "BA")
    assert torch.allclose(weight, 0.5 * up @ down, atol=1e-5)


def _patched_weight(model, patched, key: str) -> torch.Tensor:
    """The weight ComfyUI computes for `key` from the patches (here added to zeros: the LoRA's delta)."""
    import comfy.lora

    return comfy.lora.calculate_weight(patched.patches[key], torch.zeros(model.model.state_dict()[key].shape), key)


def test_lora_loader_applies_uno_keys_to_flux(flux_model, loras):
    patched = _backbone_nodes().UMOLoraLoader.execute(flux_model, "tiny_uno.safetensors", 1.0)[0]
    assert len(patched.patches) == 6 and not flux_model.patches
    lora = uno_lora()
    delta = _patched_weight(flux_model, patched, "diffusion_model.single_blocks.0.linear2.weight")
    up, down = (lora[f"single_blocks.0.processor.proj_lora.{d}.weight"] for d in ("up", "down"))
    assert torch.allclose(delta, up @ down, atol=1e-5)


def test_lora_loader_applies_a_diffusers_flux_lora_with_its_alpha(flux_model, loras):
    patched = _backbone_nodes().UMOLoraLoader.execute(flux_model, "tiny_flux_diffusers.safetensors", 1.0)[0]
    delta = _patched_weight(flux_model, patched, "diffusion_model.double_blocks.0.img_attn.qkv.weight")
    lora, _ = flux_diffusers_lora(alpha=2.0)
    rows = [lora[f"transformer.transformer_blocks.0.attn.{m}.lora_B.weight"]
            @ lora[f"transformer.transformer_blocks.0.attn.{m}.lora_A.weight"] for m in ("to_q", "to_k", "to_v")]
    assert torch.allclose(delta, torch.cat(rows) * 2.0 / 4, atol=1e-4)  # alpha / rank


def test_lora_loader_refuses_an_omnigen2_lora_on_flux(flux_model, loras):
    with pytest.raises(UMOError, match="is a omnigen2 LoRA but the model is flux"):
        _backbone_nodes().UMOLoraLoader.execute(flux_model, "tiny_omnigen2.safetensors", 1.0)


def test_lora_loader_refuses_a_flux_lora_on_omnigen2(omnigen2_model, loras):
    with pytest.raises(UMOError, match="is a flux LoRA but the model is omnigen2"):
        _backbone_nodes().UMOLoraLoader.execute(omnigen2_model, "tiny_uno.safetensors", 1.0)


def test_lora_loader_refuses_layers_the_model_lacks(omnigen2_model, loras):
    with pytest.raises(UMOError, match="32 of 160 layers do not exist in this omnigen2"):
        _backbone_nodes().UMOLoraLoader.execute(omnigen2_model, "too_deep_omnigen2.safetensors", 1.0)


def _conditioning(width: int) -> list:
    return [[torch.zeros(1, 8, width), {}]]


@pytest.mark.parametrize(("width", "backbone", "family"), [
    (4096, "auto", "flux"), (2048, "auto", "omnigen2"), (4096, "flux (UNO)", "flux"), (2048, "omnigen2", "omnigen2"),
    (3584, "omnigen2", "omnigen2"),  # an unknown text encoder: the explicit choice stands
])
def test_reference_conditioning_backbone(width, backbone, family):
    assert _backbone_nodes().conditioning_family(_conditioning(width), backbone) == family


@pytest.mark.parametrize(("width", "backbone", "message"), [
    (3584, "auto", "a text embedding of width 3584 comes from no text encoder the backbones use"),
    (4096, "omnigen2", "comes from FLUX.1 \\(UNO\\)'s text encoder"),
    (2048, "flux (UNO)", "comes from OmniGen2's text encoder"),
])
def test_reference_conditioning_backbone_errors(width, backbone, message):
    with pytest.raises(UMOError, match=message):
        _backbone_nodes().conditioning_family(_conditioning(width), backbone)


def test_reference_conditioning_checks_the_vae(vae):
    """FLUX.1's autoencoder (16 channels) goes with FLUX.1's text encoder, not with FLUX.2's."""
    assert _backbone_nodes().conditioning_family(_conditioning(4096), "auto", vae) == "flux"
    with pytest.raises(UMOError, match="the VAE makes 16-channel latents, but FLUX.2 needs FLUX.2's autoencoder"):
        _backbone_nodes().conditioning_family(_conditioning(7680), "auto", vae)


@pytest.fixture(scope="module")
def vae():
    return flux_vae()


def _native_chain(positive: list, latents: list[torch.Tensor]) -> list:
    """UMO's official per-reference chain: ReferenceLatent per reference, then the uxo/uno method."""
    for latent in latents:
        positive = comfy_extras_module("nodes_edit_model").ReferenceLatent.execute(positive, {"samples": latent})[0]
    method = comfy_extras_module("nodes_flux").FluxKontextMultiReferenceLatentMethod
    return method.execute(positive, "uxo/uno")[0]


def test_reference_conditioning_flux_matches_the_native_chain(vae):
    positive = [[torch.zeros(1, 8, 4096), {"pooled_output": torch.zeros(1, 768)}]]
    generator = torch.Generator().manual_seed(0)
    wide, tall = torch.rand(1, 250, 400, 3, generator=generator), torch.rand(1, 400, 250, 3, generator=generator)
    output = _backbone_nodes().ReferenceConditioning.execute(positive, vae, "auto", 0, image_1=wide, image_2=tall)
    conditioning, negative = output[0], output[1]
    assert negative is None and positive[0][1].keys() == {"pooled_output"}  # the input is not modified
    latents = conditioning[0][1]["reference_latents"]
    # UNO's rule for two references: long side 320, centre crop to multiples of 16, 8x smaller latents.
    assert [tuple(latent.shape) for latent in latents] == [(1, 16, 24, 40), (1, 16, 40, 24)]
    assert torch.allclose(latents[1], vae.encode(resize_reference(tall[0], 320)[None]))
    native = _native_chain(positive, latents)
    assert conditioning[0][1].keys() == native[0][1].keys()
    assert conditioning[0][1]["reference_latents_method"] == native[0][1]["reference_latents_method"] == "uxo"
    assert all(ours is theirs for ours, theirs in zip(latents, native[0][1]["reference_latents"], strict=True))


def test_reference_conditioning_batch_then_single_inputs_and_long_side_override(vae):
    positive = [[torch.zeros(1, 8, 4096), {}]]
    batch = torch.rand(2, 64, 64, 3)
    output = _backbone_nodes().ReferenceConditioning.execute(positive, vae, "flux (UNO)", 128,
                                                             images=batch, image_1=torch.rand(1, 96, 64, 3))
    shapes = [tuple(latent.shape) for latent in output[0][0][1]["reference_latents"]]
    assert shapes == [(1, 16, 16, 16), (1, 16, 16, 16), (1, 16, 16, 10)]  # 128x84 -> cropped to 128x80


def test_reference_conditioning_needs_a_reference(vae):
    with pytest.raises(UMOError, match="connect at least one reference image"):
        _backbone_nodes().ReferenceConditioning.execute([[torch.zeros(1, 8, 4096), {}]], vae, "auto", 0)


@pytest.fixture(scope="module")
def insightface_folder(tmp_path_factory):
    """An extra insightface folder registered with ComfyUI: antelopev2 as its zip unpacks (nested folder, landmark
    and gender/age models beside the detector and recogniser) and a broken pack."""
    import_pack()
    import folder_paths

    folder = tmp_path_factory.mktemp("insightface")
    make_official_pack(folder / "models", "antelopev2")
    broken = folder / "models" / "broken_pack"
    broken.mkdir(parents=True)
    (broken / "det_10g.onnx").write_bytes(b"cut short")
    folder_paths.add_model_folder_path("insightface", str(folder))
    return folder


def test_face_model_loader_lists_and_loads_packs(insightface_folder):
    identity_nodes = import_pack().nodes.identity
    options = identity_nodes.FaceModelLoader.define_schema().inputs[0].options
    assert {"antelopev2", "broken_pack"} <= set(options)
    face_model = identity_nodes.FaceModelLoader.execute("antelopev2", "CPU", "onnx")[0]
    assert face_model.identities([PHOTOS / "Rob_Lowe_0001.jpg"]).embeddings.shape[0] == 1


@pytest.mark.parametrize(("pack", "message"), [
    ("missing_pack", r"face pack 'missing_pack' not found; looked in .*/models/insightface/models/missing_pack, .*"
                     r"It needs one SCRFD face detector"),
    ("broken_pack", "det_10g.onnx' is not a readable ONNX model"),
])
def test_face_model_loader_errors_say_what_to_do(insightface_folder, pack, message):
    with pytest.raises(UMOError, match=message):
        import_pack().nodes.identity.FaceModelLoader.execute(pack, "CPU", "onnx")


def test_reference_conditioning_omnigen2_convention(vae, monkeypatch):
    """References for both conditionings (DualCFGGuider's cond1 and cond2), no FLUX placement, sides
    multiples of 16 at the target pixel count (lowered from one megapixel to keep the CPU encode short)."""
    backbone_nodes = _backbone_nodes()
    monkeypatch.setattr(omnigen2_references, "OMNIGEN2_REFERENCE_PIXELS", 128 * 128)
    positive, negative = [[torch.zeros(1, 8, 2048), {}]], [[torch.ones(1, 8, 2048), {}]]
    output = backbone_nodes.ReferenceConditioning.execute(positive, vae, "auto", 0, negative=negative,
                                                          image_1=torch.rand(1, 100, 200, 3))
    for conditioning in output[:2]:
        assert conditioning[0][1].keys() == {"reference_latents"}
        assert [tuple(latent.shape) for latent in conditioning[0][1]["reference_latents"]] == [(1, 16, 12, 22)]
    assert output[0][0][1]["reference_latents"][0] is output[1][0][1]["reference_latents"][0]
    assert torch.equal(output[1][0][0], negative[0][0])


# A ComfyUI user clones the pack into custom_nodes and installs requirements.txt only: umo_core is not
# pip-installed there. This script hides the development install (an editable install, or the pack's folder on
# PYTHONPATH), then loads the pack with ComfyUI's loader: `nodes.load_custom_node` in ComfyUI's own tree, the vanilla
# custom-node importer of a pip-installable ComfyUI (0.12.1's hiddenswitch fork). With "hide-pinned-api" it also
# hides comfy_api.v0_0_2, as a ComfyUI that dropped that version would.
LOAD_PACK = """
import asyncio, importlib.util, os, sys
comfy_path, pack, api = sys.argv[1:]
sys.meta_path[:] = [finder for finder in sys.meta_path if "__editable__" not in finder.__module__]
sys.path[:] = [path for path in sys.path if "__editable__" not in path and os.path.abspath(path or ".") != pack]
assert importlib.util.find_spec("umo_core") is None, "umo_core is still importable"
sys.path.insert(0, comfy_path)
import comfy.cli_args
comfy.cli_args.args.cpu = True
try:
    from comfy_compatibility.vanilla import prepare_vanilla_environment
except ImportError:
    prepare_vanilla_environment = None
if prepare_vanilla_environment is not None:
    prepare_vanilla_environment()
import nodes
if api == "hide-pinned-api":
    sys.modules["comfy_api.v0_0_2"] = None  # importing it now raises ImportError
if prepare_vanilla_environment is None:
    loaded = asyncio.run(nodes.load_custom_node(pack))
    mappings = nodes.NODE_CLASS_MAPPINGS
else:
    from comfy.nodes.vanilla_node_importing import _vanilla_load_custom_nodes_1
    mappings = _vanilla_load_custom_nodes_1(pack).NODE_CLASS_MAPPINGS
    loaded = bool(mappings)
node_api = next(module for name, module in sys.modules.items() if name.endswith(".nodes.node_api"))
print(loaded, "UMOFaceModelLoader" in mappings, nodes.__file__, sys.modules["umo_core"].__file__, node_api.NODE_API)
"""


def _load_pack_in_comfyui(tmp_path, api: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", LOAD_PACK, COMFYUI_PATH, str(ROOT), api], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split()[-5:]


def test_pack_loads_in_comfyui_without_installing_umo_core(tmp_path):
    loaded, registered, comfy_nodes, umo_core, node_api = _load_pack_in_comfyui(tmp_path, "as-is")
    assert loaded == registered == "True"
    assert comfy_nodes.startswith(COMFYUI_PATH)  # the pack's nodes/ folder does not shadow ComfyUI's nodes.py
    assert umo_core.startswith(str(ROOT))
    assert node_api == "comfy_api.v0_0_2"  # the pinned node API


def test_pack_falls_back_to_the_latest_node_api_without_the_pinned_one(tmp_path):
    loaded, registered, _, _, node_api = _load_pack_in_comfyui(tmp_path, "hide-pinned-api")
    assert loaded == registered == "True"
    assert node_api == "comfy_api.latest"


def test_pack_in_process_uses_the_pinned_node_api():
    node_api = import_pack().nodes.node_api
    import comfy_api.v0_0_2

    assert node_api.NODE_API == "comfy_api.v0_0_2" and node_api.io is comfy_api.v0_0_2.io
