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
