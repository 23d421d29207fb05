"""FLUX transformer and autoencoder from single files in Black Forest Labs' layout (flux1-dev.safetensors,
ae.safetensors) and from diffusers folders: tiny random-weight models of the real architectures, offline (CPU)."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from safetensors.torch import save_file

from tests.flux_layout import flux1_file_shapes, save_bfl_file, transformer_to_bfl
from tests.tiny_models import (
    FLUX_HEAD_DIM,
    POOLED_DIM,
    TEXT_DIM,
    TEXT_LEN,
    randomized,
    tiny_flux_transformer,
    tiny_vae,
)
from umo_core import UMOError
from umo_core.backbones.flux1.keys import flux_bfl_to_diffusers
from umo_core.backbones.flux1.loading import VAE_CONFIG, load_transformer, load_vae
from umo_core.backbones.flux1.runtime import decode_latents, encode_images, predict_velocity
from umo_core.backbones.text_embedding import TextEmbedding

COMFY_PREFIX = "model.diffusion_model."


@pytest.fixture(autouse=True)
def connections(monkeypatch):
    """Every attempt to reach the network; loading must make none (no hub, whatever the environment says)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts
    assert not attempts, f"network access attempted: {attempts}"


def random_flux_transformer(layers: int = 1, single_layers: int = 1, guidance: bool = True) -> FluxTransformer2DModel:
    """The tiny FLUX at FLUX's head size (the loader reads the rotary embedding's axes from it), every weight random."""
    return randomized(tiny_flux_transformer(layers, single_layers, guidance, head_dim=FLUX_HEAD_DIM))


def random_vae(latent_channels: int = 16) -> AutoencoderKL:
    """The tiny autoencoder with 32 channels a level: FLUX's 32 norm groups (a number no weight shows, so the loader
    keeps FLUX's); every weight random."""
    return randomized(tiny_vae((32, 64, 64, 64), latent_channels, norm_groups=32))


def velocity(transformer) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    latent, reference = torch.randn(1, 16, 4, 4, generator=generator), torch.randn(1, 16, 2, 2, generator=generator)
    text = TextEmbedding(torch.randn(1, TEXT_LEN, TEXT_DIM, generator=generator),
                         torch.randn(1, POOLED_DIM, generator=generator))
    with torch.no_grad():
        return predict_velocity(transformer, latent, 0.7, text, [reference], guidance=3.5)


def assert_same_weights(loaded, original):
    expected = original.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[key]), key


@pytest.mark.parametrize(("layers", "single_layers", "guidance", "prefix"), [
    (1, 1, True, ""),  # flux1-dev.safetensors
    (1, 1, True, COMFY_PREFIX),  # a ComfyUI checkpoint's transformer
    (2, 3, False, ""),  # flux1-schnell.safetensors (no guidance_in), another depth
])
def test_transformer_from_a_bfl_file_is_the_original(tmp_path, layers, single_layers, guidance, prefix):
    original = random_flux_transformer(layers, single_layers, guidance)
    path = save_bfl_file(original, tmp_path / "flux1.safetensors", prefix)
    loaded = load_transformer(path, torch.float32)
    for name in ("num_layers", "num_single_layers", "guidance_embeds", "num_attention_heads", "attention_head_dim",
                 "joint_attention_dim", "pooled_projection_dim", "in_channels"):
        assert loaded.config[name] == original.config[name], name
    assert_same_weights(loaded, original)
    # Same weights; the sums may differ in the last bits with the tensors' memory alignment.
    torch.testing.assert_close(velocity(loaded), velocity(original), rtol=1e-5, atol=1e-5)
    assert loaded.dtype == torch.float32 and not loaded.training


def test_transformer_loads_in_the_asked_dtype_from_a_folder_and_a_file(tmp_path):
    original = random_flux_transformer()
    original.save_pretrained(tmp_path / "transformer")
    from_folder = load_transformer(tmp_path / "transformer", torch.bfloat16)
    from_file = load_transformer(save_bfl_file(original, tmp_path / "flux1.safetensors"), torch.bfloat16)
    assert from_file.dtype == from_folder.dtype == torch.bfloat16
    assert_same_weights(from_file, from_folder)


def test_comfyui_checkpoint_keeps_only_the_transformer(tmp_path):
    original = random_flux_transformer()
    tensors = {COMFY_PREFIX + k: v for k, v in transformer_to_bfl(original.state_dict()).items()}
    tensors |= {"first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
                "text_encoders.t5xxl.transformer.shared.weight": torch.zeros(4, 4)}
    save_file(tensors, tmp_path / "flux1-dev-checkpoint.safetensors")
    assert_same_weights(load_transformer(tmp_path / "flux1-dev-checkpoint.safetensors", torch.float32), original)


