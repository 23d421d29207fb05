"""The photo collection on disk: which files are photos and their sidecar prompts (a photo's key in the embedding
cache is `umo_core.files.content_hash`).

Sub-folders are searched, linked ones too (a big collection is often linked together); a link back to a folder
already searched (a symlink loop, or two links to one folder) is searched once, and it and broken links are
named in a warning. Hidden files and folders (a leading dot) are left out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from umo_core import UMOError
from umo_core.images import IMAGE_SUFFIXES

PROMPT_SUFFIX = ".txt"  # photo.jpg's prompt is photo.txt beside it


@dataclass(frozen=True)
class PhotoFile:
    path: Path  # on disk
    name: str  # relative to the collection folder, with forward slashes: the photo's name everywhere


@dataclass
class Listing:
    photos: list[PhotoFile]
    skipped: list[str]  # files of the folder that are neither photos nor photos' prompts
    notes: list[str]  # links that were not followed, and why


def _walk(folder: Path, flag: str) -> tuple[list[Path], list[str]]:
    """The files under `folder`, following linked folders once each; (files, notes on links not followed)."""
    files, notes, searched = [], [], set()
    for root, folders, names in os.walk(folder, followlinks=True):
        here = Path(root)
        identity = (here.stat().st_dev, here.stat().st_ino)
        if identity in searched:
            notes.append(f"{flag} '{folder}': '{here.relative_to(folder)}' links to a folder already searched (a "
                         "symlink loop or a second link to it); its photos are taken once")
            folders.clear()
            continue
        searched.add(identity)
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in names:
            path = here / name
            if name.startswith("."):
                continue
            if path.is_file():
                files.append(path)
            elif path.is_symlink():  # os.walk lists a link it cannot follow as a file
                notes.append(f"{flag} '{folder}': '{path.relative_to(folder)}' is a broken link or a symlink loop; "
                             "skipped")
    return sorted(files), notes


def list_photos(folder: Path, flag: str) -> Listing:
    """Every image file under `folder` (sorted by name); a missing folder or one without images is an error."""
    if not folder.is_dir():
        raise UMOError(f"{flag} '{folder}' does not exist or is not a folder; give the folder of your photos")
    files, notes = _walk(folder, flag)
    photos = [PhotoFile(p, p.relative_to(folder).as_posix()) for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    stems = {p.path.with_suffix("") for p in photos}
    skipped = [p.relative_to(folder).as_posix() for p in files if p.suffix.lower() not in IMAGE_SUFFIXES
               and not (p.suffix.lower() == PROMPT_SUFFIX and p.with_suffix("") in stems)]
    if not photos:
        raise UMOError(f"{flag} '{folder}' holds no photos ({', '.join(IMAGE_SUFFIXES)}); "
                       "put the photos there (sub-folders are searched too)")
    return Listing(photos, skipped, notes)


def sidecar_prompt(photo: Path, notes: list[str]) -> str | None:
    """The text of photo.txt beside photo.jpg, when there is one and it is not blank. UTF-8 (a byte-order mark is
    dropped); other text is read as Windows-1252, which Latin-1 files are too, with a note saying so."""
    sidecar = photo.with_suffix(PROMPT_SUFFIX)
    if not sidecar.is_file():
        return None
    data = sidecar.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        text = _windows_text(data)
        notes.append(f"prompt file '{sidecar}' is not UTF-8 (byte 0x{data[error.start]:02x} at {error.start}); read "
                     f"as Windows-1252/Latin-1: '{text.strip()[:60]}'. Save it as UTF-8 if that is not the prompt")
    return text.strip() or None


def _windows_text(data: bytes) -> str:
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:  # one of the five bytes cp1252 leaves undefined: latin-1 reads every byte
        return data.decode("latin-1")
