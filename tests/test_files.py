"""Atomic writes: the old file or the whole new one, and no temporary file left, whatever stops the write."""

from __future__ import annotations

import os
import stat

import pytest

from umo_core.files import atomic_path


def test_a_finished_write_replaces_the_file_with_the_usual_permissions(tmp_path):
    target = tmp_path / "deeper" / "manifest.jsonl"
    for text in ("old\n", "new\n"):
        with atomic_path(target) as temporary:
            assert temporary.parent == target.parent and temporary != target
            temporary.write_text(text)
    assert target.read_text() == "new\n" and os.listdir(target.parent) == ["manifest.jsonl"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # as open() makes it, not tempfile's 0600


@pytest.mark.parametrize("stop", [KeyboardInterrupt, OSError])
def test_an_interrupted_write_keeps_the_old_file_and_leaves_nothing(tmp_path, stop):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(stop), atomic_path(target, suffix=".tmp.png") as temporary:
        temporary.write_text("half of the new")  # Ctrl-C between the write and the rename
        raise stop()
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["report.json"]


def test_two_writers_of_one_file_get_their_own_temporaries(tmp_path):
    target = tmp_path / "ab" / "photo.safetensors"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second
        first.write_text("first")
        second.write_text("second")
    assert target.read_text() == "first" and os.listdir(target.parent) == ["photo.safetensors"]
