"""FLUX's text encoders from a local diffusers folder, `python -m training.encode_prompts` and
`generate --prompt`, on a tiny FLUX folder: random-weight CLIP-L and T5 encoders of the real
architectures with real tokenizers, saved in the layout of a FLUX.1-dev download (CPU)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.damaged_downloads import text_encoder_damages
from tests.tiny_models import POOLED_DIM, TEXT_DIM, save_clip_text_encoder, save_flux_folder, save_t5_text_encoder
from training.encode_prompts import main as encode_main
from training.manifest import text_embedding_path
from umo_core.backbones.flux1.text_encoders import encode_prompts, load_text_encoders
from umo_core.errors import UMOError

PROMPTS = ["two people at a cafe", "Zoé and Bob, smiling at the camera",
           "a prompt longer than CLIP's 77 tokens: " + "two people at a table " * 5]
# FLUX.1-dev's model_index.json: what FluxPipeline.from_pretrained reads.
MODEL_INDEX = {
    "_class_name": "FluxPipeline", "_diffusers_version": "0.30.0.dev0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    """A diffusers FLUX folder with tiny models whose text widths fit the tiny transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    root = save_flux_folder(tmp_path_factory.mktemp("flux"))
    save_clip_text_encoder(root)
    save_t5_text_encoder(root)
    FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX))
    return root


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_prompts_gives_what_flux_pipeline_encode_prompt_gives(flux_folder, dtype):
    from diffusers import FluxPipeline

    pipeline = FluxPipeline.from_pretrained(flux_folder, torch_dtype=dtype, local_files_only=True)
    with torch.no_grad():  # as FluxPipeline.__call__ runs it (attention takes other kernels with gradients)
        expected_embeds, expected_pooled, _ = pipeline.encode_prompt(PROMPTS, device=torch.device("cpu"))
    encoders = load_text_encoders(flux_folder, dtype)
    assert len(encoders.clip_tokenizer(PROMPTS[2]).input_ids) > 77  # CLIP cuts the long prompt
    text = encode_prompts(encoders, PROMPTS)
    assert text.prompt_embeds.shape == (3, 512, TEXT_DIM) and text.pooled_prompt_embeds.shape == (3, POOLED_DIM)
    assert text.prompt_embeds.dtype == text.pooled_prompt_embeds.dtype == dtype
    assert torch.equal(text.prompt_embeds, expected_embeds)
    assert torch.equal(text.pooled_prompt_embeds, expected_pooled)


def _data_folder(folder, photos, lines: list[str]):
    (folder / "img").mkdir(parents=True)
    for name in ("Rob_Lowe_0001.jpg", "Rob_Lowe_0002.jpg", "Nathalie_Baye_0002.jpg"):
        shutil.copyfile(photos / name, folder / "img" / name)
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _row(prompt: str, **extra) -> dict:
    return {"prompt": prompt, "target": "img/Rob_Lowe_0002.jpg",
            "references": ["img/Rob_Lowe_0001.jpg", "img/Nathalie_Baye_0002.jpg"], **extra}