def test_conversion_agrees_with_diffusers_at_flux1_width():
    """diffusers' own converter of BFL files fixes FLUX.1's width (3072): it renames and cuts along the rows
    only, so tensors of FLUX.1-dev's row counts and one column check every name, cut and swap against it."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    shapes = flux1_file_shapes(double_blocks=1, single_blocks=1)
    generator = torch.Generator().manual_seed(4)
    bfl = {key: torch.randn(shape.shape[0], *([1] if shape.ndim > 1 else []), generator=generator)
           for key, shape in shapes.items()}
    ours = flux_bfl_to_diffusers(dict(bfl))
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert ours.keys() == theirs.keys()
    for key, tensor in ours.items():
        assert torch.equal(tensor, theirs[key]), key


def test_vae_from_ae_safetensors_is_the_original(tmp_path):
    original = random_vae()
    loaded = load_vae(save_bfl_file(original, tmp_path / "ae.safetensors"), torch.float32)
    flux_vae = json.loads(VAE_CONFIG.read_text())
    assert (loaded.config.scaling_factor, loaded.config.shift_factor) == (flux_vae["scaling_factor"],
                                                                          flux_vae["shift_factor"])
    assert list(loaded.config.block_out_channels) == [32, 64, 64, 64] and loaded.config.layers_per_block == 1
    assert_same_weights(loaded, original)
    images = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        latent = encode_images(original, images)
        torch.testing.assert_close(encode_images(loaded, images), latent, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(decode_latents(loaded, latent), decode_latents(original, latent),
                                   rtol=1e-5, atol=1e-5)
    original.save_pretrained(tmp_path / "vae")
    assert_same_weights(load_vae(tmp_path / "vae", torch.float32), original)


def _bad_file(kind, tmp_path):
    path = tmp_path / f"{kind}.safetensors"
    if kind == "lora":
        save_file({"double_blocks.0.processor.qkv_lora1.down.weight": torch.zeros(4, 256),
                   "double_blocks.0.processor.qkv_lora1.up.weight": torch.zeros(768, 4)}, path)
    elif kind == "sdxl":
        save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
                   "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
                   "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(768)}, path)
    elif kind == "random":
        save_file({"weight": torch.randn(3, 3)}, path)
    elif kind == "corrupt":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + bytes(64))
    elif kind == "folder":
        path = tmp_path / "transformer"
        path.mkdir()
    elif kind == "transformer":
        save_bfl_file(random_flux_transformer(), path)
    elif kind == "vae":
        save_bfl_file(random_vae(), path)
    elif kind == "sd_vae":  # Stable Diffusion's 4 latent channels
        save_bfl_file(random_vae(latent_channels=4), path)
    elif kind == "incomplete":
        tensors = transformer_to_bfl(random_flux_transformer().state_dict())
        del tensors["single_blocks.0.linear2.weight"]
        save_file(tensors, path)
    elif kind == "head_size":  # heads of 64 channels: not FLUX's rotary embedding
        tensors = transformer_to_bfl(random_flux_transformer().state_dict())
        tensors["double_blocks.0.img_attn.norm.query_norm.scale"] = torch.ones(64)
        save_file(tensors, path)
    return path


@pytest.mark.parametrize(("kind", "reason"), [
    ("missing", "does not exist"), ("lora", "looks like a LoRA"), ("sdxl", "is not a FLUX transformer"),
    ("random", "is not a FLUX transformer"), ("corrupt", "not a readable .safetensors"),
    ("folder", "has no config.json"), ("vae", "is not a FLUX transformer"),
    ("incomplete", "missing ['single_transformer_blocks.0.proj_out.weight']"), ("head_size", "heads of 64 channels"),
])
def test_a_file_that_is_no_flux_transformer_is_named(tmp_path, kind, reason):
    path = _bad_file(kind, tmp_path)
    with pytest.raises(UMOError) as error:
        load_transformer(path, torch.float32)
    assert str(path) in str(error.value) and reason in str(error.value)
    assert "flux1-dev.safetensors" in str(error.value)


@pytest.mark.parametrize(("kind", "reason"), [
    ("missing", "does not exist"), ("lora", "looks like a LoRA"), ("sdxl", "is not a FLUX autoencoder"),
    ("corrupt", "not a readable .safetensors"), ("transformer", "is not a FLUX autoencoder"),
    ("sd_vae", "4 latent channels"),
])
def test_a_file_that_is_no_flux_autoencoder_is_named(tmp_path, kind, reason):
    path = _bad_file(kind, tmp_path)
    with pytest.raises(UMOError) as error:
        load_vae(path, torch.float32)
    assert str(path) in str(error.value) and reason in str(error.value)
    assert "ae.safetensors" in str(error.value)
