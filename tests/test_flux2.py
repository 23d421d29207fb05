"""FLUX.2 ([klein], [dev]) as a backbone: position ids, latents, schedule and whole samplings against diffusers'
Flux2KleinPipeline / Flux2Pipeline; single files against diffusers folders; the reference rule against the
pipelines' image processor; LoRA layouts against peft's merged model. Tiny random-weight models of the real classes.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.damaged_downloads import text_encoder_damages
from tests.flux2_layout import save_flux2_bfl_file, transformer_to_bfl
from tests.tiny_models import (
    FLUX2_DEV_TEXT_DIM,
    FLUX2_TEXT_DIM,
    add_lora,
    save_flux2_folder,
    tiny_flux2_transformer,
    tiny_flux2_vae,
    uno_lora,
)
from umo_core import UMOError
from umo_core.backbones import get
from umo_core.backbones.flow import sample
from umo_core.backbones.flux2 import loading, runtime
from umo_core.backbones.flux2.lora import FLUX2_DIFFUSERS_KEY, FLUX2_TARGET_MODULES, comfy_to_diffusers
from umo_core.backbones.flux2.references import resize_reference
from umo_core.backbones.lora_formats import (
    detect_lora_format,
    load_lora_file,
    lora_family,
    merge_lora_weights,
    save_lora_file,
)
from umo_core.backbones.text_embedding import TextEmbedding

FLUX2 = get("flux2")


@pytest.mark.parametrize(("target", "references"), [
    ((4, 6), []), ((4, 4), [(3, 5)]), ((2, 8), [(4, 4), (6, 2)]), ((5, 3), [(2, 2), (3, 4), (4, 3)]),
])
def test_position_ids_equal_the_pipelines(target, references):
    latents = [torch.zeros(1, 128, *hw) for hw in references]
    expected = Flux2KleinPipeline._prepare_latent_ids(torch.zeros(1, 128, *target))[0]
    if references:
        expected = torch.cat([expected, Flux2KleinPipeline._prepare_image_ids(latents)[0]])
        assert torch.equal(Flux2KleinPipeline._prepare_image_ids(latents), Flux2Pipeline._prepare_image_ids(latents))
    assert torch.equal(runtime.image_ids(target, references), expected)
    assert torch.equal(runtime.text_ids(7), Flux2KleinPipeline._prepare_text_ids(torch.zeros(1, 7, 3))[0])


def test_reference_k_sits_at_time_10_plus_10k():
    ids = runtime.image_ids((2, 2), [(1, 1), (1, 2), (2, 1)])
    assert ids[:4, 0].tolist() == [0] * 4 and ids[4:, 0].tolist() == [10, 20, 20, 30, 30]
    assert ids[:, 3].eq(0).all() and ids[4:, 1:3].tolist() == [[0, 0], [0, 0], [0, 1], [0, 0], [1, 0]]


def test_latents_equal_the_pipelines_encoding_and_decoding():
    vae = tiny_flux2_vae()
    images = torch.rand(2, 64, 48, 3, generator=torch.Generator().manual_seed(0))
    fake_pipeline = SimpleNamespace(vae=vae, _patchify_latents=Flux2KleinPipeline._patchify_latents)
    with torch.no_grad():
        latent = runtime.encode_images(vae, images)
        expected = Flux2KleinPipeline._encode_vae_image(fake_pipeline, images.movedim(-1, 1) * 2 - 1, None)
        assert latent.shape == (2, 128, 4, 3)
        torch.testing.assert_close(latent, expected)
        decoded = runtime.decode_latents(vae, latent)
        mean, std = vae.bn.running_mean.view(1, -1, 1, 1), torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + 1e-4)
        raw = Flux2KleinPipeline._unpatchify_latents(latent * std + mean)
        torch.testing.assert_close(decoded, ((vae.decode(raw).sample + 1) / 2).clamp(0, 1).movedim(1, -1))
    assert torch.equal(runtime.unpatchify(runtime.patchify(images.movedim(-1, 1))), images.movedim(-1, 1))


@pytest.mark.parametrize(("steps", "tokens"), [(4, 256), (28, 1024), (50, 4096), (8, 5000)])
def test_schedule_is_flux2s_empirical_shift(steps, tokens):
    sigmas = runtime.flux2_sigmas(steps, tokens)
    mu = compute_empirical_mu(tokens, steps)
    t = np.linspace(1.0, 1 / steps, steps)
    expected = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    assert len(sigmas) == steps + 1 and sigmas[-1] == 0
    np.testing.assert_allclose(sigmas[:-1].numpy(), expected, rtol=1e-6)


def _pipeline_photos() -> list[Image.Image]:
    generator = np.random.default_rng(0)
    return [Image.fromarray(generator.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((80, 100), (70, 64))]


@pytest.mark.parametrize("variant", ["distilled", "base", "dev"])
def test_sampling_equals_the_pipeline(variant):
    """The whole sampler (references resized, encoded and placed, schedule, velocity, Euler) against diffusers'
    pipeline from the same noise: klein distilled (no guidance), klein base (classifier-free guidance against the
    negative embedding) and dev (guidance embedded)."""
    dev = variant == "dev"
    transformer, vae = tiny_flux2_transformer(guidance=dev), tiny_flux2_vae()
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(json.loads(runtime.SCHEDULER_CONFIG.read_text()))
    generator = torch.Generator().manual_seed(1)
    text = TextEmbedding(torch.randn(1, 5, FLUX2_TEXT_DIM, generator=generator))
    noise = torch.randn(1, 128, 4, 3, generator=generator)
    photos = _pipeline_photos()
    steps, guidance = 3, 2.5
    negative = {}
    if dev:
        pipeline = Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                 transformer=transformer)
    else:
        pipeline = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                      transformer=transformer, is_distilled=variant == "distilled")
    if variant == "base":
        guidance = 4.0
        text.negative_prompt_embeds = torch.randn(1, 7, FLUX2_TEXT_DIM, generator=generator)
        negative = {"negative_prompt_embeds": text.negative_prompt_embeds}
    expected = pipeline(image=photos, prompt_embeds=text.prompt_embeds, latents=noise, height=64, width=48,
                        num_inference_steps=steps, guidance_scale=guidance, output_type="latent", **negative).images
    with torch.no_grad():
        references = [FLUX2.encode_images(vae, FLUX2.resize_reference(np.asarray(p), 2)[None]) for p in photos]
    latent = sample(FLUX2, transformer, noise, text, references, steps, guidance)
    if dev:  # Flux2Pipeline returns the packed tokens of the normalised latent
        torch.testing.assert_close(runtime.pack_latents(latent), expected, rtol=1e-4, atol=1e-5)
    else:  # Flux2KleinPipeline the autoencoder's latent
        mean, std = vae.bn.running_mean.view(1, -1, 1, 1), torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + 1e-4)
        torch.testing.assert_close(runtime.unpatchify(latent * std + mean), expected, rtol=1e-4, atol=1e-5)
    if variant == "base":  # the guidance made a difference
        unguided = sample(FLUX2, transformer, noise, TextEmbedding(text.prompt_embeds), references, steps, guidance)
        assert not torch.allclose(latent, unguided, rtol=1e-3, atol=1e-3)


def test_reference_rule_equals_the_pipelines_image_processor():
    big = np.asarray(Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 60, 3), dtype=np.uint8))
                     .resize((1310, 900), Image.BILINEAR))  # 1.18 megapixels: scaled down, then cropped
    for array in (big, np.asarray(_pipeline_photos()[0])):
        image = Image.fromarray(array)
        processor = Flux2ImageProcessor(vae_scale_factor=16)
        if image.width * image.height > 1024 * 1024:
            image = processor._resize_to_target_area(image, 1024 * 1024)
        width, height = image.width // 16 * 16, image.height // 16 * 16
        expected = processor.preprocess(image, height=height, width=width, resize_mode="crop")[0]
        resized = resize_reference(array)
        assert resized.shape[:2] == (height, width) == FLUX2.reference_shape(*array.shape[:2], 1)
        torch.testing.assert_close(resized.movedim(-1, 0) * 2 - 1, expected)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_single_files_load_like_the_folders(tmp_path, prefix):
    folder = save_flux2_folder(tmp_path / "flux2", guidance=True)
    transformer_file = save_flux2_bfl_file(tiny_flux2_transformer(guidance=True), tmp_path / "flux-2-dev.safetensors",
                                           prefix)
    vae_file = save_flux2_bfl_file(tiny_flux2_vae(), tmp_path / "flux2-vae.safetensors")
    from_folder = FLUX2.load_transformer(folder / "transformer", torch.float32)
    from_file = FLUX2.load_transformer(transformer_file, torch.float32)
    assert from_file.config.num_attention_heads == 2 and from_file.config.guidance_embeds
    for name in ("num_layers", "num_single_layers", "joint_attention_dim", "mlp_ratio", "in_channels"):
        assert from_file.config[name] == from_folder.config[name], name
    assert list(from_file.config.axes_dims_rope) == list(from_folder.config.axes_dims_rope)
    for key, value in from_folder.state_dict().items():
        assert torch.equal(from_file.state_dict()[key], value), key
    vae_from_file = FLUX2.load_vae(vae_file, torch.float32)
    for key, value in FLUX2.load_vae(folder / "vae", torch.float32).state_dict().items():
        assert torch.equal(vae_from_file.state_dict()[key].to(value.dtype), value), key
    assert FLUX2.transformer_text_widths(transformer_file) == (FLUX2_TEXT_DIM,)
    assert FLUX2.transformer_text_widths(folder / "transformer") == (FLUX2_TEXT_DIM,)
    assert loading.transformer_variant(transformer_file) is loading.DEV


def test_the_shipped_configs_are_the_real_architectures():
    sizes = {}
    for name, path in loading.TRANSFORMER_CONFIGS.items():
        with torch.device("meta"):
            from diffusers import Flux2Transformer2DModel

            model = Flux2Transformer2DModel.from_config(json.loads(path.read_text()))
        sizes[name] = sum(p.numel() for p in model.parameters()) / 1e9
    assert 3.5 < sizes["klein-4b"] < 4.5 and 8.5 < sizes["klein-9b"] < 9.5 and 31 < sizes["dev"] < 33, sizes


def test_variants_from_a_download_or_a_file_name(tmp_path):
    folder = save_flux2_folder(tmp_path / "klein")
    (tmp_path / "klein" / "model_index.json").write_text(json.dumps({"is_distilled": True}))
    assert loading.transformer_variant(folder / "transformer") is loading.DISTILLED
    (tmp_path / "klein" / "model_index.json").write_text(json.dumps({"is_distilled": False}))
    assert loading.transformer_variant(folder / "transformer") is loading.BASE
    model = tiny_flux2_transformer()
    base = save_flux2_bfl_file(model, tmp_path / "flux-2-klein-base-4b.safetensors")
    distilled = save_flux2_bfl_file(model, tmp_path / "flux-2-klein-4b.safetensors")
    assert FLUX2.sampling_defaults(base) == (50, 4.0) and FLUX2.sampling_defaults(distilled) == (4, 1.0)


@pytest.mark.parametrize(("content", "message"), [("{not json", "is not readable JSON"),
                                                  ("[]", "is not a JSON object")])
def test_a_damaged_model_index_is_named(tmp_path, content, message):
    folder = save_flux2_folder(tmp_path / "klein")
    (tmp_path / "klein" / "model_index.json").write_text(content)
    with pytest.raises(UMOError, match=f"'.*model_index.json' .beside the FLUX.2 transformer folder. {message}"):
        FLUX2.sampling_defaults(folder / "transformer")


def test_wrong_files_are_named(tmp_path):
    flux1_vae = tmp_path / "ae.safetensors"
    from tests.flux_layout import save_bfl_file
    from tests.tiny_models import tiny_vae

    save_bfl_file(tiny_vae(), flux1_vae)
    with pytest.raises(UMOError, match="ae.safetensors.*FLUX.2 autoencoder"):
        FLUX2.check_vae(flux1_vae)
    with pytest.raises(UMOError, match="'.*absent.safetensors' does not exist.*flux-2-klein-4b"):
        FLUX2.load_transformer(tmp_path / "absent.safetensors")


def _lora_model():
    """A FLUX.2 peft LoRA as the trainer has it: alpha = rank, so B @ A is the delta."""
    return add_lora(tiny_flux2_transformer(), rank=2, alpha=2, target_modules=FLUX2_TARGET_MODULES, lora_b_std=0.5)


def test_every_flux2_linear_is_a_flux2_peft_key():
    model = tiny_flux2_transformer(guidance=True)
    linears = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    assert all(FLUX2_DIFFUSERS_KEY.match(f"{name}.lora_A.weight") for name in linears)
    add_lora(model, 2, 2, target_modules=linears)
    assert detect_lora_format(get_peft_model_state_dict(model)) == "flux2_diffusers_peft"


def test_comfy_file_changes_the_weights_as_peft_merges_them(tmp_path):
    """The ComfyUI-layout file applied to the Black Forest Labs weights (what ComfyUI's loader does with
    `diffusion_model.<module>` keys), converted by diffusers' own converter, equals peft's merged model."""
    model = _lora_model()
    base = {k: v.clone() for k, v in tiny_flux2_transformer().state_dict().items()}
    files = FLUX2.lora_files(get_peft_model_state_dict(model))
    tensors, metadata = files["lora_comfy.safetensors"]
    save_lora_file(tmp_path / "lora_comfy.safetensors", tensors, metadata)
    comfy, metadata = load_lora_file(tmp_path / "lora_comfy.safetensors")
    assert lora_family(comfy, metadata) == "flux2" and all(k.startswith("diffusion_model.") for k in comfy)
    bfl = transformer_to_bfl(base)
    for key in [k for k in comfy if k.endswith(".lora_down.weight")]:
        module = key.removeprefix("diffusion_model.").removesuffix(".lora_down.weight")
        bfl[f"{module}.weight"] = bfl[f"{module}.weight"] + comfy[key.replace("lora_down", "lora_up")] @ comfy[key]
    patched = convert_flux2_transformer_checkpoint_to_diffusers(bfl)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()  # peft's own merge: W += B @ A * alpha / r
    merged = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    changed = 0
    for key, value in merged.items():
        torch.testing.assert_close(patched[key], value, rtol=1e-5, atol=1e-5)
        changed += not torch.equal(value, base[key])
    assert changed == 4 * 2 + 2  # q, k, v and out of both streams; the single block's two projections


def test_peft_and_comfy_files_load_back_to_the_same_deltas(tmp_path):
    model = _lora_model()
    peft_state = get_peft_model_state_dict(model)
    for name, (tensors, metadata) in FLUX2.lora_files(peft_state).items():
        save_lora_file(tmp_path / name, tensors, metadata)
    base = tiny_flux2_transformer()
    results = []
    for name in ("lora_diffusers.safetensors", "lora_comfy.safetensors"):
        weights = tiny_flux2_transformer()
        assert merge_lora_weights(weights, FLUX2.load_lora(tmp_path / name)) > 0
        results.append(weights.state_dict())
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-5, atol=1e-6)
    deltas = [k for k in results[0] if not torch.equal(results[0][k], base.state_dict()[k])]
    assert len(deltas) == 10
    round_trip = comfy_to_diffusers(FLUX2.lora_files(peft_state)["lora_comfy.safetensors"][0])
    assert set(round_trip) == set(peft_state)


def test_a_lora_of_one_backbone_is_refused_by_the_other(tmp_path):
    model = _lora_model()
    for name, (tensors, metadata) in FLUX2.lora_files(get_peft_model_state_dict(model)).items():
        save_lora_file(tmp_path / name, tensors, metadata)
        with pytest.raises(UMOError, match=r"LoRA '.*' is a \w+ LoRA \(for a FLUX.2 model \(klein or dev\)\); "
                                           "FLUX.1 takes UNO or diffusers FLUX.1 LoRAs"):
            get("flux1").load_lora(tmp_path / name)
    save_file(uno_lora(), tmp_path / "UMO_UNO.safetensors")
    with pytest.raises(UMOError, match=r"is a uno LoRA \(for a FLUX.1 model \(flux1-dev\)\); FLUX.2 takes"):
        FLUX2.load_lora(tmp_path / "UMO_UNO.safetensors")


@pytest.fixture(scope="module")
def text_folders(tmp_path_factory):
    """Tiny diffusers FLUX.2 folders' text encoders: [klein]'s Qwen3, [dev]'s Mistral-3 (with its Pixtral processor)."""
    from tests.tiny_models import save_mistral3_text_encoder, save_qwen3_text_encoder

    folders = {"klein": tmp_path_factory.mktemp("klein"), "dev": tmp_path_factory.mktemp("dev")}
    save_qwen3_text_encoder(folders["klein"])
    save_mistral3_text_encoder(folders["dev"])
    return folders


