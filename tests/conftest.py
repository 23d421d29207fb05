"""Shared fixtures: the real face models and photos of ../shared/face-assets.

On a user's machine without the assets, tests that need them skip with the reason; in CI
(CI=true) a missing assets folder is a failure, never a silent skip.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("UMO_FACE_ASSETS", ROOT.parent / "shared" / "face-assets"))
PHOTOS = ASSETS / "images" / "photos"
LFW = ASSETS / "images" / "lfw"


def _require_assets() -> Path:
    if not (ASSETS / "MANIFEST.md").is_file():
        message = f"face assets not found at {ASSETS} (set UMO_FACE_ASSETS to the face-assets folder)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return ASSETS


@pytest.fixture(scope="session")
def assets() -> Path:
    return _require_assets()


@pytest.fixture(scope="session")
def photos(assets) -> Path:
    return PHOTOS


def make_pack(directory: Path, detector: str = "det_500m.onnx") -> Path:
    """A face pack folder like insightface's: one detector and the 128-d fixture recogniser."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in (detector, "mobilefacenet_128d.onnx"):
        shutil.copyfile(ASSETS / "models" / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def pack_dir(assets, tmp_path_factory) -> Path:
    return make_pack(tmp_path_factory.mktemp("packs") / "fixture_pack")


@pytest.fixture(scope="session")
def face_model(pack_dir):
    from umo_core import load_face_model

    return load_face_model(pack_dir, provider="cpu", backend="onnx")


@pytest.fixture(scope="session")
def torch_face_model(pack_dir):
    from umo_core import load_face_model

    return load_face_model(pack_dir, provider="cpu", backend="torch")


@pytest.fixture(scope="session")
def group(face_model, photos):
    """The group photo, its faces, and one reference photo per person (a head-and-shoulders crop)."""
    import numpy as np
    from PIL import Image

    from umo_core.images import load_image

    image = load_image(photos / "t1_six_people.jpg")
    faces = face_model.detect(image)[0]
    references = []
    for x1, y1, x2, y2 in faces.boxes:
        w, h = x2 - x1, y2 - y1
        height, width = image.shape[:2]
        box = (int(max(0, x1 - w)), int(max(0, y1 - h)), int(min(width, x2 + w)), int(min(height, y2 + h)))
        references.append(np.asarray(Image.fromarray(image).crop(box)))
    return image, faces, references


@pytest.fixture(scope="module")
def trainer_inputs(assets, photos, tmp_path_factory) -> tuple[Path, Path, Path]:
    """What the trainer reads: (a folder with the tiny FLUX's transformer/ and vae/, a data folder, the face pack).
    The data folder has three rows with one random text embedding: rows 1 and 3 share a target shape, row 2's
    target is wide (another bucket)."""
    import json

    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from tests.tiny_models import random_text_embedding, save_flux_folder

    root = save_flux_folder(tmp_path_factory.mktemp("rerefl"))
    pack = make_pack(root / "pack")
    data = root / "data"
    (data / "img").mkdir(parents=True)
    (data / "text").mkdir()
    for name in ("Rob_Lowe_0001.jpg", "Rob_Lowe_0002.jpg", "Nathalie_Baye_0002.jpg", "no_face_view.jpg"):
        shutil.copyfile(photos / name, data / "img" / name)
    with Image.open(photos / "Rob_Lowe_0002.jpg") as photo:  # a landscape target: another bucket
        photo.resize((400, 250)).save(data / "img" / "wide.jpg")
    save_file(random_text_embedding(torch.Generator().manual_seed(0)), data / "text" / "0.safetensors")
    row = {"prompt": "two people", "target": "img/Rob_Lowe_0002.jpg", "text_embedding": "text/0.safetensors",
           "references": ["img/Rob_Lowe_0001.jpg", "img/Nathalie_Baye_0002.jpg"], "identities": ["rob", "nathalie"]}
    # Rows 1 and 3 share a shape (another prompt: an identical row is refused as a duplicate), row 2 is wide.
    rows = [row, {**row, "target": "img/wide.jpg"}, {**row, "prompt": "two people, again"}]
    (data / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root, data, pack


@pytest.fixture(scope="module")
def flux2_trainer_inputs(trainer_inputs, tmp_path_factory) -> tuple[Path, Path, Path]:
    """`trainer_inputs` for --backbone flux2: the tiny FLUX.2's transformer/ and vae/, the same data folder with a
    FLUX.2 text embedding (marked as FLUX.2's), the face pack."""
    import torch
    from safetensors.torch import save_file

    from tests.tiny_models import flux2_text_embedding, save_flux2_folder
    from umo_core.backbones.text_embedding import embedding_file_metadata

    _, flux1_data, pack = trainer_inputs
    root = save_flux2_folder(tmp_path_factory.mktemp("rerefl_flux2"))
    data = root / "data"
    shutil.copytree(flux1_data, data)
    save_file(flux2_text_embedding(torch.Generator().manual_seed(0)), data / "text" / "0.safetensors",
              metadata=embedding_file_metadata("flux2"))
    return root, data, pack


def trainer_args(root: Path, data: Path, pack: Path, output: Path, steps: int, *extra: str) -> list[str]:
    """The trainer's command line for `trainer_inputs` on the CPU: a tiny run (64 px, 4 sampling steps, rank 4)."""
    return ["--data", str(data), "--transformer", str(root / "transformer"), "--vae", str(root / "vae"),
            "--faces", str(pack), "--output", str(output), "--steps", str(steps), "--rank", "4",
            "--resolution", "64", "--sampling-steps", "4", "--window", "2", "--mixed-precision", "no",
            "--provider", "cpu", "--lr", "1e-3", "--checkpoint-every", "2", "--eval-every", "0", *extra]


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request) -> int:
    """The test runs under this umask (the usual one, and one that keeps files from other users); the old one
    is put back after it."""
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def usual_mode(umask: int) -> int:
    """The permissions open() gives a new file under `umask`."""
    return 0o666 & ~umask