def test_encode_prompts_command_fills_the_cache_once(flux_folder, photos, face_model, tmp_path, capsys):
    from training.data import load_dataset

    own_row = '{"prompt":"a third prompt","text_embedding":"text/own.safetensors","target":"img/Rob_Lowe_0002.jpg",' \
              '"references":["img/Rob_Lowe_0001.jpg","img/Nathalie_Baye_0002.jpg"]}'
    # Row 5 has row 1's prompt with another target (the same target and references too would be a duplicate row).
    rows = [_row(PROMPTS[0]), _row(PROMPTS[1], identities=["rob", "nathalie"]),
            _row(PROMPTS[0], target="img/Nathalie_Baye_0002.jpg")]
    lines = [json.dumps(rows[0]), json.dumps(rows[1]), "", own_row, json.dumps(rows[2])]
    data = _data_folder(tmp_path / "data", photos, lines)
    with pytest.raises(UMOError, match="missing 'text_embedding' .make it with: python -m training.encode_prompts"):
        load_dataset(data, face_model)

    args = ["--data", str(data), "--text-encoders", str(flux_folder), "--device", "cpu", "--batch-size", "2"]
    assert encode_main(args) == 0
    assert "3 prompt(s) encoded, 3 row(s) given a text_embedding" in capsys.readouterr().out
    written = (data / "manifest.jsonl").read_text().splitlines()
    assert written == [json.dumps({**rows[0], "text_embedding": text_embedding_path(PROMPTS[0])}, ensure_ascii=False),
                       json.dumps({**rows[1], "text_embedding": text_embedding_path(PROMPTS[1])}, ensure_ascii=False),
                       "", own_row,
                       json.dumps({**rows[2], "text_embedding": text_embedding_path(PROMPTS[0])}, ensure_ascii=False)]
    files = {text_embedding_path(PROMPTS[0]): PROMPTS[0], text_embedding_path(PROMPTS[1]): PROMPTS[1],
             "text/own.safetensors": "a third prompt"}
    assert sorted(p.name for p in (data / "text").iterdir()) == sorted(path.removeprefix("text/") for path in files)
    encoders = load_text_encoders(flux_folder, torch.float32)
    for path, prompt in files.items():
        expected = encode_prompts(encoders, [prompt])
        cached = load_file(data / path)
        torch.testing.assert_close(cached["prompt_embeds"], expected.prompt_embeds[0])
        torch.testing.assert_close(cached["pooled_prompt_embeds"], expected.pooled_prompt_embeds[0])

    # A second run has nothing to do: it does not even load the encoders (their folder is gone here).
    manifest_before = (data / "manifest.jsonl").read_bytes()
    times_before = {p.name: p.stat().st_mtime_ns for p in (data / "text").iterdir()}
    assert encode_main(["--data", str(data), "--text-encoders", str(tmp_path / "absent")]) == 0
    assert "0 prompt(s) encoded, 0 row(s) given a text_embedding" in capsys.readouterr().out
    assert (data / "manifest.jsonl").read_bytes() == manifest_before
    assert {p.name: p.stat().st_mtime_ns for p in (data / "text").iterdir()} == times_before

    samples, problems = load_dataset(data, face_model)
    assert not problems
    assert [s.text_embedding for s in samples] == [
        data / text_embedding_path(PROMPTS[0]), data / text_embedding_path(PROMPTS[1]), data / "text/own.safetensors",
        data / text_embedding_path(PROMPTS[0])]


def _refused(data, capsys, text_encoders, before: bytes | None) -> str:
    """encode_prompts on `data`: status 2, one 'error:' line first, the manifest as it was and no embedding written."""
    assert encode_main(["--data", str(data), "--text-encoders", str(text_encoders), "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "Traceback" not in error, error
    if before is not None:
        assert (data / "manifest.jsonl").read_bytes() == before
    assert not (data / "text").exists()
    return error


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "row 1: not valid JSON"),
    ("42", "row 1: is 42, not a JSON object"),  # not "no prompt"
    (json.dumps({"target": "img/Rob_Lowe_0002.jpg"}), "row 1: missing 'prompt'"),
    (json.dumps({"prompt": 3}), "row 1: 'prompt' must be text, not 3"),
    (json.dumps(_row("p", text_embedding="/tmp/elsewhere.safetensors")),
     "row 1: text embedding '/tmp/elsewhere.safetensors' is an absolute path"),
    (json.dumps(_row("p", text_embedding="../outside.safetensors")),
     "row 1: text embedding '../outside.safetensors' points outside the data folder"),
])
def test_a_row_that_cannot_be_encoded_stops_the_run_before_the_encoders_load(photos, tmp_path, capsys, line, message):
    """A good row and a bad one: nothing is encoded or written (the encoders' folder does not even exist, so had they
    been loaded, that would be the error) and the bad row is named with its manifest."""
    data = _data_folder(tmp_path / "data", photos, [line, json.dumps(_row("two people"))])
    manifest = data / "manifest.jsonl"
    error = _refused(data, capsys, tmp_path / "absent", manifest.read_bytes()).splitlines()
    assert error[0] == f"error: 1 row(s) of '{data}' cannot be encoded; fix or remove them (nothing was written):"
    assert len(error) == 2 and error[1].startswith(f"  '{manifest}' {message}"), error