PROMPTS = ["two people at a cafe", "Zoé and Bob, smiling at the camera"]
# dev's pipeline takes '[IMG]' out of a prompt; a prompt of more than 512 tokens is cut.
DEV_PROMPTS = [*PROMPTS, "a [IMG] photo of " + "two people " * 60]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_klein_prompts_equal_the_pipelines_encode_prompt(text_folders, dtype):
    encoders = FLUX2.load_text_encoders(text_folders["klein"], dtype, "cpu")
    pipeline = Flux2KleinPipeline(scheduler=None, vae=None, text_encoder=encoders.model, tokenizer=encoders.tokenizer,
                                  transformer=None)
    with torch.no_grad():
        expected, _ = pipeline.encode_prompt(PROMPTS, device=torch.device("cpu"))
        expected_negative, _ = pipeline.encode_prompt("", device=torch.device("cpu"))  # the pipeline's negative
    text = FLUX2.encode_prompts(encoders, PROMPTS)
    assert text.prompt_embeds.shape == (2, 512, FLUX2_TEXT_DIM) and text.pooled_prompt_embeds is None
    assert text.prompt_embeds.dtype == dtype and torch.equal(text.prompt_embeds, expected)
    assert text.made_with == "FLUX.2 [klein]'s Qwen3"
    assert text.negative_prompt_embeds.dtype == dtype
    assert torch.equal(text.negative_prompt_embeds, expected_negative.expand(2, -1, -1))
    assert not torch.equal(text.negative_prompt_embeds, text.prompt_embeds)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dev_prompts_equal_the_pipelines_encode_prompt(text_folders, dtype):
    """Flux2Pipeline with the Mistral3ForConditionalGeneration and Pixtral processor of the folder, loaded by
    transformers itself: its system message, chat template, 512 tokens and layers 10, 20, 30."""
    from transformers import AutoProcessor, Mistral3ForConditionalGeneration

    folder = text_folders["dev"]
    pipeline = Flux2Pipeline(scheduler=None, vae=None, transformer=None,
                             text_encoder=Mistral3ForConditionalGeneration.from_pretrained(folder / "text_encoder",
                                                                                           dtype=dtype),
                             tokenizer=AutoProcessor.from_pretrained(folder / "tokenizer"))
    with torch.no_grad():
        expected, _ = pipeline.encode_prompt(DEV_PROMPTS, device=torch.device("cpu"))
    encoders = FLUX2.load_text_encoders(folder, dtype, "cpu")
    text = FLUX2.encode_prompts(encoders, DEV_PROMPTS)
    assert text.prompt_embeds.shape == (3, 512, FLUX2_DEV_TEXT_DIM) and text.pooled_prompt_embeds is None
    assert text.prompt_embeds.dtype == dtype and torch.equal(text.prompt_embeds, expected)
    assert text.made_with == "FLUX.2 [dev]'s Mistral-3" and text.negative_prompt_embeds is None
    assert not torch.equal(text.prompt_embeds[0], text.prompt_embeds[1])


