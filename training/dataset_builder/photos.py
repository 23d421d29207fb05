"""The photo collection on disk: which files are photos and their sidecar prompts (a photo's key in the embedding
cache is `umo_core.files.content_hash`)."""

from __future__ import annotations

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


def list_photos(folder: Path, flag: str) -> Listing:
    """Every image file under `folder` (sorted by name); a missing folder or one without images is an error."""
    if not folder.is_dir():
        raise UMOError(f"{flag} '{folder}' does not exist or is not a folder; give the folder of your photos")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                          p.relative_to(folder).parts))
    photos = [PhotoFile(p, p.relative_to(folder).as_posix()) for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    stems = {p.path.with_suffix("") for p in photos}
    skipped = [p.relative_to(folder).as_posix() for p in files if p.suffix.lower() not in IMAGE_SUFFIXES
               and not (p.suffix.lower() == PROMPT_SUFFIX and p.with_suffix("") in stems)]
    if not photos:
        raise UMOError(f"{flag} '{folder}' holds no photos ({', '.join(IMAGE_SUFFIXES)}); "
                       "put the photos there (sub-folders are searched too)")
    return Listing(photos, skipped)


def sidecar_prompt(photo: Path) -> str | None:
    """The text of photo.txt beside photo.jpg, when there is one and it is not blank."""
    sidecar = photo.with_suffix(PROMPT_SUFFIX)
    if not sidecar.is_file():
        return None
    text = sidecar.read_text(encoding="utf-8", errors="replace").strip()
    return text or None
