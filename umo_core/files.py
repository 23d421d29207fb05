"""Writing files so that an interruption never leaves a half-written one, with the user's usual permissions;
paths that cannot be followed."""

from __future__ import annotations

import errno
import hashlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

HASH_CHUNK = 1 << 20


def usual_file_mode() -> int:
    """The mode open() gives a new file: 0666 less the umask."""
    # Python has no getter for the umask before 3.13: setting it returns the old one, which is put back at once.
    umask = os.umask(0o077)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A fresh temporary path beside `path` to write the new file to, renamed over `path` when the block ends.

    When the block does not end (an error, Ctrl-C, a KeyboardInterrupt between the write and the rename) the
    temporary file is removed: `path` is the old file or the whole new one, and nothing else is left behind.
    Each call gets its own temporary name, so processes writing the same file (data shards) do not meet.
    `suffix` ends the temporary name, for writers that choose the format by it (PIL: ".tmp.png").
    The finished file gets the usual permissions (0666 less the umask), whatever its writer gave it: safetensors'
    save_file makes 0600 files, which a ComfyUI running as another user could not read.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name, not a file made by tempfile.mkstemp (0600, carried over by the rename to the user's data).
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}")
    try:
        yield temporary
        os.chmod(temporary, usual_file_mode())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def is_symlink_loop(path: Path) -> bool:
    """Whether following `path`'s symbolic links never ends (a link to itself, or links that point at each other).

    pathlib's exists() and is_file() just say False for such a path, and resolve() raises RuntimeError (Python
    before 3.13): callers name it instead.
    """
    try:
        os.stat(path)
    except OSError as error:
        return error.errno == errno.ELOOP
    return False


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """The one .safetensors writer of the project's tensors (LoRAs, checkpoints, text embeddings): atomic, with the
    usual permissions; views and shared storage (which safetensors refuses) are written as copies."""
    with atomic_path(Path(path)) as temporary:
        save_file({key: tensor.detach().contiguous().clone() for key, tensor in tensors.items()}, temporary,
                  metadata=metadata)


def content_hash(path: Path) -> str:
    """sha256 of the file's bytes (hex): the key of caches that must survive renaming or moving a file."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