@pytest.mark.parametrize(("variant", "width", "made_with"), [
    ("klein", FLUX2_TEXT_DIM, "FLUX.2 [klein]'s Qwen3"), ("dev", FLUX2_DEV_TEXT_DIM, "FLUX.2 [dev]'s Mistral-3")])
def test_encode_prompts_command_marks_flux2_files(text_folders, tmp_path, capsys, variant, width, made_with):
    from training.encode_prompts import main as encode_main
    from umo_core.backbones.text_embedding import (
        text_embedding_backbone,
        text_embedding_made_with,
        text_embedding_shapes,
    )

    (tmp_path / "manifest.jsonl").write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n")
    assert encode_main(["--data", str(tmp_path), "--text-encoders", str(text_folders[variant]), "--backbone", "flux2",
                        "--device", "cpu"]) == 0
    path = tmp_path / json.loads((tmp_path / "manifest.jsonl").read_text())["text_embedding"]
    assert text_embedding_backbone(path) == "flux2" and text_embedding_made_with(path) == made_with
    assert text_embedding_shapes(path) == ([512, width], [])
    tensors = load_file(path)
    assert ("negative_prompt_embeds" in tensors) == (variant == "klein")
    if variant == "klein":  # a file made before klein's files held the negative is encoded again; a full one is kept
        save_file({"prompt_embeds": tensors["prompt_embeds"]}, path, metadata=safe_open(path, "pt").metadata())
        assert encode_main(["--data", str(tmp_path), "--text-encoders", str(text_folders[variant]), "--backbone",
                            "flux2", "--device", "cpu"]) == 0
        assert all(torch.equal(load_file(path)[key], tensors[key]) for key in tensors)
        assert capsys.readouterr().out.startswith("1 prompt(s) encoded")
        assert encode_main(["--data", str(tmp_path), "--text-encoders", str(text_folders[variant]), "--backbone",
                            "flux2", "--device", "cpu"]) == 0
        assert capsys.readouterr().out.startswith("0 prompt(s) encoded")


