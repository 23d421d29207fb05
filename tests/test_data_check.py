"""The trainer's data check (training/data.py), its early path checks and `--check-data`: real photos and face
models, real safetensors files, tiny FLUX models of the test trainer's widths."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from tests.flux_layout import save_bfl_file
from tests.tiny_models import POOLED_DIM, TEXT_DIM, TEXT_LEN, save_flux_folder, tiny_flux_transformer
from training.data import check_dataset, load_dataset
from training.rerefl import main
from umo_core import UMOError
from umo_core.backbones.flux1.loading import check_vae, transformer_text_widths

GOOD = {"prompt": "two people", "target": "img/Rob_Lowe_0002.jpg", "text_embedding": "text/0.safetensors",
        "references": ["img/Rob_Lowe_0001.jpg", "img/Nathalie_Baye_0002.jpg"], "identities": ["rob", "nathalie"]}
OTHER = {**GOOD, "prompt": "two other people"}  # not a duplicate of GOOD
ENCODE_HINT = "python -m training.encode_prompts --data"


def _embedding(path, prompt_shape=(TEXT_LEN, TEXT_DIM), pooled_shape=(POOLED_DIM,)):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"prompt_embeds": torch.zeros(prompt_shape), "pooled_prompt_embeds": torch.zeros(pooled_shape)}, path)


@pytest.fixture(scope="module")
def template(assets, photos, tmp_path_factory):
    """A data folder with the photos and a text embedding of the tiny models' widths; tests copy it."""
    data = tmp_path_factory.mktemp("data_template")
    (data / "img").mkdir()
    for name in ("Rob_Lowe_0001.jpg", "Rob_Lowe_0002.jpg", "Nathalie_Baye_0002.jpg", "no_face_view.jpg"):
        shutil.copyfile(photos / name, data / "img" / name)
    _embedding(data / "text" / "0.safetensors")
    (data / "text" / "random.safetensors").write_bytes(os.urandom(300))
    _embedding(data / "text" / "batched.safetensors", (1, TEXT_LEN, TEXT_DIM), (1, POOLED_DIM))  # [1,L,D], [1,D]
    _embedding(data / "text" / "flat.safetensors", (TEXT_LEN * TEXT_DIM,))
    _embedding(data / "text" / "wide.safetensors", (TEXT_LEN, 2 * TEXT_DIM), (2 * POOLED_DIM,))
    return data


