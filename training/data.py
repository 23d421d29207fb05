"""The training data folder: `manifest.jsonl` plus images and cached text embeddings.

The manifest's rows and how it is read: training/manifest.py. The text embedding file holds `prompt_embeds`
[L, width] and, for FLUX.1, `pooled_prompt_embeds` [CLIP width] (4096 and 768 for FLUX.1; the widths the transformer
takes, or the same in every row when no transformer is given); `python -m training.encode_prompts`
writes these files and fills in `text_embedding`.

Everything is checked before training starts (and by `python -m training.rerefl --check-data`): each
bad row is one line naming the manifest (so its folder), the row and what is wrong with which of its
files; the structural checks of a row come first, then its text embedding (header only), its target (an image
with a face) and its references (each an image with a face). A usable row's `Sample` keeps what the check found
(its references' people, its target's faces and their embeddings): the training steps reuse it instead of
detecting again.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from umo_core.backbones import DEFAULT, get
from umo_core.backbones.text_embedding import checked_text_embedding_widths, widths_text
from umo_core.errors import UMOError
from umo_core.faces.face_model import AnalysedImage, FaceModel, Identities
from umo_core.images import load_image, pixel_limit

from .manifest import check_fields, manifest_file, parse_row, read_lines, relative_path, row_label

Result = TypeVar("Result")


@dataclass
class Sample:
    row: int
    prompt: str
    target: Path
    references: list[Path]
    text_embedding: Path
    names: list[str] | None  # the people's names (the manifest's "identities"), one per reference, where given
    # What the data check found, kept so that no step detects or embeds these photos again:
    identities: Identities  # the references' people (embeddings and faces; no preview crops)
    target_faces: AnalysedImage  # the target photo's faces and their embeddings, in the photo's own pixels


def _check_text_embedding(folder: Path, row: dict, widths: tuple[int, ...] | None,
                          backbone) -> tuple[str, tuple[int, ...]]:
    """The row's text embedding file (normalised) and its widths, read from the file's header; made for
    `backbone`."""
    encode_hint = ("make it with: python -m training.encode_prompts "
                   f"--data {folder} --text-encoders <diffusers FLUX folder>")
    if "text_embedding" not in row:
        raise UMOError(f"missing 'text_embedding' ({encode_hint})")
    relative = relative_path(row["text_embedding"], "text embedding")
    path = folder / relative
    if not path.is_file():
        raise UMOError(f"text embedding '{relative}' does not exist ({encode_hint})")
    found = checked_text_embedding_widths(path, f"text embedding '{relative}'",
                                          f"delete it and {encode_hint} --backbone {backbone.name}", backbone, widths)
    return relative, found


def _check_target(folder: Path, relative: str, face_model: FaceModel) -> AnalysedImage:
    """The target photo's faces with their embeddings (the ground truth of the identity metrics and losses)."""
    analysed = face_model.analyse(load_image(folder / relative, label=f"target '{relative}'"))[0]
    if not len(analysed.faces):
        raise UMOError(f"target '{relative}': no face found; the target photo must show the references' people")
    return analysed


def _check_references(folder: Path, paths: list[str], face_model: FaceModel) -> Identities:
    """The references' people (the largest face of each photo)."""
    labels = [f"reference {number} '{path}'" for number, path in enumerate(paths, 1)]
    photos = [load_image(folder / path, label=label) for path, label in zip(paths, labels)]
    # The crops are for previews; a data set keeps one Identities per row, and 150 KB a person adds up.
    return replace(face_model.identities(photos, names=labels), crops=None)


def _attempt(problems: list[str], check: Callable[..., Result], *args) -> Result | None:
    """check(*args), or None with its UMOError's message added to `problems` (the row's other checks still run)."""
    try:
        return check(*args)
    except UMOError as problem:
        problems.append(str(problem))
        return None


def check_dataset(folder: str | Path, face_model: FaceModel, text_widths: tuple[int, ...] | None = None,
                  backbone=None) -> tuple[list[Sample], list[str]]:
    """Every row of the folder checked: the usable samples and one line per bad row, in row order.

    `text_widths`: the widths the transformer takes (backbone.transformer_text_widths); without them every row's
    text embedding must have the widths most rows have. `backbone`: the one trained (default FLUX.1's); each text
    embedding must have been made for it.
    """
    folder = Path(folder)
    backbone = backbone or get(DEFAULT)
    pixel_limit()  # a bad $UMO_MAX_PIXELS is the run's one error, not every row's problem
    samples, problems = [], {}  # problems: row number -> message
    first_rows: dict[tuple, int] = {}  # (prompt, target, references) -> the first row that has them
    found_widths: dict[int, tuple[int, ...]] = {}
    for number, line in enumerate(read_lines(folder), 1):
        if not line.strip():
            continue
        try:
            row = parse_row(line)
            target, references = check_fields(row)
        except UMOError as problem:
            problems[number] = str(problem)
            continue
        key = (row["prompt"], target, tuple(references))
        if key in first_rows:
            problems[number] = (f"the same prompt, target and references as row {first_rows[key]} (a duplicate "
                                "would train twice as often; remove it)")
            continue
        first_rows[key] = number
        row_problems: list[str] = []
        text_embedding = _attempt(row_problems, _check_text_embedding, folder, row, text_widths, backbone)
        target_faces = _attempt(row_problems, _check_target, folder, target, face_model)
        identities = _attempt(row_problems, _check_references, folder, references, face_model)
        if row_problems:
            problems[number] = "; ".join(row_problems)
            continue
        text_path, found_widths[number] = text_embedding
        samples.append(Sample(number, row["prompt"], folder / target, [folder / p for p in references],
                              folder / text_path, row.get("identities"), identities, target_faces))
    if text_widths is None and samples:  # no transformer to compare with: the rows must agree
        usual = Counter(found_widths.values()).most_common(1)[0][0]
        for sample in samples:
            if found_widths[sample.row] != usual:
                problems[sample.row] = (
                    f"text embedding '{sample.text_embedding.relative_to(folder)}' has "
                    f"{widths_text(found_widths[sample.row])}; most rows have {' and '.join(map(str, usual))} "
                    "(made with other text encoders?)")
        samples = [sample for sample in samples if sample.row not in problems]
    return samples, [f"{row_label(folder, number)}: {problems[number]}" for number in sorted(problems)]


def load_dataset(folder: str | Path, face_model: FaceModel, on_bad_rows: str = "error",
                 text_widths: tuple[int, ...] | None = None, backbone=None) -> tuple[list[Sample], list[str]]:
    """Validated samples (see check_dataset) and, with on_bad_rows='skip', the report of skipped rows."""
    samples, problems = check_dataset(folder, face_model, text_widths, backbone)
    if problems and on_bad_rows == "error":
        listing = "\n  ".join(problems)
        raise UMOError(f"bad training data (use --on-bad-rows skip to leave these rows out):\n  {listing}")
    if not samples:
        raise UMOError(f"no usable rows in '{manifest_file(folder)}'")
    return samples, problems
