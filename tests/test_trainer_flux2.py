"""The ReReFL trainer with --backbone flux2 on tiny random-weight FLUX.2 models of diffusers' real classes (CPU):
the same step, data, checkpoints and LoRA files as FLUX.1 (tests/test_trainer.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.conftest import trainer_args
from tests.reward_path import check_reward_gradient_reaches_only_the_lora
from tests.tiny_models import FLUX2_DEV_TEXT_DIM, FLUX2_TEXT_DIM, add_lora, tiny_flux2_transformer, tiny_flux2_vae
from training.rerefl import main
from umo_core.backbones import get
from umo_core.backbones.lora_formats import load_lora_file, lora_family, merge_lora_weights
from umo_core.backbones.text_embedding import embedding_file_metadata

FLUX2 = get("flux2")


def flux2_args(root, data, pack, output, steps, *extra):
    return trainer_args(root, data, pack, output, steps, "--backbone", "flux2", *extra)


def test_flux2_training_steps_change_only_the_lora(flux2_trainer_inputs, tmp_path):
    root, data, pack = flux2_trainer_inputs
    assert main(flux2_args(root, data, pack, tmp_path / "run", 2, "--gradient-checkpointing", "--eval-every", "2",
                           "--eval-count", "1")) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    evaluations = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evaluations] == [0, 2]  # the untrained start and the end
    assert (tmp_path / "run" / "eval" / "step_000002" / "row_0001.png").is_file()
    assert all(torch.isfinite(torch.tensor([r["loss"], r["diffusion_loss"], r["reward"]])).all() for r in log)
    trained = load_file(tmp_path / "run" / "lora_diffusers.safetensors")
    assert trained and all(".lora_A." in k or ".lora_B." in k for k in trained)
    assert any(k.startswith("single_transformer_blocks.0.attn.to_qkv_mlp_proj") for k in trained)
    assert any(v.abs().sum() > 0 for k, v in trained.items() if ".lora_B." in k)  # peft starts lora_B at zero
    comfy, metadata = load_lora_file(tmp_path / "run" / "lora_comfy.safetensors")
    assert lora_family(comfy, metadata) == "flux2" and all(k.startswith("diffusion_model.") for k in comfy)
    # Both files change the weights alike, and only the adapted layers.
    base = tiny_flux2_transformer().state_dict()
    merged = []
    for name in ("lora_diffusers.safetensors", "lora_comfy.safetensors"):
        model = tiny_flux2_transformer()
        merge_lora_weights(model, FLUX2.load_lora(tmp_path / "run" / name))
        merged.append(model.state_dict())
    changed = {k for k in base if not torch.equal(merged[0][k], base[k])}
    assert changed and all(".attn." in k for k in changed)
    for key in base:
        torch.testing.assert_close(merged[0][key], merged[1][key], rtol=1e-5, atol=1e-6)


def test_flux2_resume_gives_the_same_weights_as_an_uninterrupted_run(flux2_trainer_inputs, tmp_path):
    root, data, pack = flux2_trainer_inputs
    assert main(flux2_args(root, data, pack, tmp_path / "straight", 4)) == 0
    assert main(flux2_args(root, data, pack, tmp_path / "resumed", 2)) == 0
    assert main(flux2_args(root, data, pack, tmp_path / "resumed", 4, "--resume")) == 0
    straight = load_file(tmp_path / "straight" / "lora_diffusers.safetensors")
    resumed = load_file(tmp_path / "resumed" / "lora_diffusers.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_a_flux1_text_embedding_is_refused_in_one_line(trainer_inputs, flux2_trainer_inputs, tmp_path, capsys):
    root, _, pack = flux2_trainer_inputs
    _, flux1_data, _ = trainer_inputs
    assert main(flux2_args(root, flux1_data, pack, tmp_path / "out", 1)) == 2
    error = capsys.readouterr().err
    assert "text embedding 'text/0.safetensors' was made for flux1, the model is flux2 (--backbone)" in error
    assert not (tmp_path / "out" / "log.jsonl").exists()


@pytest.mark.parametrize("made_for", ["klein", "dev"])
def test_klein_and_dev_text_embeddings_are_not_taken_for_each_other(flux2_trainer_inputs, tmp_path, capsys,
                                                                    made_for):
    """klein's embeddings (Qwen3, FLUX2_TEXT_DIM wide) for a dev transformer (guidance embedded, taking
    FLUX2_DEV_TEXT_DIM), and the reverse: the width tells, the file's record names the encoder."""
    from umo_core.backbones.flux2.text_encoders import MISTRAL3, QWEN3
    from umo_core.backbones.text_embedding import embedding_file_metadata

    root, klein_data, pack = flux2_trainer_inputs
    models = tmp_path / "models"
    shutil.copytree(root / "vae", models / "vae")
    encoder, width, transformer_width = ((QWEN3, FLUX2_TEXT_DIM, FLUX2_DEV_TEXT_DIM) if made_for == "klein"
                                         else (MISTRAL3, FLUX2_DEV_TEXT_DIM, FLUX2_TEXT_DIM))
    tiny_flux2_transformer(guidance=made_for == "klein", text_dim=transformer_width).save_pretrained(
        models / "transformer")
    data = shutil.copytree(klein_data, tmp_path / "data")
    save_file({"prompt_embeds": torch.randn(4, width)}, data / "text" / "0.safetensors",
              metadata=embedding_file_metadata("flux2", encoder.made_with))
    assert main(flux2_args(models, data, pack, tmp_path / "out", 1)) == 2
    error = capsys.readouterr().err
    assert (f"text embedding 'text/0.safetensors' has prompt_embeds of width {width}, made with {encoder.made_with}; "
            f"the transformer takes {transformer_width} (another model's text encoder)") in error, error
    assert "Traceback" not in error and not (tmp_path / "out" / "log.jsonl").exists()


