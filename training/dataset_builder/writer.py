"""Writing a data folder in the trainer's format (training/data.py, README "The ReReFL trainer").

    DATA/manifest.jsonl            one row per target photo, paths relative to DATA
    DATA/images/<photo name>       the target photos: hard links where the file system allows, else copies
    DATA/references/<identity>/    the reference crops (PNG), one per source face, shared between rows
    DATA/sheets/<identity>.png     contact sheets (main folder only)

A re-run rewrites the manifest in one step and removes the images, references and sheets it no longer
writes; text/ (training.encode_prompts' cache) is kept, and rows whose prompt is already encoded get
their text_embedding back. Only a folder this builder made (it has report.json) or an empty one is written to,
and by one run at a time (umo_core.files.folder_lock).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from umo_core import UMOError
from umo_core.console import progress
from umo_core.files import LOCK_NAME
from umo_core.images import load_image, save_image

from ..manifest import row_line, text_embedding_path, write_lines
from .faces import PhotoFaces
from .identities import FaceId
from .references import crop_box
from .rows import Row, prompt_for
from .sheets import Tile, draw_sheet, shown_faces, similarity_to_centre

REPORT_NAME = "report.json"
OWNED_FOLDERS = ("images", "references", "sheets")
TILE_MARGIN = 0.15
TILE_SIDE = 128  # px kept per contact-sheet face until the sheets are drawn


def _real(path: Path) -> str:
    return os.path.realpath(path)  # unlike Path.resolve, a name (no error) for a symlink loop


def check_output_folder(folder: Path, flag: str, cache: Path) -> None:
    """A folder may be written when it does not exist, holds nothing but the embedding cache (and a run's lock), or
    was written by this builder (it has report.json)."""
    if folder.is_symlink() and not folder.exists():
        raise UMOError(f"{flag} '{folder}' is a broken link or a symlink loop; give a folder")
    if not folder.exists():
        return
    if not folder.is_dir():
        raise UMOError(f"{flag} '{folder}' is a file; give a new or empty folder")
    others = [p for p in folder.iterdir() if p.name != LOCK_NAME and _real(p) != _real(cache)]
    if others and not (folder / REPORT_NAME).is_file():
        raise UMOError(f"{flag} '{folder}' exists and was not written by training.prepare_data (no {REPORT_NAME}); "
                       "give a new or empty folder")


def check_cache_folder(cache: Path) -> None:
    """--cache must be a folder, or a place where one can be made (its nearest existing parent a folder)."""
    existing = cache
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "a broken link or a symlink loop" if existing.is_symlink() and not existing.exists() else "a file"
        raise UMOError(f"--cache '{cache}': '{existing}' is {what}; give a folder for the embedding cache")


def reference_file(identity: str, face: FaceId) -> str:
    """references/<identity>/<source photo name, flattened>-<face>.png, relative to the data folder."""
    flat = Path(face[0]).with_suffix("").as_posix().replace("/", "__").replace(":", "_")
    return f"references/{identity}/{flat}-{face[1]}.png"


def link_target(source: Path, destination: Path) -> None:
    """The photo at destination: a hard link (no space used), or a copy across file systems."""
    if destination.exists():
        if os.path.samefile(source, destination):
            return
        stat, existing = source.stat(), destination.stat()
        if (stat.st_size, stat.st_mtime_ns) == (existing.st_size, existing.st_mtime_ns):
            return  # the copy made by an earlier run (copy2 keeps the time)
        destination.unlink()
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def crop_faces(paths: dict[str, Path], photos: dict[str, PhotoFaces], references: dict[FaceId, list[Path]],
               tiles: set[FaceId], margin: float, max_pixels: int) -> dict[FaceId, np.ndarray]:
    """Save each reference crop to its files and return the contact-sheet tiles; every photo is read once."""
    wanted: dict[str, list[tuple[int, bool]]] = {}  # photo -> (face, is a reference) to cut from it
    for face in references:
        wanted.setdefault(face[0], []).append((face[1], True))
    for face in tiles:
        wanted.setdefault(face[0], []).append((face[1], False))
    thumbnails: dict[FaceId, np.ndarray] = {}
    bar = progress(len(wanted), "crops", "photo")
    for name in sorted(wanted):
        image = Image.fromarray(load_image(paths[name], max_pixels=max_pixels))
        faces = photos[name]
        for index, is_reference in wanted[name]:
            if is_reference:
                crop = image.crop(crop_box(faces.boxes[index], faces.height, faces.width, margin))
                for destination in references[(name, index)]:
                    save_image(crop, destination)
            else:
                tile = image.crop(crop_box(faces.boxes[index], faces.height, faces.width, TILE_MARGIN))
                tile.thumbnail((TILE_SIDE, TILE_SIDE), Image.LANCZOS)
                thumbnails[(name, index)] = np.asarray(tile)
        bar.update()
    bar.close()
    return thumbnails


def manifest_rows(folder: Path, rows: list[Row], prompts: dict[str, str]) -> list[dict]:
    lines = []
    for row in rows:
        references = [reference_file(identity, face) for identity, face in zip(row.identities, row.references)]
        line = {"prompt": prompts[row.target], "target": f"images/{row.target}", "references": references}
        if (folder / text_embedding_path(line["prompt"])).is_file():
            line["text_embedding"] = text_embedding_path(line["prompt"])
        line["identities"] = row.identities
        if row.same_photo:
            line["same_photo_references"] = True
        lines.append(line)
    return lines


def remove_stale(folder: Path, written: set[Path]) -> None:
    """Delete files in the builder's sub-folders that this run did not write, and empty folders."""
    for sub in OWNED_FOLDERS:
        root = folder / sub
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*"), reverse=True):  # files before their folders
            if path.is_file() and path not in written:
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()


def write_data_folders(folders: list[tuple[Path, list[Row]]], paths: dict[str, Path], faces: dict[str, PhotoFaces],
                       labels: dict[FaceId, str], margin: float, sidecars: dict[str, str | None],
                       prompt_template: str, max_pixels: int) -> None:
    """The data folder(s) with their rows and, in the first, the contact sheets of every identity;
    each photo is read once for all its crops. paths: photo name -> file; sidecars: target -> its own prompt."""
    references: dict[FaceId, list[Path]] = {}
    for folder, rows in folders:
        for row in rows:
            for identity, face in zip(row.identities, row.references):
                destination = folder / reference_file(identity, face)
                if destination not in references.setdefault(face, []):
                    references[face].append(destination)
    by_identity: dict[str, dict[FaceId, np.ndarray]] = {}
    for face, identity in labels.items():
        by_identity.setdefault(identity, {})[face] = faces[face[0]].embeddings[face[1]]
    similarity = {identity: similarity_to_centre(members) for identity, members in by_identity.items()}
    shown = {identity: shown_faces(values) for identity, values in similarity.items()}
    tiles = crop_faces(paths, faces, references, {face for chosen in shown.values() for face in chosen}, margin,
                       max_pixels)
    main_folder = folders[0][0]
    written = {destination for destinations in references.values() for destination in destinations}
    for identity, chosen in shown.items():
        sheet = draw_sheet(f"{identity}: {len(similarity[identity])} faces", [
            Tile(tiles[face], face[0], similarity[identity][face], face in references) for face in chosen],
            hidden=len(similarity[identity]) - len(chosen))
        save_image(sheet, main_folder / "sheets" / f"{identity}.png")
        written.add(main_folder / "sheets" / f"{identity}.png")
    for folder, rows in folders:
        for row in rows:
            link_target(paths[row.target], folder / "images" / row.target)
            written.add(folder / "images" / row.target)
        prompts = {row.target: prompt_for(sidecars[row.target], len(row.identities), prompt_template)
                   for row in rows}
        write_lines(folder, [row_line(row) for row in manifest_rows(folder, rows, prompts)])
        remove_stale(folder, written)
