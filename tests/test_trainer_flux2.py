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
from tests.tiny_models import FLUX2_DEV_TEXT_DIM, FLUX2_TEXT_DIM, add_lora, tiny_flux2_transformer, tiny_flux2_vae
from training.rerefl import main
from umo_core.backbones import get
from umo_core.backbones.lora_formats import load_lora_file, lora_family, merge_lora_weights

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
    """As the FLUX.1 test: LoRA transformer -> one-step clean estimate -> FLUX.2 VAE decoder (un-normalise,
    unpatchify, decode) -> face network -> MIMR; the decoded image is a real photo plus the decoder's output, so the
    reward depends on the LoRA only through the decoder and the face network."""
    from umo_core import identity_reward, load_face_model
    from umo_core.backbones.flow import clean_estimate
    from umo_core.backbones.flux2.lora import FLUX2_TARGET_MODULES
    from umo_core.backbones.text_embedding import TextEmbedding

    face_model = load_face_model(pack_dir, provider="cpu", backend="torch")
    identities = face_model.identities([photos / "Rob_Lowe_0001.jpg"])
    transformer = add_lora(tiny_flux2_transformer().requires_grad_(False), rank=4, alpha=4,
                           target_modules=FLUX2_TARGET_MODULES)
    vae = tiny_flux2_vae().requires_grad_(False)
    photo = Image.open(photos / "Rob_Lowe_0002.jpg").convert("RGB").resize((256, 256))
    photo = torch.tensor(list(photo.getdata()), dtype=torch.float32).reshape(1, 256, 256, 3) / 255

    generator = torch.Generator().manual_seed(0)
    text = TextEmbedding(torch.randn(1, 4, FLUX2_TEXT_DIM, generator=generator))
    latent = torch.randn(1, 128, 16, 16, generator=generator)
    references = [torch.randn(1, 128, 4, 4, generator=generator)]
    sigma = 0.3
    velocity = FLUX2.predict_velocity(transformer, latent, sigma, text, references, guidance=1.0)
    image = (photo + 0.05 * (FLUX2.decode_latents(vae, clean_estimate(latent, velocity, sigma)) - 0.5)).clamp(0, 1)
    reward = identity_reward(image, identities, face_model).values.sum()
    assert len(face_model.detect(image.detach())[0]) == 1
    reward.backward()
    lora_grads = [p.grad for n, p in transformer.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None and torch.isfinite(g).all() for g in lora_grads)
    assert sum(g.abs().sum() for g in lora_grads) > 0
    assert all(p.grad is None for n, p in transformer.named_parameters() if "lora" not in n)
    assert all(p.grad is None for p in vae.parameters())


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
