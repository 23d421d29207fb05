"""Writing files so that an interruption never leaves a half-written one; paths that cannot be followed."""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A fresh temporary path beside `path` to write the new file to, renamed over `path` when the block ends.

    When the block does not end (an error, Ctrl-C, a KeyboardInterrupt between the write and the rename) the
    temporary file is removed: `path` is the old file or the whole new one, and nothing else is left behind.
    Each call gets its own temporary name, so processes writing the same file (data shards) do not meet.
    `suffix` ends the temporary name, for writers that choose the format by it (PIL: ".tmp.png").
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name, not a file made by tempfile.mkstemp: that file would be 0600, and the rename would carry it over
    # to the user's data; the writer creates this one with the usual permissions.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}")
    try:
        yield temporary
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
