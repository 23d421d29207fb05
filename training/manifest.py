"""A data folder's manifest.jsonl, in one place: its row schema, how it is read and how it is written.

One JSON object per line, paths relative to the folder:

    {"prompt": "two friends at a cafe", "target": "img/0001.jpg", "references": ["ref/a.jpg", "ref/b.jpg"],
     "text_embedding": "text/0001.safetensors", "identities": ["alice", "bob"]}

`identities` (one name per reference), `text_embedding` (training.encode_prompts fills it in) and
`same_photo_references` (training.prepare_data marks rows whose references are cut from the target) are
optional. Paths stay inside the folder (no absolute paths, no `..` out of it): the folder must move to a
training machine as one; link big collections into it.

The file is UTF-8; a byte-order mark (as Windows editors write) and CRLF line ends are accepted. Blank
lines are allowed and keep their place, so row numbers are the file's line numbers. It is written in
one step (umo_core.files.atomic_path): a reader sees the old manifest or the new one, never a part.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from pathlib import Path, PurePath

from umo_core.errors import UMOError
from umo_core.files import atomic_path

MANIFEST = "manifest.jsonl"
ROW_EXAMPLE = '{"prompt": ..., "target": ..., "references": [...], "text_embedding": ...}'


def manifest_file(folder: str | Path) -> Path:
    """The manifest of a data folder; a UMOError when there is none."""
    manifest = Path(folder) / MANIFEST
    if not manifest.is_file():
        raise UMOError(f"data folder '{folder}' has no {MANIFEST} (one JSON object per line, see README)")
    return manifest


def read_lines(folder: str | Path) -> list[str]:
    """The manifest's lines without their line ends, blank ones included (line i is row i + 1); a UMOError
    when the file cannot be read, is not UTF-8 or holds no row."""
    manifest = manifest_file(folder)
    try:
        text = manifest.read_bytes().decode("utf-8-sig")  # -sig: a leading byte-order mark is dropped
    except UnicodeDecodeError as error:
        line = error.object[:error.start].count(b"\n") + 1
        raise UMOError(f"'{manifest}' is not UTF-8 text (line {line} has the byte 0x{error.object[error.start]:02x}); "
                       "save it as UTF-8") from None
    except OSError as error:
        raise UMOError(f"'{manifest}' cannot be read ({error.strerror or error})") from None
    # Split at line feeds only: str.splitlines also splits at U+2028 and others, which JSON strings may hold.
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines and not lines[-1]:
        lines.pop()
    if not any(line.strip() for line in lines):
        raise UMOError(f"'{manifest}' holds no rows; each line is one JSON object like {ROW_EXAMPLE}")
    return lines


def describe(value: object) -> str:
    """A short JSON rendering of a bad manifest value, for messages."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_row(line: str) -> dict:
    """The row object of a (non-blank) line; a UMOError saying what it is instead."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise UMOError(f"not valid JSON ({error.msg})") from None
    if not isinstance(row, dict):
        raise UMOError(f"is {describe(row)}, not a JSON object; each line is one object like {ROW_EXAMPLE}")
    return row


def relative_path(value: object, what: str) -> str:
    """`value` as a path inside the data folder, normalised (`img/./a.jpg` -> `img/a.jpg`)."""
    if not isinstance(value, str) or not value:
        raise UMOError(f"{what} must be a path (text) relative to the data folder, not {describe(value)}")
    if PurePath(value).is_absolute():
        raise UMOError(f"{what} '{value}' is an absolute path; paths are relative to the data folder, which holds "
                       "(or links to) every file, so that it can be moved as one")
    normal = posixpath.normpath(value)
    if normal == ".." or normal.startswith("../"):
        raise UMOError(f"{what} '{value}' points outside the data folder; paths stay inside it (link the file "
                       "into the folder instead)")
    return normal


def prompt_of(row: dict) -> str:
    """The row's prompt; a UMOError when it has none or it is not text."""
    if "prompt" not in row:
        raise UMOError("missing 'prompt'")
    if not isinstance(row["prompt"], str):
        raise UMOError(f"'prompt' must be text, not {describe(row['prompt'])}")
    return row["prompt"]


def check_fields(row: dict) -> tuple[str, list[str]]:
    """Every field of a training row and its type, before any file is opened; its target and references,
    normalised."""
    for key in ("prompt", "target", "references"):
        if key not in row:
            raise UMOError(f"missing '{key}'")
    prompt_of(row)
    target = relative_path(row["target"], "target")
    references = row["references"]
    if not isinstance(references, list) or not references:
        raise UMOError("'references' must be a non-empty list of image paths (one per person)")
    references = [relative_path(path, f"reference {number}") for number, path in enumerate(references, 1)]
    identities = row.get("identities")  # optional; null counts as left out
    if identities is not None:
        if not isinstance(identities, list) or not all(isinstance(name, str) for name in identities):
            raise UMOError("'identities' must be a list of names (text), one per reference, "
                           f"not {describe(identities)}")
        if len(identities) != len(references):
            raise UMOError(f"{len(identities)} identities for {len(references)} references")
    return target, references


def text_embedding_path(prompt: str) -> str:
    """Where a prompt's embedding goes when its row names no file: text/<sha256 of the prompt>.safetensors,
    relative to the data folder (so rows with one prompt share one file)."""
    return f"text/{hashlib.sha256(prompt.encode()).hexdigest()}.safetensors"


def row_line(row: dict) -> str:
    """A row as its manifest line (without the line end)."""
    return json.dumps(row, ensure_ascii=False)


def row_label(folder: str | Path, number: int) -> str:
    """How messages name a row: the manifest's path (so the folder is named) and the row number."""
    return f"'{Path(folder) / MANIFEST}' row {number}"


def write_lines(folder: Path, lines: list[str]) -> None:
    """Replace (or create) the folder's manifest with these lines, in one step."""
    with atomic_path(folder / MANIFEST) as temporary:
        temporary.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
