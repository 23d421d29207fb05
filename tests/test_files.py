"""Atomic writes: the old file or the whole new one, and no temporary file left, whatever stops the write; and
every writer's files get the usual permissions (0666 less the umask; the trainer's own files: tests/test_trainer.py,
generate's images: tests/test_bad_inputs_train.py)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import usual_mode
from umo_core.files import atomic_path, save_tensors
from umo_core.images import save_image


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


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


def test_atomic_path_gives_the_usual_permissions_whatever_the_writer_made(tmp_path, umask):
    target = tmp_path / "made_private.bin"
    with atomic_path(target) as temporary:
        temporary.write_bytes(b"data")
        os.chmod(temporary, 0o600)  # as safetensors' save_file and tempfile make their files
    assert _mode(target) == usual_mode(umask)


def test_save_tensors_writes_text_embeddings_and_loras_with_the_usual_permissions(tmp_path, umask):
    """The shared .safetensors writer (text embeddings, LoRA files, the checkpoint's LoRA): safetensors 0.8 alone
    makes 0600 files."""
    from umo_core.backbones.lora_formats import save_lora_file
    from umo_core.backbones.text_embedding import POOLED_KEY, PROMPT_KEY

    embedding = {PROMPT_KEY: torch.randn(4, 8), POOLED_KEY: torch.randn(8)[::2]}  # a view: written as a copy
    save_tensors(tmp_path / "text" / "0.safetensors", embedding)
    save_lora_file(tmp_path / "lora.safetensors", {"a.lora_A.weight": torch.zeros(2, 8)})
    for path in (tmp_path / "text" / "0.safetensors", tmp_path / "lora.safetensors"):
        assert _mode(path) == usual_mode(umask), path
    loaded = load_file(tmp_path / "text" / "0.safetensors")
    assert all(torch.equal(loaded[key], embedding[key]) for key in embedding)
    assert sorted(os.listdir(tmp_path)) == ["lora.safetensors", "text"]


def test_the_face_cache_writes_with_the_usual_permissions(tmp_path, umask):
    from training.dataset_builder.cache import FaceCache
    from training.dataset_builder.faces import PhotoFaces

    faces = PhotoFaces(height=10, width=20, difference_hash=np.zeros(64, bool), boxes=np.zeros((1, 4), np.float32),
                       keypoints=np.zeros((1, 5, 2), np.float32), scores=np.ones(1, np.float32),
                       embeddings=np.ones((1, 8), np.float32), sharpness=np.ones(1, np.float32))
    cache = FaceCache(tmp_path, "key")
    cache.save("ab" * 32, faces)
    assert _mode(cache.path("ab" * 32)) == usual_mode(umask)
    assert cache.load("ab" * 32).width == 20


def test_an_image_stopped_while_it_is_written_leaves_nothing(tmp_path, monkeypatch):
    """save_image, the writer of generate's images, the annotated copies and the data folders' crops and sheets."""
    def half_then_stopped(image, path, *_, **__):
        with open(path, "wb") as file:
            file.write(b"\x89PNG\r\n\x1a\n half of it")
        raise KeyboardInterrupt

    save_image(np.zeros((8, 8, 3), np.uint8), tmp_path / "old.png")
    monkeypatch.setattr(Image.Image, "save", half_then_stopped)
    with pytest.raises(KeyboardInterrupt):
        save_image(np.full((8, 8, 3), 255, np.uint8), tmp_path / "umo_000000.png")
    with pytest.raises(KeyboardInterrupt):
        save_image(np.full((8, 8, 3), 255, np.uint8), tmp_path / "old.png")
    assert os.listdir(tmp_path) == ["old.png"]
    monkeypatch.undo()
    with Image.open(tmp_path / "old.png") as old:
        assert np.asarray(old).max() == 0
