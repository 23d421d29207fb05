"""The embedding cache: one safetensors file per photo content and face pack.

    CACHE/<pack key>/<first two hex digits>/<sha256 of the photo file>.safetensors

The pack key hashes the detector and recogniser files and the detection threshold, so another face
pack (or a changed model file) never reads stale faces, and a renamed or moved photo is not analysed
again. Files are written to a temporary name and renamed into place: an interrupted run leaves
either a whole file or none, and the next run carries on from there. Several processes can fill
one cache at once (each photo's file is written by whoever analysed it).
"""

from __future__ import annotations

import hashlib
from dataclasses import fields
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from umo_core import FaceModel
from umo_core.files import HASH_CHUNK, atomic_path

from .faces import PhotoFaces

CACHE_VERSION = "1"  # bump when PhotoFaces or how it is measured changes
_ARRAYS = [f.name for f in fields(PhotoFaces) if f.name not in ("height", "width")]


def pack_key(face_model: FaceModel) -> str:
    """16 hex digits naming the face pack's detector, recogniser and detection threshold."""
    digest = hashlib.sha256(f"v{CACHE_VERSION} threshold {face_model.detector.threshold}".encode())
    for path in (face_model.pack.detector, face_model.pack.recogniser):
        with Path(path).open("rb") as file:
            for chunk in iter(lambda file=file: file.read(HASH_CHUNK), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


class FaceCache:
    def __init__(self, root: Path, key: str):
        self.folder = root / key

    def path(self, digest: str) -> Path:
        return self.folder / digest[:2] / f"{digest}.safetensors"

    def load(self, digest: str) -> PhotoFaces | None:
        """The cached faces of a photo content, or None when not cached (or the file is unreadable)."""
        path = self.path(digest)
        if not path.is_file():
            return None
        try:
            arrays = load_file(path)
        except (SafetensorError, OSError, ValueError):
            return None  # a damaged file is analysed again and replaced
        height, width = (int(v) for v in arrays.pop("size"))
        return PhotoFaces(height=height, width=width, **{name: arrays[name] for name in _ARRAYS})

    def save(self, digest: str, faces: PhotoFaces) -> None:
        arrays = {name: np.ascontiguousarray(getattr(faces, name)) for name in _ARRAYS}
        arrays["size"] = np.array([faces.height, faces.width], np.int64)
        with atomic_path(self.path(digest)) as temporary:  # shards may write the same photo's file at once
            save_file(arrays, temporary)