def test_reward_gradient_reaches_the_lora_through_the_flux2_decoder(assets, photos, pack_dir):
    """As the FLUX.1 test, through FLUX.2's VAE decoder (un-normalise, unpatchify, decode): tests/reward_path.py."""
    from umo_core.backbones.flux2.lora import FLUX2_TARGET_MODULES
    from umo_core.backbones.text_embedding import TextEmbedding

    transformer = add_lora(tiny_flux2_transformer().requires_grad_(False), rank=4, alpha=4,
                           target_modules=FLUX2_TARGET_MODULES)
    generator = torch.Generator().manual_seed(0)
    text = TextEmbedding(torch.randn(1, 4, FLUX2_TEXT_DIM, generator=generator))
    latent = torch.randn(1, 128, 16, 16, generator=generator)
    references = [torch.randn(1, 128, 4, 4, generator=generator)]
    check_reward_gradient_reaches_only_the_lora(FLUX2, transformer, tiny_flux2_vae().requires_grad_(False), photos,
                                                pack_dir, text, latent, references)


def test_generate_command_with_flux2(flux2_trainer_inputs, trainer_inputs, photos, tmp_path, capsys):
    """`generate --backbone flux2`: the seed decides the image, a trained FLUX.2 LoRA changes it, a FLUX.1 text
    embedding is refused before any model loads."""
    from peft.utils import get_peft_model_state_dict

    from umo_core.backbones.flux2.lora import FLUX2_TARGET_MODULES
    from umo_core.backbones.lora_formats import save_lora_file
    from umo_core.cli import main as umo_main

    root, data, _ = flux2_trainer_inputs
    adapted = add_lora(tiny_flux2_transformer(), rank=2, alpha=2, target_modules=FLUX2_TARGET_MODULES,
                       lora_b_std=0.5)
    tensors, metadata = FLUX2.lora_files(get_peft_model_state_dict(adapted))["lora_comfy.safetensors"]
    save_lora_file(tmp_path / "lora_comfy.safetensors", tensors, metadata)

    def generate(out, text=data / "text" / "0.safetensors", *extra):
        args = ["generate", "--backbone", "flux2", "--transformer", str(root / "transformer"), "--vae",
                str(root / "vae"), "--text-embedding", str(text), "--ref", str(photos / "Rob_Lowe_0001.jpg"),
                "--ref", str(photos / "Nathalie_Baye_0002.jpg"), "--size", "64", "--steps", "2", "--seed", "3",
                "--out", str(tmp_path / out), "--device", "cpu", *extra]
        return umo_main(args)

    assert generate("a") == 0 and generate("b") == 0
    assert generate("lora", data / "text" / "0.safetensors", "--lora", str(tmp_path / "lora_comfy.safetensors")) == 0
    images = {name: torch.tensor(list(Image.open(tmp_path / name / "umo_000003.png").getdata()))
              for name in ("a", "b", "lora")}
    assert torch.equal(images["a"], images["b"]) and not torch.equal(images["a"], images["lora"])
    capsys.readouterr()
    assert generate("c", trainer_inputs[1] / "text" / "0.safetensors") == 2
    assert "was made for flux1, the model is flux2 (--backbone)" in capsys.readouterr().err
    # klein base (the tiny folder: no model_index.json) at guidance 4 needs the empty prompt's embedding
    unguided = tmp_path / "no_negative.safetensors"
    save_file({"prompt_embeds": load_file(data / "text" / "0.safetensors")["prompt_embeds"]}, unguided,
              metadata=embedding_file_metadata("flux2"))
    assert generate("d", unguided) == 2 and not (tmp_path / "d").exists()
    assert capsys.readouterr().err == (
        f"error: --text-embedding '{unguided}' lacks negative_prompt_embeds (the empty prompt's embedding), which "
        "FLUX.2 [klein] base is sampled with when guidance is above 1 (classifier-free guidance); make it again with "
        "python -m training.encode_prompts --backbone flux2 (it encodes the files that lack it), or give --prompt "
        "and --text-encoders, or --guidance 1\n")
    assert generate("e", unguided, "--guidance", "1") == 0 and generate("f", data / "text" / "0.safetensors",
                                                                        "--guidance", "1") == 0
    # without guidance the negative is unused; with it (the default 4) it changes the image
    images = {name: torch.tensor(list(Image.open(tmp_path / name / "umo_000003.png").getdata())) for name in "aef"}
    assert torch.equal(images["e"], images["f"]) and not torch.equal(images["a"], images["e"])


