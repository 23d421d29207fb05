"""The training data folder: `manifest.jsonl` plus images and cached text embeddings.

Each line: {"prompt": "...", "target": "img/0001.jpg", "references": ["ref/a.jpg", "ref/b.jpg"],
"text_embedding": "text/0001.safetensors", "identities": ["alice", "bob"] (optional)}; paths are
relative to the folder. The text embedding file holds `prompt_embeds` [L,4096] and
`pooled_prompt_embeds` [768]; `python -m training.encode_prompts` writes these files and fills in
`text_embedding`. Everything is checked before training starts: each bad row is named with what is wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from umo_core.errors import UMOError
from umo_core.face_model import FaceModel
from umo_core.images import load_image


@dataclass
class Sample:
    row: int
    prompt: str
    target: Path
    references: list[Path]
    text_embedding: Path
    identities: list[str] | None  # the people's names, one per reference, where the manifest gives them
    reference_embeddings: torch.Tensor  # [M,D] of the references' faces, from the data check


def _check_row(folder: Path, row: dict, face_model: FaceModel) -> torch.Tensor:
    """The embeddings [M,D] of the row's reference people; a UMOError says what is wrong with the row."""
    for key in ("prompt", "target", "references"):
        if key not in row:
            raise UMOError(f"missing '{key}'")
    encode_hint = ("make it with: python -m training.encode_prompts "
                   f"--data {folder} --text-encoders <diffusers FLUX folder>")
    if "text_embedding" not in row:
        raise UMOError(f"missing 'text_embedding' ({encode_hint})")
    if not isinstance(row["references"], list) or not row["references"]:
        raise UMOError("'references' must be a non-empty list of image paths (one per person)")
    if "identities" in row and len(row["identities"]) != len(row["references"]):
        raise UMOError(f"{len(row['identities'])} identities for {len(row['references'])} references")
    load_image(folder / row["target"])
    references = [load_image(folder / path) for path in row["references"]]
    people = face_model.identities(references, names=[f"reference '{p}'" for p in row["references"]])
    if not (folder / row["text_embedding"]).is_file():
        raise UMOError(f"text embedding '{row['text_embedding']}' does not exist ({encode_hint})")
    with safe_open(folder / row["text_embedding"], "pt") as embedding:  # the header only
        if not {"prompt_embeds", "pooled_prompt_embeds"} <= set(embedding.keys()):
            raise UMOError(f"text embedding '{row['text_embedding']}' lacks prompt_embeds / pooled_prompt_embeds")
    return people.embeddings


def load_dataset(folder: str | Path, face_model: FaceModel,
                 on_bad_rows: str = "error") -> tuple[list[Sample], list[str]]:
    """Validated samples and, with on_bad_rows='skip', the report of skipped rows."""
    folder = Path(folder)
    manifest = folder / "manifest.jsonl"
    if not manifest.is_file():
        raise UMOError(f"data folder '{folder}' has no manifest.jsonl (one JSON object per line, see README)")
    samples, problems = [], []
    for number, line in enumerate(manifest.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(f"manifest.jsonl row {number}: not valid JSON ({error.msg})")
            continue
        try:
            reference_embeddings = _check_row(folder, row, face_model)
        except UMOError as problem:
            problems.append(f"manifest.jsonl row {number}: {problem}")
            continue
        samples.append(Sample(number, row["prompt"], folder / row["target"],
                              [folder / p for p in row["references"]], folder / row["text_embedding"],
                              row.get("identities"), reference_embeddings))
    if problems and on_bad_rows == "error":
        listing = "\n  ".join(problems)
        raise UMOError(f"bad training data (use --on-bad-rows skip to leave these rows out):\n  {listing}")
    if not samples:
        raise UMOError(f"no usable rows in '{manifest}'")
    return samples, problems
