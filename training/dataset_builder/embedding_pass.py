"""The embedding pass: every photo's faces, from the cache or detected and embedded now.

Photos are read by a pool of threads (decoding is most of the cost besides the networks) one batch
ahead of the face model; each batch's faces are embedded together and every photo's result goes to the
cache at once, so Ctrl-C loses at most the batch in flight. `shard=(k, n)` takes photo k, k+n, k+2n, ...
of the sorted list: n processes (torchrun ranks or a job array) share out one collection.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from umo_core import FaceModel, UMOError
from umo_core.console import progress
from umo_core.files import content_hash
from umo_core.images import load_image

from .cache import FaceCache
from .faces import PhotoFaces, analyse_photos
from .photos import PhotoFile


@dataclass
class PassResult:
    faces: dict[str, PhotoFaces] = field(default_factory=dict)  # photo name -> its faces
    digests: dict[str, str] = field(default_factory=dict)  # photo name -> sha256 of the file
    unreadable: dict[str, str] = field(default_factory=dict)  # photo name -> why it could not be read
    computed: int = 0  # photo contents analysed by this run (not found in the cache)
    cached: int = 0  # photos found in the cache


def _hash(photo: PhotoFile) -> tuple[str | None, str | None]:
    try:
        return content_hash(photo.path), None
    except OSError as error:
        return None, f"cannot be read ({error.strerror or error})"


def _load(photo: PhotoFile, max_pixels: int) -> tuple[np.ndarray | None, str | None]:
    try:
        return load_image(photo.path, max_pixels=max_pixels), None
    except UMOError as error:
        return None, str(error)


def embed_photos(photos: list[PhotoFile], face_model: FaceModel, cache: FaceCache, batch_size: int,
                 workers: int, max_pixels: int, shard: tuple[int, int] = (0, 1),
                 description: str = "photos") -> PassResult:
    """The faces of this shard's photos; unreadable files (and photos above `max_pixels`, see umo_core.images) are
    recorded in the result, never raised."""
    index, count = shard
    mine = photos[index::count]
    result = PassResult()
    bar = progress(len(mine), description, "photo", position=index if count > 1 else None, leave=count == 1)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        missing: dict[str, PhotoFile] = {}  # digest -> the first photo with that content
        waiting: dict[str, list[str]] = {}  # digest -> every photo name with that content
        for photo, (digest, problem) in zip(mine, pool.map(_hash, mine)):
            if digest is None:
                result.unreadable[photo.name] = problem
                bar.update()
                continue
            result.digests[photo.name] = digest
            faces = cache.load(digest) if digest not in missing else None
            if faces is not None:
                result.faces[photo.name] = faces
                result.cached += 1
                bar.update()
            else:
                missing.setdefault(digest, photo)
                waiting.setdefault(digest, []).append(photo.name)

        pending = list(missing.items())
        batches = [pending[i:i + batch_size] for i in range(0, len(pending), batch_size)]

        def submit(batch: list[tuple[str, PhotoFile]]) -> list[Future]:
            return [pool.submit(_load, photo, max_pixels) for _, photo in batch]

        loading = submit(batches[0]) if batches else []
        for number, batch in enumerate(batches):
            current, loading = loading, submit(batches[number + 1]) if number + 1 < len(batches) else []
            readable, images = [], []
            for (digest, _), future in zip(batch, current):
                image, problem = future.result()
                if image is None:
                    for name in waiting[digest]:
                        result.unreadable[name] = problem
                    bar.update(len(waiting[digest]))
                else:
                    readable.append(digest)
                    images.append(image)
            for digest, faces in zip(readable, analyse_photos(face_model, images) if images else []):
                cache.save(digest, faces)
                result.computed += 1
                for name in waiting[digest]:
                    result.faces[name] = faces
                bar.update(len(waiting[digest]))
    bar.close()
    return result