def test_klein_base_evaluation_without_the_negative_embedding_is_one_error_line(flux2_trainer_inputs, tmp_path,
                                                                                 capsys):
    root, data, pack = flux2_trainer_inputs
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    text = copy / "text" / "0.safetensors"
    save_file({"prompt_embeds": load_file(text)["prompt_embeds"]}, text, metadata=embedding_file_metadata("flux2"))
    assert main(flux2_args(root, copy, pack, tmp_path / "run", 2, "--eval-every", "2")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: evaluation text embedding '{text}' lacks negative_prompt_embeds") and (
        "run python -m training.encode_prompts --backbone flux2 on the data folder again" in err)
    assert err.count("\n") == 1 and not (tmp_path / "run" / "lora_comfy.safetensors").exists()
    assert main(flux2_args(root, copy, pack, tmp_path / "run1", 2, "--eval-every", "2", "--eval-guidance", "1")) == 0


@pytest.mark.parametrize(("variant", "extra", "expected"), [
    ("distilled", [], (4, 4, 1.0)),  # the window cut to the steps
    ("base", [], (50, 10, 4.0)),
    ("dev", [], (50, 10, 4.0)),
    ("distilled", ["--sampling-steps", "8", "--window", "3", "--eval-guidance", "2"], (8, 3, 2.0)),
    ("base", ["--sampling-steps", "6"], (6, 6, 4.0)),
    ("flux1", [], (25, 10, 4.0)),
])
def test_the_variant_decides_the_sampling_defaults(tmp_path, variant, extra, expected):
    """--sampling-steps, --window and --eval-guidance default to the pipelines' for the transformer's variant (read
    from the download's model_index.json, a single file's name, the guidance embedding); given flags override."""
    from tests.flux2_layout import save_flux2_bfl_file
    from tests.tiny_models import save_flux_folder
    from training.config import parse_config

    if variant == "flux1":
        transformer, backbone = save_flux_folder(tmp_path) / "transformer", "flux1"
    elif variant == "dev":
        transformer, backbone = tmp_path / "flux-2-dev.safetensors", "flux2"
        save_flux2_bfl_file(tiny_flux2_transformer(guidance=True), transformer)
    else:
        tiny_flux2_transformer().save_pretrained(tmp_path / "transformer")
        (tmp_path / "model_index.json").write_text(json.dumps({"is_distilled": variant == "distilled"}))
        transformer, backbone = tmp_path / "transformer", "flux2"
    config = parse_config(["--data", str(tmp_path), "--backbone", backbone, "--transformer", str(transformer),
                           "--vae", str(tmp_path), "--output", str(tmp_path / "out"), *extra])
    assert (config.step.sampling_steps, config.step.window, config.eval_guidance) == expected


