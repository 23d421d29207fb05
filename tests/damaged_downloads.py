"""Damage done to a copy of a diffusers download's text encoder folders, for the tests that every damaged download is
one clear error line: each case is (damage(folder), a part of the message that names the damaged file)."""

from __future__ import annotations

from pathlib import Path


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def text_encoder_damages(not_json: str, not_object: str, no_weights: str, cut_short: str,
                         tokenizer: str) -> list[tuple]:
    """The config `not_json` (a path in the download) is not JSON, the config `not_object` is a JSON list, the text
    encoder folder `no_weights` lacks its weights, `cut_short`'s model.safetensors is cut in half, and the tokenizer
    folder `tokenizer`'s tokenizer.json is broken."""
    return [
        (lambda folder: (folder / not_json).write_text("{not json"), f"{not_json}' is not readable JSON"),
        (lambda folder: (folder / not_object).write_text("[]"), f"{not_object}' is not a JSON object"),
        (lambda folder: (folder / no_weights / "model.safetensors").unlink(),
         f"{no_weights}' has no weights (model.safetensors or model.safetensors.index.json with its shards)"),
        (lambda folder: truncate(folder / cut_short / "model.safetensors"),
         f"{cut_short}/model.safetensors' is not a readable .safetensors file"),
        (lambda folder: (folder / tokenizer / "tokenizer.json").write_text("{broken"), "could not be loaded"),
    ]
