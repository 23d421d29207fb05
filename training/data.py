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

from safetensors.torch import load_file

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


def _row_problem(folder: Path, row: dict, face_model: FaceModel) -> str | None:
    for key in ("prompt", "target", "references"):
        if key not in row:
            return f"missing '{key}'"
    encode_hint = ("make it with: python -m training.encode_prompts "
                   f"--data {folder} --text-encoders <diffusers FLUX folder>")
    if "text_embedding" not in row:
        return f"missing 'text_embedding' ({encode_hint})"
    if not isinstance(row["references"], list) or not row["references"]:
        return "'references' must be a non-empty list of image paths (one per person)"
    if "identities" in row and len(row["identities"]) != len(row["references"]):
        return f"{len(row['identities'])} identities for {len(row['references'])} references"
    try:
        load_image(folder / row["target"])
        references = [load_image(folder / path) for path in row["references"]]
        face_model.identities(references, names=[f"reference '{p}'" for p in row["references"]])
    except UMOError as error:
        return str(error)
    if not (folder / row["text_embedding"]).is_file():
        return f"text embedding '{row['text_embedding']}' does not exist ({encode_hint})"
    embedding = load_file(folder / row["text_embedding"])
    if not {"prompt_embeds", "pooled_prompt_embeds"} <= set(embedding):
        return f"text embedding '{row['text_embedding']}' lacks prompt_embeds / pooled_prompt_embeds"
    return None


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
        problem = _row_problem(folder, row, face_model)
        if problem:
            problems.append(f"manifest.jsonl row {number}: {problem}")
            continue
        samples.append(Sample(number, row["prompt"], folder / row["target"],
                              [folder / p for p in row["references"]], folder / row["text_embedding"],
                              row.get("identities")))
    if problems and on_bad_rows == "error":
        listing = "\n  ".join(problems)
        raise UMOError(f"bad training data (use --on-bad-rows skip to leave these rows out):\n  {listing}")
    if not samples:
        raise UMOError(f"no usable rows in '{manifest}'")
    return samples, problems