def _folder(template, tmp_path, rows) -> str:
    data = tmp_path / "data"
    shutil.copytree(template, data)
    (data / "manifest.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return data


@pytest.mark.parametrize(("row", "message"), [
    ("42", "is 42, not a JSON object"),
    ('["img/Rob_Lowe_0002.jpg"]', 'is ["img/Rob_Lowe_0002.jpg"], not a JSON object'),
    ({**OTHER, "target": None}, "target must be a path (text) relative to the data folder, not null"),
    ({**OTHER, "prompt": 3}, "'prompt' must be text, not 3"),
    ({**OTHER, "references": ["img/Rob_Lowe_0001.jpg", 5]}, "reference 2 must be a path (text)"),
    ({**OTHER, "identities": 7}, "'identities' must be a list of names (text), one per reference, not 7"),
    ({**OTHER, "identities": "rob"}, "'identities' must be a list of names (text), one per reference, not \"rob\""),
    ({**OTHER, "identities": ["rob", 2]}, "'identities' must be a list of names"),
    ({**OTHER, "text_embedding": "text/random.safetensors"},
     "text embedding 'text/random.safetensors' is not a readable .safetensors file"),
    ({**OTHER, "text_embedding": "text/batched.safetensors"},
     "text embedding 'text/batched.safetensors' has prompt_embeds [1, 4, 32] and pooled_prompt_embeds [1, 16]; "
     "they must be [L, width] and [width]"),
    ({**OTHER, "text_embedding": "text/flat.safetensors"}, "has prompt_embeds [128] and pooled_prompt_embeds [16]"),
    ({**OTHER, "text_embedding": "text/wide.safetensors"},
     "text embedding 'text/wide.safetensors' has prompt_embeds of width 64 and pooled_prompt_embeds of 32; "
     f"the transformer takes {TEXT_DIM} and {POOLED_DIM}"),
    ({**OTHER, "text_embedding": "text/none.safetensors"},
     f"'text/none.safetensors' does not exist (make it with: {ENCODE_HINT}"),
    (GOOD, "the same prompt, target and references as row 1"),
    ({**GOOD, "target": "img/./Rob_Lowe_0002.jpg", "identities": ["a", "b"]},
     "the same prompt, target and references as row 1"),  # the same files, however written
    ({**OTHER, "target": "/etc/passwd"}, "target '/etc/passwd' is an absolute path; paths are relative"),
    ({**OTHER, "references": ["img/Rob_Lowe_0001.jpg", "../photos/Nathalie_Baye_0002.jpg"]},
     "reference 2 '../photos/Nathalie_Baye_0002.jpg' points outside the data folder"),
    ({**OTHER, "target": "img/no_face_view.jpg"}, "target 'img/no_face_view.jpg': no face found"),
    ({**OTHER, "references": ["img/Rob_Lowe_0001.jpg", "img/no_face_view.jpg"]},
     "reference 2 'img/no_face_view.jpg': no face found"),
    ({**OTHER, "references": ["img/Rob_Lowe_0001.jpg", "img/gone.jpg"]},
     "reference 2 'img/gone.jpg' does not exist or is not a file"),
    ({**OTHER, "target": "text/0.safetensors"}, "target 'text/0.safetensors' cannot be read as an image"),
])
def test_a_bad_row_is_named_with_what_is_wrong(template, tmp_path, face_model, row, message):
    data = _folder(template, tmp_path, [GOOD, row])
    samples, problems = check_dataset(data, face_model, (TEXT_DIM, POOLED_DIM))
    assert [s.row for s in samples] == [1]
    assert len(problems) == 1 and problems[0].startswith(f"'{data / 'manifest.jsonl'}' row 2: "), problems
    assert message in problems[0]


def test_paths_inside_the_folder_are_accepted_however_written(template, tmp_path, face_model):
    row = {**GOOD, "prompt": "other", "target": "img/../img/Rob_Lowe_0002.jpg", "identities": None}
    samples, problems = check_dataset(_folder(template, tmp_path, [row]), face_model, (TEXT_DIM, POOLED_DIM))
    assert problems == [] and samples[0].target.name == "Rob_Lowe_0002.jpg" and samples[0].names is None


def test_all_problems_of_a_row_and_all_bad_rows_are_listed_together(template, tmp_path, face_model):
    without_text = {k: v for k, v in GOOD.items() if k != "text_embedding"}
    rows = [{**without_text, "references": ["img/no_face_view.jpg", "img/Rob_Lowe_0001.jpg"]}, "42", GOOD,
            {**GOOD, "target": None}]
    data = _folder(template, tmp_path, rows)
    with pytest.raises(UMOError) as error:
        load_dataset(data, face_model, text_widths=(TEXT_DIM, POOLED_DIM))
    lines = str(error.value).splitlines()
    assert lines[0].startswith("bad training data") and [line.split(": ")[0].strip() for line in lines[1:]] == [
        f"'{data / 'manifest.jsonl'}' row {number}" for number in (1, 2, 4)]
    assert f"missing 'text_embedding' (make it with: {ENCODE_HINT} {data}" in lines[1]
    assert "; reference 1 'img/no_face_view.jpg': no face found" in lines[1]


def test_without_a_transformer_the_text_widths_must_agree(template, tmp_path, face_model):
    rows = [GOOD, {**GOOD, "prompt": "b", "text_embedding": "text/wide.safetensors"}, {**GOOD, "prompt": "c"}]
    data = _folder(template, tmp_path, rows)
    samples, problems = check_dataset(data, face_model)
    assert [s.row for s in samples] == [1, 3]
    assert problems == [f"'{data / 'manifest.jsonl'}' row 2: text embedding 'text/wide.safetensors' has "
                        f"prompt_embeds of width 64 and pooled_prompt_embeds of 32; most rows have {TEXT_DIM} and "
                        f"{POOLED_DIM} (made with other text encoders?)"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = save_flux_folder(tmp_path_factory.mktemp("models"))
    save_bfl_file(tiny_flux_transformer(), root / "flux1.safetensors")
    save_bfl_file(tiny_flux_transformer(), root / "comfy.safetensors", prefix="model.diffusion_model.")
    (root / "random.safetensors").write_bytes(os.urandom(300))
    (root / "empty").mkdir()
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text("{not json")
    (root / "a_file").write_text("not a folder")
    return root


def test_the_text_widths_come_from_the_transformer_header(models):
    for path in ("transformer", "flux1.safetensors", "comfy.safetensors"):
        assert transformer_text_widths(models / path) == (TEXT_DIM, POOLED_DIM), path
    check_vae(models / "vae")


def _train_args(data, models, pack, output=None):
    return ["--data", str(data), "--transformer", str(models / "transformer"), "--vae", str(models / "vae"),
            "--faces", str(pack), "--output", str(output or models / "run"), "--steps", "1", "--rank", "4",
            "--resolution", "64", "--mixed-precision", "no", "--provider", "cpu", "--eval-every", "0"]


@pytest.mark.parametrize(("override", "message"), [
    ("--transformer={models}/missing.safetensors", "FLUX transformer '{models}/missing.safetensors' does not exist"),
    ("--transformer={models}/random.safetensors", "'{models}/random.safetensors' is not a readable .safetensors"),
    ("--transformer={models}/empty", "FLUX transformer folder '{models}/empty' has no config.json"),
    ("--transformer={models}/broken", "'{models}/broken': config.json is not readable JSON"),
    ("--transformer={models}/vae", "'{models}/vae' holds a AutoencoderKL, not a FluxTransformer2DModel"),
    ("--vae={models}/transformer", "'{models}/transformer' holds a FluxTransformer2DModel, not a AutoencoderKL"),
    ("--vae={models}/flux1.safetensors", "'{models}/flux1.safetensors' is not a FLUX autoencoder"),
    ("--faces={models}/no_pack", "face pack folder '{models}/no_pack' does not exist"),
    ("--faces={models}/empty", "'{models}/empty' has no .onnx files"),
    ("--output={models}/a_file", "--output '{models}/a_file': '{models}/a_file' is a file, not a folder"),
    ("--output={models}/a_file/run", "--output '{models}/a_file/run': '{models}/a_file' is a file"),
    ("--resume", "--resume: no checkpoint in '{models}/run/checkpoint'"),
])
def test_paths_are_checked_before_any_row(template, tmp_path, models, pack_dir, capsys, override, message):
    """The data has a bad row (a missing target) after a good one: had the rows been checked first, training would
    stop at that row. It stops at the bad path instead, with one line naming it."""
    data = _folder(template, tmp_path, [GOOD, {**GOOD, "target": "img/missing.jpg"}])
    assert main(_train_args(data, models, pack_dir) + [override.format(models=models)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and len(error.splitlines()) == 1, error
    assert message.format(models=models) in error and "manifest.jsonl row" not in error


def test_the_same_bad_row_stops_training_once_the_paths_are_good(template, tmp_path, models, pack_dir, capsys):
    data = _folder(template, tmp_path, [GOOD, {**GOOD, "target": "img/missing.jpg"}])
    assert main(_train_args(data, models, pack_dir, output=tmp_path / "run")) == 2
    assert f"'{data / 'manifest.jsonl'}' row 2: target 'img/missing.jpg' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_check_data_on_a_clean_folder(template, tmp_path, pack_dir, models, capsys):
    data = _folder(template, tmp_path, [GOOD, {**GOOD, "prompt": "again"}])
    assert main(["--data", str(data), "--check-data", "--faces", str(pack_dir), "--provider", "cpu"]) == 0
    assert capsys.readouterr().out == f"data '{data}': 2 rows, all usable\n"
    # With the transformer, the embeddings' widths are checked against it (and a second folder is checked too).
    wide = _folder(template, tmp_path / "eval", [{**GOOD, "text_embedding": "text/wide.safetensors"}])
    assert main(["--data", str(data), "--eval-data", str(wide), "--check-data", "--faces", str(pack_dir),
                 "--transformer", str(models / "flux1.safetensors"), "--provider", "cpu"]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"data '{data}': 2 rows, all usable"
    # The evaluation folder's problem names that folder's manifest.
    assert out[1].startswith(f"'{wide / 'manifest.jsonl'}' row 1: text embedding 'text/wide.safetensors'")
    assert out[2].startswith(f"evaluation data '{wide}': 1 rows, 1 with problems, 0 usable")


def test_check_data_command_names_rows_without_text_embeddings(template, tmp_path, pack_dir):
    """The command line, in its own process: the problems one per line, a summary, status 2, and FLUX never
    loaded (diffusers not even imported)."""
    without_text = {k: v for k, v in OTHER.items() if k != "text_embedding"}
    data = _folder(template, tmp_path, [without_text, GOOD, {**GOOD, "target": "img/no_face_view.jpg"}])
    script = ("import sys; from training.rerefl import main; status = main(sys.argv[1:]); "
              "print('diffusers imported' if 'diffusers' in sys.modules else 'no diffusers'); sys.exit(status)")
    result = subprocess.run([sys.executable, "-c", script, "--data", str(data), "--check-data",
                             "--faces", str(pack_dir), "--provider", "cpu"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stdout.splitlines() == [
        f"'{data / 'manifest.jsonl'}' row 1: missing 'text_embedding' (make it with: {ENCODE_HINT} {data} "
        "--text-encoders <diffusers FLUX folder>)",
        f"'{data / 'manifest.jsonl'}' row 3: target 'img/no_face_view.jpg': no face found; the target photo must "
        "show the references' people",
        f"data '{data}': 3 rows, 2 with problems, 1 usable (training stops at these problems; --on-bad-rows skip "
        "leaves those rows out)",
        "no diffusers"]


def test_training_needs_its_paths_unless_checking_data(capsys):
    with pytest.raises(SystemExit) as exit_code:
        main(["--data", "d", "--vae", "v"])
    assert exit_code.value.code == 2
    assert "the following arguments are required: --transformer, --output (or give --check-data)" in \
        capsys.readouterr().err


def test_a_bad_pixel_limit_setting_is_one_error_not_every_rows_problem(template, tmp_path, pack_dir, capsys,
                                                                       monkeypatch):
    data = _folder(template, tmp_path, [GOOD, {**GOOD, "prompt": "again"}])
    monkeypatch.setenv("UMO_MAX_PIXELS", "abc")
    assert main(["--data", str(data), "--check-data", "--faces", str(pack_dir), "--provider", "cpu"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == ("error: $UMO_MAX_PIXELS is 'abc'; set it to a whole number of pixels (0 for no "
                                    "limit) or unset it")


def test_a_manifest_with_a_byte_order_mark_and_crlf_line_ends_is_checked_like_any_other(template, tmp_path,
                                                                                         face_model):
    data = _folder(template, tmp_path, [])
    (data / "manifest.jsonl").write_bytes(b"\xef\xbb\xbf" + f"{json.dumps(GOOD)}\r\n{json.dumps(OTHER)}\r\n".encode())
    samples, problems = check_dataset(data, face_model, (TEXT_DIM, POOLED_DIM))
    assert problems == [] and [sample.prompt for sample in samples] == [GOOD["prompt"], OTHER["prompt"]]


def test_an_empty_manifest_is_named(template, tmp_path, pack_dir, capsys):
    data = _folder(template, tmp_path, [])
    assert main(["--data", str(data), "--check-data", "--faces", str(pack_dir), "--provider", "cpu"]) == 2
    assert capsys.readouterr().err == f"error: '{data / 'manifest.jsonl'}' holds no rows; each line is one JSON " \
                                      'object like {"prompt": ..., "target": ..., "references": [...], ' \
                                      '"text_embedding": ...}\n'