@pytest.mark.parametrize("content", [b"", b"\n  \n", b"\xef\xbb\xbf"])
def test_an_empty_manifest_is_an_error(tmp_path, capsys, content):
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.jsonl").write_bytes(content)
    error = _refused(data, capsys, tmp_path / "absent", content)
    assert error == f"error: '{data / 'manifest.jsonl'}' holds no rows; each line is one JSON object like " \
                    '{"prompt": ..., "target": ..., "references": [...], "text_embedding": ...}\n'


def test_a_manifest_in_latin_1_is_named(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    content = (json.dumps(_row("Zoé"), ensure_ascii=False) + "\n").encode("latin-1")
    (data / "manifest.jsonl").write_bytes(content)
    error = _refused(data, capsys, tmp_path / "absent", content)
    assert error == f"error: '{data / 'manifest.jsonl'}' is not UTF-8 text (line 1 has the byte 0xe9); save it as " \
                    "UTF-8\n"


def test_a_manifest_with_a_byte_order_mark_and_crlf_line_ends_is_read(flux_folder, photos, tmp_path, capsys):
    """As Windows editors save it: both rows are encoded and the manifest is written back as UTF-8 with LF."""
    data = _data_folder(tmp_path / "data", photos, [])
    rows = [_row(PROMPTS[1]), _row(PROMPTS[0], target="img/Nathalie_Baye_0002.jpg")]
    (data / "manifest.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(
        json.dumps(row, ensure_ascii=False) + "\r\n" for row in rows).encode())
    assert encode_main(["--data", str(data), "--text-encoders", str(flux_folder), "--device", "cpu"]) == 0
    assert "2 prompt(s) encoded, 2 row(s) given a text_embedding" in capsys.readouterr().out
    assert (data / "manifest.jsonl").read_text(encoding="utf-8").splitlines() == [
        json.dumps({**row, "text_embedding": text_embedding_path(row["prompt"])}, ensure_ascii=False) for row in rows]
    assert all((data / text_embedding_path(row["prompt"])).is_file() for row in rows)
    assert not [path for path in data.rglob("*") if path.name.startswith(".")]  # no temporary file left