def test_a_window_beyond_the_variants_steps_is_refused(tmp_path, capsys):
    from tests.flux2_layout import save_flux2_bfl_file

    transformer = save_flux2_bfl_file(tiny_flux2_transformer(), tmp_path / "flux-2-klein-4b.safetensors")
    assert main(["--data", str(tmp_path), "--backbone", "flux2", "--transformer", str(transformer), "--vae",
                 str(tmp_path), "--output", str(tmp_path / "out"), "--window", "10"]) == 2
    assert capsys.readouterr().err == "error: --window 10 must be between 1 and --sampling-steps (4)\n"


def test_help_tells_the_variants_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "25 for FLUX.1/UNO; FLUX.2 4 for distilled klein, 50 for klein base and dev" in help_text
    assert "(default 10, or --sampling-steps where fewer)" in help_text


def test_int8_base_trains_only_the_fp32_lora(flux2_trainer_inputs, tmp_path):
    """--base-dtype int8: every Linear weight of the frozen base in torchao's int8, the LoRA on top in fp32 and the
    only thing with gradients; a step changes the LoRA and leaves the int8 base as it was; the run writes fp32
    LoRA files."""
    pytest.importorskip("torchao", reason="--base-dtype int8 needs the int8 extra: pip install '.[int8]'")
    from torchao.quantization import Int8Tensor

    from training.config import parse_config
    from training.rerefl import load_models, lora_adapter
    from umo_core.backbones.text_embedding import TextEmbedding

    root, data, pack = flux2_trainer_inputs
    config = parse_config(flux2_args(root, data, pack, tmp_path / "run", 2, "--base-dtype", "int8"))
    transformer, _, lora = load_models(config, lora_adapter(4, FLUX2.lora_target_modules), None, torch.device("cpu"))
    base = {name: p for name, p in transformer.named_parameters() if "lora_" not in name}
    linear_weights = [f"{name}.weight" for name, module in transformer.named_modules()
                      if isinstance(module, torch.nn.Linear) and "lora_" not in name]  # with the LoRA's base_layer
    assert any(".base_layer." in name for name in linear_weights)
    assert all(isinstance(base[name], Int8Tensor) for name in linear_weights)
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert {id(p) for p in transformer.parameters() if p.requires_grad} == {id(p) for p in lora}
    int8_before = {name: base[name].qdata.clone() for name in linear_weights}

    generator = torch.Generator().manual_seed(0)
    text = TextEmbedding(torch.randn(1, 4, FLUX2_TEXT_DIM, generator=generator))
    latent = torch.randn(1, 128, 4, 4, generator=generator)
    references = [torch.randn(1, 128, 2, 2, generator=generator)]
    lora_before = [p.detach().clone() for p in lora]
    FLUX2.predict_velocity(transformer, latent, 0.5, text, references, 1.0).square().mean().backward()
    assert all(p.grad is None for p in base.values()) and all(p.grad is not None for p in lora)
    torch.optim.AdamW(lora, lr=1e-2).step()
    assert any(not torch.equal(p, before) for p, before in zip(lora, lora_before))
    assert all(p.dtype == torch.float32 for p in lora)
    assert all(torch.equal(base[name].qdata, before) for name, before in int8_before.items())

    assert main(flux2_args(root, data, pack, tmp_path / "run", 2, "--base-dtype", "int8")) == 0
    trained = load_file(tmp_path / "run" / "lora_diffusers.safetensors")
    assert trained and all(t.dtype == torch.float32 for t in trained.values())
    assert any(t.abs().sum() > 0 for k, t in trained.items() if ".lora_B." in k)


def test_int8_base_without_torchao_is_one_error_line(flux2_trainer_inputs, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # as if torchao were not installed
    root, data, pack = flux2_trainer_inputs
    assert main(flux2_args(root, data, pack, tmp_path / "run", 1, "--base-dtype", "int8")) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --base-dtype int8 needs torchao, which is not installed: pip install "
                            "\"umo-identity[int8]\"") and len(error.splitlines()) == 1, error
    assert not (tmp_path / "run").exists()
