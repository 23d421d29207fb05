"""Bad input to the trainer and to `generate` (issue #17): one `error:` line that names the input and says what
to do, exit status 2, before any model loads, and nothing written or changed. Also a `generate` stopped by Ctrl-C
or SIGTERM: one line, the shell's status, only whole images left."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.conftest import ROOT, trainer_args, usual_mode
from tests.tiny_models import POOLED_DIM, TEXT_DIM, TEXT_LEN
from training.config import TrainConfig, parse_config
from training.rerefl import main as train_main
from umo_core.cli import main as umo_main
from umo_core.errors import UMOError
from umo_core.files import LOCK_NAME


@pytest.fixture
def no_models(monkeypatch):
    """Loading FLUX, or the trainer's face model (which comes before its data check), fails the test."""
    import training.rerefl as rerefl
    import umo_core.backbones.flux1.loading as loading

    def refuse(*_, **__):
        raise AssertionError("a model was loaded before the error")

    # The trainer and generate load through the backbone (umo_core.backbones.get), whose FLUX.1 loaders are these.
    for module, name in ((rerefl, "FaceModel"), (loading, "load_transformer"), (loading, "load_vae")):
        monkeypatch.setattr(module, name, refuse)


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err.strip()


def contents(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


# The trainer

@pytest.mark.parametrize(("extra", "message"), [
    (["--lr", "-1"], "--lr -1 must be at least 0 (AdamW's learning rate; default 5e-06)"),
    (["--lr", "nan"], "--lr nan must be at least 0"),
    (["--rank", "0"], "--rank 0 must be at least 1; leave --rank out for 512 (or the rank of --init-lora's file "
                      "or of the checkpoint resumed)"),
    (["--rank", "-3"], "--rank -3 must be at least 1"),
    (["--grad-clip", "-1"], "--grad-clip -1 must be above 0 (the largest gradient norm kept; give inf to turn "
                            "clipping off, default 1.0)"),
    (["--grad-clip", "0"], "--grad-clip 0 must be above 0"),
    (["--sampling-steps", "0"], "--sampling-steps 0 must be at least 1"),
    (["--eval-count", "-1"], "--eval-count -1 must be at least 1 (the first N rows are evaluated; --eval-every 0 "
                             "turns evaluation off)"),
    (["--eval-every", "-1"], "--eval-every -1 must be at least 0"),
    (["--contrastive-temperature", "inf"], "--contrastive-temperature inf must be above 0"),
    (["--seed", "-1"], "--seed -1 must be between 0 and 4294967295"),
    (["--provider", "gpu"], "--provider 'gpu' is not one of auto, cpu, cuda"),
])
def test_bad_trainer_values(trainer_inputs, tmp_path, capsys, no_models, extra, message):
    root, data, pack = trainer_inputs
    output = tmp_path / "out"
    assert train_main(trainer_args(root, data, pack, output, 1, *extra)) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {message}")
    assert "--window" not in line
    assert not output.exists()


def test_a_missing_init_lora_is_named_as_the_flag(trainer_inputs, tmp_path, capsys, no_models):
    root, data, pack = trainer_inputs
    missing = tmp_path / "missing.safetensors"
    assert train_main(trainer_args(root, data, pack, tmp_path / "out", 1, "--init-lora", str(missing))) == 2
    line = error_line(capsys)
    assert line == (f"error: --init-lora '{missing}' is not a file; give the path of a UNO-layout (UMO_UNO) or "
                    "diffusers FLUX LoRA .safetensors")  # not ComfyUI's loras folder: the trainer does not look there
    assert not (tmp_path / "out").exists()


def test_the_config_keeps_what_the_flags_allow():
    """inf turns clipping off; a config made in code is checked like one from the command line."""
    assert TrainConfig(data=Path("d"), grad_clip=math.inf).grad_clip == math.inf
    with pytest.raises(UMOError, match="--steps 0 must be at least 1"):
        TrainConfig(data=Path("d"), steps=0)


@pytest.fixture(scope="module")
def checkpointed(trainer_inputs, tmp_path_factory) -> Path:
    """A run's folder after two steps (rank 4): its checkpoint is at step 2."""
    root, data, pack = trainer_inputs
    output = tmp_path_factory.mktemp("checkpointed") / "run"
    assert train_main(trainer_args(root, data, pack, output, 2)) == 0
    return output


def _garbage_state(folder: Path) -> None:
    (folder / "state.json").write_text("{step: 2")


def _truncated_lora(folder: Path) -> None:
    path = folder / "lora.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _garbage_optimizer(folder: Path) -> None:
    (folder / "optimizer.pt").write_bytes(os.urandom(1000))


def _missing_rng(folder: Path) -> None:
    (folder / "rng_0.pt").unlink()


@pytest.mark.parametrize(("damage", "steps", "extra", "message"), [
    (_garbage_state, 3, [], "state.json' is not the trainer's JSON; the checkpoint is damaged: restore the folder "
                            "from a copy, or start again without --resume"),
    (_truncated_lora, 3, [], "lora.safetensors' cannot be read (Error while deserializing header"),
    (_garbage_optimizer, 3, [], "optimizer.pt' is not a whole file of torch.save; the checkpoint is damaged"),
    (_missing_rng, 3, [], "rng_0.pt' is missing; the checkpoint is damaged"),
    (None, 3, ["--rank", "8"], "--rank 8 differs from the rank 4 of the checkpoint in '{output}/checkpoint'; "
                               "leave --rank out to continue at the file's rank"),
    (None, 2, [], "--resume: the checkpoint in '{output}/checkpoint' is at step 2, so --steps 2 leaves nothing to "
                  "train; give --steps above 2"),
    (None, 1, [], "--steps 1 leaves nothing to train"),
])
def test_resume_checks_the_checkpoint_before_the_models_load(trainer_inputs, checkpointed, tmp_path, capsys,
                                                             no_models, damage, steps, extra, message):
    root, data, pack = trainer_inputs
    output = tmp_path / "run"
    shutil.copytree(checkpointed, output)
    if damage:
        damage(output / "checkpoint")
    before = contents(output)
    args = trainer_args(root, data, pack, output, steps, "--resume", *extra)
    if "--rank" in extra:
        del args[args.index("--rank"):args.index("--rank") + 2]  # trainer_args' own --rank 4
    assert train_main(args) == 2
    line = error_line(capsys)
    assert message.format(output=output) in line
    assert contents(output) == before


def test_resume_takes_the_rank_of_the_checkpoint(trainer_inputs, checkpointed, tmp_path):
    """Without --rank a resume continues at the checkpoint's rank (4), not at the default 512."""
    root, data, pack = trainer_inputs
    output = tmp_path / "run"
    shutil.copytree(checkpointed, output)
    args = trainer_args(root, data, pack, output, 3, "--resume")
    del args[args.index("--rank"):args.index("--rank") + 2]
    assert train_main(args) == 0
    lora = load_file(output / "lora_diffusers.safetensors")
    assert {tensor.shape[0] for key, tensor in lora.items() if ".lora_A." in key} == {4}


def test_a_second_run_on_the_same_output_is_refused_before_any_model_loads(trainer_inputs, tmp_path, capsys,
                                                                          no_models):
    root, data, pack = trainer_inputs
    output = tmp_path / "run"
    output.mkdir()
    other_run = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    lock = output / LOCK_NAME
    try:
        lock.write_text(f"{other_run.pid} {socket.gethostname()} training.rerefl\n")
        assert train_main(trainer_args(root, data, pack, output, 1)) == 2
        assert error_line(capsys) == (f"error: --output '{output}' is being written by another training.rerefl run "
                                      f"(process {other_run.pid}, see '{lock}'); wait for it to end, or give another "
                                      "--output. If no such run is going on, delete that file")
        assert os.listdir(output) == [LOCK_NAME]
        assert lock.read_text() == f"{other_run.pid} {socket.gethostname()} training.rerefl\n"
    finally:
        other_run.kill()
        other_run.wait()


def test_the_trainers_face_pack_is_umo_face_pack_where_set(trainer_inputs, tmp_path, capsys, monkeypatch,
                                                           no_models):
    root, data, pack = trainer_inputs
    monkeypatch.setenv("UMO_FACE_PACK", str(tmp_path / "no_pack"))
    args = trainer_args(root, data, pack, tmp_path / "out", 1)
    del args[args.index("--faces"):args.index("--faces") + 2]
    assert parse_config(args).faces == str(tmp_path / "no_pack")
    assert train_main(args) == 2
    assert f"'{tmp_path / 'no_pack'}'" in error_line(capsys)
    assert not (tmp_path / "out").exists()


# generate

def _generate(root: Path, data: Path, photos: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "--transformer", str(root / "transformer"), "--vae", str(root / "vae"),
            "--text-embedding", str(data / "text" / "0.safetensors"), "--ref", str(photos / "Rob_Lowe_0001.jpg"),
            "--size", "32", "--steps", "1", "--device", "cpu", "--out", str(out), *extra]


def _embedding_file(folder: Path, content) -> str:
    path = folder / "embedding.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        save_file(content, path)
    return str(path)


@pytest.mark.parametrize(("extra", "message"), [
    (lambda _: ["--steps", "0"], "--steps 0 must be at least 1"),
    (lambda _: ["--size", "17"], "--size 17 must be a multiple of 16 (FLUX's latent patches); give e.g. 16 or 32"),
    (lambda _: ["--size", "0"], "--size 0 must be a multiple of 16 (FLUX's latent patches); give e.g. 16 or 32"),
    (lambda _: ["--count", "0"], "--count 0 must be at least 1 (images to make)"),
    (lambda _: ["--guidance", "-1"], "--guidance -1 must be at least 0"),
    (lambda _: ["--device", "gpu"], "--device 'gpu' is not a device; give cpu or cuda (cuda:N for the Nth GPU)"),
    (lambda tmp: ["--ref", str(tmp / "missing.jpg")], "reference 2 '{tmp}/missing.jpg' does not exist or is not a "
                                                      "file"),
    (lambda tmp: ["--text-embedding", _embedding_file(tmp, os.urandom(300))],
     "--text-embedding '{tmp}/embedding.safetensors' is not a readable .safetensors file ("),
    (lambda tmp: ["--text-embedding", _embedding_file(tmp, {"pooled_prompt_embeds": torch.zeros(POOLED_DIM)})],
     "--text-embedding '{tmp}/embedding.safetensors' lacks prompt_embeds / pooled_prompt_embeds; make it with "
     "python -m training.encode_prompts, or give --prompt and --text-encoders"),
    (lambda tmp: ["--text-embedding", _embedding_file(tmp, {"prompt_embeds": torch.zeros(TEXT_LEN, TEXT_DIM + 1),
                                                            "pooled_prompt_embeds": torch.zeros(POOLED_DIM)})],
     f"has prompt_embeds of width {TEXT_DIM + 1} and pooled_prompt_embeds of {POOLED_DIM}; the transformer takes "
     f"{TEXT_DIM} and {POOLED_DIM} (made with other text encoders?)"),
    (lambda tmp: ["--lora", str(tmp / "missing.safetensors")], "--lora '{tmp}/missing.safetensors' does not exist "
                                                               "or is not a file"),
    (lambda tmp: ["--faces", str(tmp / "no_pack")], "face pack"),
])
def test_bad_generate_inputs(trainer_inputs, photos, tmp_path, capsys, no_models, extra, message):
    root, data, _ = trainer_inputs
    out = tmp_path / "out"
    assert umo_main(_generate(root, data, photos, out, *extra(tmp_path))) == 2
    assert message.format(tmp=tmp_path) in error_line(capsys)
    assert not out.exists()


def test_generate_out_that_is_a_file(trainer_inputs, photos, tmp_path, capsys, no_models):
    root, data, _ = trainer_inputs
    out = tmp_path / "out.png"
    out.write_bytes(b"not a folder")
    assert umo_main(_generate(root, data, photos, out)) == 2
    assert error_line(capsys) == (f"error: --out '{out}' is a file; give a folder for the images (it is made if "
                                  "missing)")
    assert out.read_bytes() == b"not a folder"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch sees no GPU")
def test_generate_on_cuda_without_a_gpu(trainer_inputs, photos, tmp_path, capsys, no_models):
    root, data, _ = trainer_inputs
    assert umo_main(_generate(root, data, photos, tmp_path / "out", "--device", "cuda")) == 2
    line = error_line(capsys)
    assert line.startswith("error: --device cuda: torch sees no CUDA GPU here") and "give --device cpu" in line
    assert not (tmp_path / "out").exists()


def test_generate_warns_about_a_reference_without_a_face(trainer_inputs, photos, pack_dir, tmp_path, capsys, umask):
    """UNO takes any picture, so a faceless reference is a warning, not an error; the image gets the usual
    permissions."""
    root, data, _ = trainer_inputs
    out = tmp_path / "out"
    assert umo_main(_generate(root, data, photos, out, "--ref", str(photos / "no_face_view.jpg"),
                              "--faces", str(pack_dir))) == 0
    err = capsys.readouterr().err
    assert f"warning: reference 2 '{photos / 'no_face_view.jpg'}': no face found; UMO keeps the identity" in err
    assert "reference 1" not in err
    assert stat.S_IMODE((out / "umo_000000.png").stat().st_mode) == usual_mode(umask)


def test_generate_without_a_face_pack_says_the_references_are_unchecked(trainer_inputs, photos, tmp_path, capsys,
                                                                        monkeypatch):
    root, data, _ = trainer_inputs
    monkeypatch.setenv("UMO_FACE_PACK", str(tmp_path / "no_pack"))
    assert umo_main(_generate(root, data, photos, tmp_path / "out")) == 0
    assert "note: the references are not checked for faces (" in capsys.readouterr().err


@pytest.mark.parametrize(("stop", "reason"), [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_generate_stopped_by_a_signal_is_one_line_and_leaves_only_whole_images(trainer_inputs, photos, tmp_path,
                                                                               stop, reason):
    """Before: Ctrl-C was a traceback and SIGTERM ended the process at once, either of them possibly in the middle
    of writing an image."""
    root, data, pack = trainer_inputs
    out = tmp_path / "out"
    command = [sys.executable, "-m", "umo_core", *_generate(root, data, photos, out, "--count", "1000", "--faces",
                                                            str(pack))]
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = process.stdout.readline().strip()  # the first image is written: the rest follow one by one
    assert first == str(out / "umo_000000.png"), process.communicate()
    process.send_signal(stop)
    listed, error = process.communicate(timeout=300)
    assert process.returncode == 128 + stop, error[-3000:]
    assert "Traceback" not in error
    assert error.splitlines()[-1] == (f"stopped by {reason}: the images listed above are whole; the one being made "
                                      "is not written")
    written = [first, *listed.split()]
    assert len(written) < 1000 and sorted(os.listdir(out)) == sorted(Path(path).name for path in written)
    for path in written:
        with Image.open(path) as image:
            image.load()  # a cut-short PNG fails here