def _shard(folder):
    """text_encoder_2's weights as a sharded download whose index names a shard that is not there."""
    (folder / "text_encoder_2" / "model.safetensors").rename(folder / "text_encoder_2" / "model-1-of-2.safetensors")
    weight_map = {"a": "model-1-of-2.safetensors", "b": "model-2-of-2.safetensors"}
    (folder / "text_encoder_2" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize(("damage", "message"), [
    *text_encoder_damages("text_encoder/config.json", "text_encoder_2/config.json", "text_encoder_2", "text_encoder",
                          "tokenizer_2"),
    (_shard, "text_encoder_2' lacks model-2-of-2.safetensors (named by model.safetensors.index.json)"),
])
def test_damaged_text_encoders_are_one_error_line(flux_folder, photos, tmp_path, capsys, damage, message):
    encoders = tmp_path / "flux"
    shutil.copytree(flux_folder, encoders)
    damage(encoders)
    data = _data_folder(tmp_path / "data", photos, [json.dumps(_row("two people"))])
    error = _refused(data, capsys, encoders, (data / "manifest.jsonl").read_bytes())
    assert len(error.splitlines()) == 1 and error.startswith(f"error: text encoders: '{encoders}") and message in error


def _generate(flux_folder, photos, out, *text_args):
    from umo_core.cli import main as umo_main

    args = ["generate", "--transformer", str(flux_folder / "transformer"), "--vae", str(flux_folder / "vae"),
            *text_args, "--ref", str(photos / "Rob_Lowe_0001.jpg"), "--ref", str(photos / "Nathalie_Baye_0002.jpg"),
            "--size", "64", "--steps", "2", "--seed", "3", "--device", "cpu", "--out", str(out)]
    assert umo_main(args) == 0
    return np.asarray(Image.open(out / "umo_000003.png"), np.float32)


def test_generate_with_a_prompt_is_generate_with_its_cached_embedding(flux_folder, photos, tmp_path):
    data = _data_folder(tmp_path / "data", photos, [json.dumps(_row(PROMPTS[0]))])
    assert encode_main(["--data", str(data), "--text-encoders", str(flux_folder), "--device", "cpu"]) == 0
    from_prompt = _generate(flux_folder, photos, tmp_path / "a", "--prompt", PROMPTS[0],
                            "--text-encoders", str(flux_folder))
    from_cache = _generate(flux_folder, photos, tmp_path / "b", "--text-embedding",
                           str(data / text_embedding_path(PROMPTS[0])))
    assert from_prompt.shape == (64, 64, 3) and np.array_equal(from_prompt, from_cache)
    other = _generate(flux_folder, photos, tmp_path / "c", "--prompt", PROMPTS[1], "--text-encoders", str(flux_folder))
    assert not np.array_equal(from_prompt, other)


def test_generate_takes_exactly_one_of_prompt_and_text_embedding(flux_folder, tmp_path, capsys):
    from umo_core.cli import main as umo_main

    base = ["generate", "--transformer", str(flux_folder / "transformer"), "--vae", str(flux_folder / "vae"),
            "--ref", "a.jpg", "--out", str(tmp_path / "out")]
    embedding = ["--text-embedding", str(tmp_path / "e.safetensors")]
    for args, message in [(["--prompt", "hi"], "--prompt needs --text-encoders: a diffusers FLUX folder"),
                          ([*embedding, "--text-encoders", str(flux_folder)], "--text-encoders goes with --prompt")]:
        assert umo_main(base + args) == 2
        assert message in capsys.readouterr().err
    for args, message in [([*embedding, "--prompt", "hi"], "--prompt: not allowed with argument --text-embedding"),
                          ([], "one of the arguments --text-embedding --prompt is required")]:
        with pytest.raises(SystemExit):
            umo_main(base + args)
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_not_a_diffusers_flux_folder_is_named(flux_folder, tmp_path, capsys):
    every_file = "text_encoder/config.json, tokenizer/tokenizer_config.json, text_encoder_2/config.json, " \
                 "tokenizer_2/tokenizer_config.json"
    partial = tmp_path / "partial"
    shutil.copytree(flux_folder, partial, ignore=shutil.ignore_patterns("tokenizer_2"))
    single_file = tmp_path / "t5xxl_fp16.safetensors"  # what ComfyUI keeps in models/text_encoders
    single_file.write_bytes(b"not a folder")
    for folder, lacking in [(flux_folder / "transformer", every_file), (single_file, every_file),
                            (tmp_path / "absent", every_file),
                            (partial, "it lacks tokenizer_2/tokenizer_config.json.")]:
        with pytest.raises(UMOError) as error:
            load_text_encoders(folder)
        assert f"'{folder}' is not a diffusers FLUX folder" in str(error.value) and lacking in str(error.value)
        assert "text_encoder/ (CLIP-L), tokenizer/, text_encoder_2/ (T5-XXL) and tokenizer_2/" in str(error.value)

    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.jsonl").write_text(json.dumps({"prompt": "two people"}) + "\n")
    assert encode_main(["--data", str(data), "--text-encoders", str(partial)]) == 2
    assert "error: text encoders: " in capsys.readouterr().err
    assert encode_main(["--data", str(tmp_path / "nowhere"), "--text-encoders", str(flux_folder)]) == 2
    assert "has no manifest.jsonl" in capsys.readouterr().err