def test_a_text_encoder_flux2_does_not_have_is_named(tmp_path):
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "text_encoder" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(UMOError, match="holds a t5 text encoder; FLUX.2 takes .klein.'s Qwen3 or .dev.'s Mistral-3"):
        FLUX2.load_text_encoders(tmp_path, torch.float32, "cpu")


@pytest.mark.parametrize("variant", ["klein", "dev"])
@pytest.mark.parametrize(("damage", "message"), [
    *text_encoder_damages("text_encoder/config.json", "tokenizer/tokenizer_config.json", "text_encoder",
                          "text_encoder", "tokenizer"),
    (lambda folder: (folder / "tokenizer" / "tokenizer_config.json").unlink(),
     "is not a diffusers FLUX.2 folder, it lacks tokenizer/tokenizer_config.json"),
])
def test_damaged_flux2_text_encoders_are_one_error_line(text_folders, tmp_path, capsys, variant, damage, message):
    import shutil

    from training.encode_prompts import main as encode_main

    encoders = tmp_path / variant
    shutil.copytree(text_folders[variant], encoders)
    damage(encoders)
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.jsonl").write_text(json.dumps({"prompt": "two people"}) + "\n")
    before = (data / "manifest.jsonl").read_bytes()
    assert encode_main(["--data", str(data), "--text-encoders", str(encoders), "--backbone", "flux2",
                        "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert len(error.splitlines()) == 1 and error.startswith(f"error: text encoders: '{encoders}"), error
    assert message in error, error
    assert (data / "manifest.jsonl").read_bytes() == before and not (data / "text").exists()
