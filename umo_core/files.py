"""Writing files so that an interruption never leaves a half-written one, with the user's usual permissions;
paths that cannot be followed; the lock that keeps two runs from writing one folder at once."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import UMOError

HASH_CHUNK = 1 << 20
LOCK_NAME = ".umo.lock"  # in a folder a run writes: "<process id> <host> <command>"


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


def _lock_holder(lock: Path) -> tuple[str, str] | None:
    """('<command> run', which process) holding the lock, when that run is still going (or on another host, where this
    cannot be told); None for no lock, a torn one or a dead run's."""
    try:
        pid, host, *command = lock.read_text(encoding="utf-8").split(maxsplit=2)
        pid = int(pid)
    except (OSError, ValueError):
        return None
    command = f"{command[0].strip()} run" if command else "run"
    if host != socket.gethostname():
        return command, f"process {pid} on host {host}"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # that run is gone: its lock is stale
    except PermissionError:
        pass  # another user's live process
    return command, f"process {pid}"


def check_folder_lock(folder: Path, flag: str) -> None:
    """A UMOError naming `flag` when another run is writing `folder` (see folder_lock)."""
    holder = _lock_holder(folder / LOCK_NAME)
    if holder:
        command, process = holder
        raise UMOError(f"{flag} '{folder}' is being written by another {command} ({process}, see "
                       f"'{folder / LOCK_NAME}'); wait for it to end, or give another {flag}. If no such run is "
                       "going on, delete that file")


@contextmanager
def folder_lock(folder: Path, flag: str, command: str) -> Iterator[None]:
    """Hold `folder`'s lock while the block runs, as `command` (e.g. 'training.rerefl'); another live run's lock is
    a UMOError naming `flag`, a dead run's is taken over. A folder made for the lock is removed with it where the
    run wrote nothing there (it stopped at an error): a refused run leaves nothing behind."""
    check_folder_lock(folder, flag)
    lock = folder / LOCK_NAME
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock.unlink(missing_ok=True)  # a stale lock
    try:
        descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        check_folder_lock(folder, flag)  # names the run that took it since the check
        raise UMOError(f"{flag} '{folder}': another run took '{lock}' at the same moment; run again") from None
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(f"{os.getpid()} {socket.gethostname()} {command}\n")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        if made and not any(folder.iterdir()):
            folder.rmdir()
