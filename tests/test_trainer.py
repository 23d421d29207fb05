"""The ReReFL trainer on tiny random-weight FLUX and VAE models of the real architectures (CPU)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.conftest import trainer_args, usual_mode
from tests.reward_path import check_reward_gradient_reaches_only_the_lora
from tests.tiny_models import POOLED_DIM, TEXT_DIM, TEXT_LEN, add_lora, tiny_flux_transformer, tiny_vae
from training.rerefl import main
from umo_core import backbones
from umo_core.files import LOCK_NAME


def test_training_steps_change_only_the_lora(trainer_inputs, tmp_path):
    root, data, pack = trainer_inputs
    assert main(trainer_args(root, data, pack, tmp_path / "run", 2)) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["diffusion_loss"], r["reward"]])).all() for r in log)
    assert all({"id_sim", "id_sim_matched", "id_conf", "bld", "sim_gt", "cp"} <= r.keys() for r in log)
    # Whether the people stay in the picture, next to MIMR: the batch means of coverage, duplicates and faces.
    assert all({"mimr", "coverage", "duplicates", "faces"} <= r.keys() and 0 <= r["coverage"] <= 1 for r in log)
    assert not any("missing" in r for r in log)  # a list per image: not averaged
    assert not any("gt_id_loss" in r or "contrastive_loss" in r for r in log)  # WithAnyone terms are off
    trained = load_file(tmp_path / "run" / "lora_diffusers.safetensors")
    assert trained and all(".lora_A." in k or ".lora_B." in k for k in trained)
    assert any(k.startswith("single_transformer_blocks.0.proj_out") for k in trained)
    # lora_B starts at zero in peft; after two steps it moved.
    assert any(v.abs().sum() > 0 for k, v in trained.items() if ".lora_B." in k)
    uno = load_file(tmp_path / "run" / "lora_uno.safetensors")
    from umo_core.backbones.lora_formats import detect_lora_format

    assert detect_lora_format(uno) == "uno"
    config = json.loads((tmp_path / "run" / "training_config.json").read_text())  # the run's TrainConfig
    assert config["rank"] == 4 and config["step"]["window"] == 2 and config["data"] == str(data)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(trainer_inputs, tmp_path):
    root, data, pack = trainer_inputs
    assert main(trainer_args(root, data, pack, tmp_path / "straight", 4)) == 0
    assert main(trainer_args(root, data, pack, tmp_path / "resumed", 2)) == 0  # stops after step 2 with a checkpoint
    with (tmp_path / "resumed" / "log.jsonl").open("a") as log:  # a step logged after the checkpoint
        log.write(json.dumps({"step": 3, "loss": 0.0}) + "\n")
    assert main(trainer_args(root, data, pack, tmp_path / "resumed", 4, "--resume")) == 0
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and [r["rows"] for r in log] == [r["rows"] for r in expected]
    straight = load_file(tmp_path / "straight" / "lora_diffusers.safetensors")
    resumed = load_file(tmp_path / "resumed" / "lora_diffusers.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


@pytest.mark.parametrize(("row", "message"), [
    ({"target": "img/missing.jpg"}, "missing.jpg"),
    ({"references": ["img/Rob_Lowe_0001.jpg", "img/no_face_view.jpg"], "identities": ["a", "b"]}, "no face found"),
    ({"identities": ["only one"]}, "1 identities for 2 references"),
    ({"target": "text/0.safetensors"}, "cannot be read as an image"),
    ({"text_embedding": "text/absent.safetensors"}, "absent.safetensors"),
])
def test_bad_rows_are_named_before_training(trainer_inputs, tmp_path, capsys, row, message):
    root, data, pack = trainer_inputs
    good = json.loads((data / "manifest.jsonl").read_text().splitlines()[0])
    bad_data = tmp_path / "data"
    shutil.copytree(data, bad_data)
    # Another prompt: a row with row 1's prompt, target and references would be refused as a duplicate.
    (bad_data / "manifest.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "prompt": "b", **row}))
    assert main(trainer_args(root, bad_data, pack, tmp_path / "out", 1)) == 2
    error = capsys.readouterr().err
    assert "row 2" in error and message in error
    assert not (tmp_path / "out" / "log.jsonl").exists()
    assert main(trainer_args(root, bad_data, pack, tmp_path / "skip", 1, "--on-bad-rows", "skip")) == 0
    assert f"skipped '{bad_data / 'manifest.jsonl'}' row 2" in capsys.readouterr().out


def test_reward_gradient_reaches_the_lora_through_vae_and_face_network(assets, photos, pack_dir):
    """The trainer's reward path on one step through FLUX.1's VAE decoder (tests/reward_path.py)."""
    from umo_core.backbones import get
    from umo_core.backbones.text_embedding import TextEmbedding

    transformer = add_lora(tiny_flux_transformer().requires_grad_(False), rank=4, alpha=4)
    generator = torch.Generator().manual_seed(0)
    text = TextEmbedding(torch.randn(1, TEXT_LEN, TEXT_DIM, generator=generator),
                         torch.randn(1, POOLED_DIM, generator=generator))
    latent = torch.randn(1, 16, 32, 32, generator=generator)
    references = [torch.randn(1, 16, 8, 8, generator=generator)]
    check_reward_gradient_reaches_only_the_lora(get("flux1"), transformer, tiny_vae().requires_grad_(False), photos,
                                                pack_dir, text, latent, references)


def test_generate_command_with_and_without_a_uno_lora(trainer_inputs, photos, tmp_path):
    """The headless twin of the ComfyUI graph: same seed, same image; a merged UNO LoRA changes it."""
    from peft.utils import get_peft_model_state_dict

    from umo_core.backbones.flux1.loading import merge_lora
    from umo_core.backbones.flux1.lora import diffusers_to_uno
    from umo_core.backbones.lora_formats import save_lora_file
    from umo_core.cli import main as umo_main

    root, data, _ = trainer_inputs
    adapted = add_lora(tiny_flux_transformer(), rank=2, alpha=2, lora_b_std=0.5)
    lora_path = tmp_path / "lora_uno.safetensors"
    save_lora_file(lora_path, diffusers_to_uno(get_peft_model_state_dict(adapted)))

    base = tiny_flux_transformer()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    assert merge_lora(base, lora_path) == 4 * 2 + 4  # 8 double-block and 4 single-block modules
    changed = {k for k, v in base.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith(".weight") and ("attn." in k or "proj_out" in k) for k in changed)
    assert "proj_out.weight" not in changed  # the top-level output projection is not UNO's

    def generate(out, *extra):
        args = ["generate", "--transformer", str(root / "transformer"), "--vae", str(root / "vae"),
                "--text-embedding", str(data / "text" / "0.safetensors"), "--ref", str(photos / "Rob_Lowe_0001.jpg"),
                "--ref", str(photos / "Nathalie_Baye_0002.jpg"), "--size", "64", "--steps", "2", "--seed", "3",
                "--device", "cpu", "--out", str(out), *extra]
        assert umo_main(args) == 0
        return np.asarray(Image.open(out / "umo_000003.png"), np.float32)

    first, again = generate(tmp_path / "a"), generate(tmp_path / "b")
    assert first.shape == (64, 64, 3) and np.array_equal(first, again)
    assert not np.array_equal(first, generate(tmp_path / "c", "--lora", str(lora_path)))


def _log(output):
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]


def test_batches_hold_one_aspect_ratio_bucket(trainer_inputs, tmp_path):
    root, data, pack = trainer_inputs
    assert main(trainer_args(root, data, pack, tmp_path / "run", 2, "--batch-size", "2")) == 0
    assert sorted(sorted(r["rows"]) for r in _log(tmp_path / "run")) == [[1, 3], [2]]


def test_evaluation_images_and_report(trainer_inputs, tmp_path):
    root, data, pack = trainer_inputs
    output = tmp_path / "run"
    assert main(trainer_args(root, data, pack, output, 2, "--eval-every", "2", "--eval-count", "2")) == 0
    summaries = [json.loads(line) for line in (output / "eval.jsonl").read_text().splitlines()]
    assert [summary["step"] for summary in summaries] == [0, 2]
    assert all({"mimr", "coverage", "duplicates"} <= summary.keys() for summary in summaries)
    for step in ("step_000000", "step_000002"):
        report = json.loads((output / "eval" / step / "report.json").read_text())
        assert [i["row"] for i in report["images"]] == [1, 2]
        assert {"mimr", "id_sim", "id_conf", "sim_gt", "cp", "coverage", "duplicates", "missing"} <= \
            report["images"][0]["metrics"].keys()
        assert {"present", "missing", "duplicates", "bystanders"} <= report["images"][0].keys()
    before = np.asarray(Image.open(output / "eval" / "step_000000" / "row_0002.png"))
    after = np.asarray(Image.open(output / "eval" / "step_000002" / "row_0002.png"))
    assert before.shape == (48, 80, 3)  # the wide row in its bucket
    assert not np.array_equal(before, after)  # the evaluation samples with the trained LoRA


def test_evaluation_on_held_out_data(trainer_inputs, tmp_path):
    root, data, pack = trainer_inputs
    held_out = tmp_path / "held_out"
    shutil.copytree(data, held_out)
    wide_row = (data / "manifest.jsonl").read_text().splitlines()[1]
    (held_out / "manifest.jsonl").write_text(wide_row + "\n")
    output = tmp_path / "run"
    assert main(trainer_args(root, data, pack, output, 1, "--eval-every", "1", "--eval-data", str(held_out))) == 0
    report = json.loads((output / "eval" / "step_000001" / "report.json").read_text())
    assert [i["row"] for i in report["images"]] == [1]
    assert np.asarray(Image.open(output / "eval" / "step_000001" / "row_0001.png")).shape == (48, 80, 3)


def test_init_lora_continues_from_a_uno_file(trainer_inputs, tmp_path):
    root, data, pack = trainer_inputs
    assert main(trainer_args(root, data, pack, tmp_path / "first", 2)) == 0
    uno = str(tmp_path / "first" / "lora_uno.safetensors")
    # lr 0: the step changes nothing, so the result is the loaded file itself.
    args = trainer_args(root, data, pack, tmp_path / "second", 1, "--init-lora", uno, "--lr", "0")
    del args[args.index("--rank"):args.index("--rank") + 2]  # the rank comes from the file
    assert main(args) == 0
    first = load_file(tmp_path / "first" / "lora_diffusers.safetensors")
    second = load_file(tmp_path / "second" / "lora_diffusers.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_init_lora_errors(trainer_inputs, tmp_path, capsys):
    root, data, pack = trainer_inputs
    assert main(trainer_args(root, data, pack, tmp_path / "first", 1)) == 0
    uno = str(tmp_path / "first" / "lora_uno.safetensors")
    assert main(trainer_args(root, data, pack, tmp_path / "out", 1, "--init-lora", uno, "--rank", "8")) == 2
    assert "--rank 8 differs from the rank 4" in capsys.readouterr().err
    omnigen2 = tmp_path / "omnigen2.safetensors"
    save_file({"transformer.layers.0.attn.to_q.lora_A.weight": torch.zeros(2, 8),
               "transformer.layers.0.attn.to_q.lora_B.weight": torch.zeros(8, 2)}, omnigen2)
    assert main(trainer_args(root, data, pack, tmp_path / "out", 1, "--init-lora", str(omnigen2))) == 2
    assert "omnigen2.safetensors' is a omnigen2_peft LoRA" in capsys.readouterr().err


def _command(root, data, pack, output, steps, *extra):
    return [sys.executable, "-m", "training.rerefl", *trainer_args(root, data, pack, output, steps, *extra)]


@pytest.mark.parametrize(("stop", "reason"), [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_a_signal_checkpoints_the_finished_step_and_resume_goes_on(trainer_inputs, tmp_path, stop, reason):
    """Ctrl-C, or a scheduler's SIGTERM: the step finishes, the checkpoint is written, one line says so, and the
    status is the shell's for the signal (a scheduler must not take the stopped run for a finished one)."""
    root, data, pack = trainer_inputs
    output = tmp_path / "run"
    process = subprocess.Popen(_command(root, data, pack, output, 1000, "--checkpoint-every", "1000"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (output / "log.jsonl").is_file() or not (output / "log.jsonl").read_text():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    assert (output / LOCK_NAME).read_text().split()[0] == str(process.pid)  # one run at a time writes --output
    process.send_signal(stop)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 128 + stop, err
    assert not (output / LOCK_NAME).exists()
    state = json.loads((output / "checkpoint" / "state.json").read_text())
    assert err.splitlines()[-1] == (f"stopped at step {state['step']} by {reason}: checkpoint written to "
                                    f"'{output / 'checkpoint'}'; continue with --resume")
    assert len(_log(output)) == state["step"]
    assert main(trainer_args(root, data, pack, output, state["step"] + 1, "--resume")) == 0
    assert [r["step"] for r in _log(output)] == list(range(1, state["step"] + 2))


def _torchrun(root, data, pack, output, steps, *extra):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "-m", "training.rerefl", *trainer_args(root, data, pack, output, steps, *extra)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize(("backbone", "inputs"), [("flux1", "trainer_inputs"), ("flux2", "flux2_trainer_inputs")],
                         ids=["flux1", "flux2"])
def test_two_processes_share_the_data_and_resume_exactly(request, tmp_path, backbone, inputs):
    """The same command on two processes (torchrun, gloo on the CPU), for each backbone: each step takes one
    batch per process, the checkpoint holds every process's RNG, and a resume continues exactly."""
    root, data, pack = request.getfixturevalue(inputs)
    chosen = ("--backbone", backbone)
    _torchrun(root, data, pack, tmp_path / "straight", 2, *chosen)
    log = _log(tmp_path / "straight")
    assert [len(r["rows"]) for r in log] == [2, 2]
    assert {p.name for p in (tmp_path / "straight" / "checkpoint").iterdir()} >= {"rng_0.pt", "rng_1.pt"}
    _torchrun(root, data, pack, tmp_path / "resumed", 1, *chosen)
    _torchrun(root, data, pack, tmp_path / "resumed", 2, "--resume", *chosen)
    straight = load_file(tmp_path / "straight" / "lora_diffusers.safetensors")
    resumed = load_file(tmp_path / "resumed" / "lora_diffusers.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    # One process cannot resume it.
    assert main(trainer_args(root, data, pack, tmp_path / "resumed", 3, "--resume", *chosen)) == 2


@pytest.mark.parametrize(("extra", "message"), [
    (["--window", "9"], "--window 9 must be between 1 and --sampling-steps (4)"),
    (["--resolution", "100"], "--resolution 100 must be a positive multiple of 16"),
    (["--batch-size", "0"], "--batch-size 0 must be at least 1"),
    (["--resume"], "--resume: no checkpoint in"),
])
def test_bad_arguments_are_named(trainer_inputs, tmp_path, capsys, extra, message):
    root, data, pack = trainer_inputs
    assert main(trainer_args(root, data, pack, tmp_path / "out", 1, *extra)) == 2
    assert message in capsys.readouterr().err


def test_withanyone_terms_are_logged_and_gated(trainer_inputs, tmp_path):
    root, data, pack = trainer_inputs
    withanyone = ("--gt-id-weight", "1", "--contrastive-weight", "1")
    assert main(trainer_args(root, data, pack, tmp_path / "run", 4, *withanyone)) == 0
    log = _log(tmp_path / "run")
    ran = [r for r in log if r["gt_id_loss"] is not None]  # null at steps drawn above sigma 0.6
    assert ran and all(r["contrastive_loss"] is not None for r in ran)
    assert all(0 <= r["gt_id_loss"] <= 2 and np.isfinite(r["contrastive_loss"]) for r in ran)


def test_withanyone_gradient_reaches_the_lora(trainer_inputs, pack_dir):
    """The GT-aligned term on the flow-matching branch: the target photo's keypoints crop the decoded
    clean estimate, and the loss's gradient reaches the LoRA through the VAE decoder and the face network."""
    from training.batches import load_batch
    from training.data import load_dataset
    from training.step import StepSettings, withanyone_terms
    from umo_core import load_face_model
    from umo_core.backbones.flux1.runtime import predict_velocity

    root, data, pack = trainer_inputs
    face_model = load_face_model(pack_dir, provider="cpu", backend="torch")
    samples, _ = load_dataset(data, face_model)
    vae = tiny_vae().requires_grad_(False)
    batch = load_batch(backbones.get("flux1"), samples[:1], (256, 256), vae, torch.device("cpu"))
    assert len(batch.ground_truth[0].faces) == 1  # Rob Lowe's face in the target photo
    transformer = add_lora(tiny_flux_transformer().requires_grad_(False), rank=4, alpha=4, lora_b_std=0.1)
    t = torch.full((1, 1, 1, 1), 0.3)
    noisy = (1 - t) * batch.target + t * torch.randn(batch.target.shape, generator=torch.Generator().manual_seed(0))
    velocity = predict_velocity(transformer, noisy, t.flatten(), batch.text, batch.references)
    settings = StepSettings(gt_id_weight=1.0)
    terms = withanyone_terms(backbones.get("flux1"), settings, vae, face_model, batch, noisy, velocity, t, bank=None)
    assert set(terms) == {"gt_id_loss"} and 0 < terms["gt_id_loss"].item() <= 2
    terms["gt_id_loss"].backward()
    lora_grads = [p.grad for n, p in transformer.named_parameters() if "lora" in n]
    assert all(g is not None and torch.isfinite(g).all() for g in lora_grads)
    assert sum(g.abs().sum() for g in lora_grads) > 0
    noisier = torch.full((1, 1, 1, 1), 0.7)
    flux1 = backbones.get("flux1")
    assert withanyone_terms(flux1, settings, vae, face_model, batch, noisy, velocity, noisier, None) == {}


def test_a_batch_reuses_what_the_data_check_found(trainer_inputs, torch_face_model):
    """The references' people and the target's faces come from the data check, not from a detection per step."""
    from training.batches import load_batch
    from training.data import load_dataset

    root, data, pack = trainer_inputs
    samples, _ = load_dataset(data, torch_face_model)
    wide = samples[1]  # the 400 x 250 target, in the 48 x 80 bucket at --resolution 64
    batch = load_batch(backbones.get("flux1"), [wide], (48, 80), tiny_vae(), torch.device("cpu"))
    assert batch.identities[0] is wide.identities and wide.identities.crops is None  # no preview crops per row
    assert len(wide.identities) == 2 and batch.names == [["rob", "nathalie"]]
    truth = batch.ground_truth[0]
    assert len(truth.faces) == 1 and torch.equal(truth.embeddings, wide.target_faces.embeddings)
    assert (truth.faces.keypoints >= 0).all() and (truth.faces.keypoints[..., 0] < 80).all()
    assert (truth.faces.keypoints[..., 1] < 48).all()


def test_every_file_of_a_run_gets_the_usual_permissions(trainer_inputs, tmp_path, umask):
    """LoRA files, checkpoint, config, logs, evaluation images and report: readable by a ComfyUI running as another
    user where the umask allows it (safetensors alone writes 0600)."""
    root, data, pack = trainer_inputs
    output = tmp_path / "run"
    assert main(trainer_args(root, data, pack, output, 1, "--eval-every", "1", "--eval-count", "1")) == 0
    files = [path for path in output.rglob("*") if path.is_file()]
    assert {path.name for path in files} == {
        "lora_diffusers.safetensors", "lora_uno.safetensors", "training_config.json", "log.jsonl", "eval.jsonl",
        "lora.safetensors", "optimizer.pt", "rng_0.pt", "state.json", "report.json", "row_0001.png"}
    modes = {str(path.relative_to(output)): stat.S_IMODE(path.stat().st_mode) for path in files}
    assert modes == dict.fromkeys(modes, usual_mode(umask))
    folders = [output, *(path for path in output.rglob("*") if path.is_dir())]
    assert all(stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask for folder in folders)
