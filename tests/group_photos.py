"""Group photos composed from the face-assets' ArcFace-aligned LFW faces: the faces side by side with a margin, so the
detector finds them. Shared by tests/test_prepare_data.py and bench/prepare_data.py."""

from __future__ import annotations

from PIL import Image

from tests.conftest import LFW

FACE_SIDE = 224
BACKGROUND = (128, 128, 128)


def lfw_face(name: str, side: int = FACE_SIDE) -> Image.Image:
    """The LFW face `name` ("Angela_Bassett_1"), resized to `side` x `side`."""
    with Image.open(LFW / f"{name}.jpg") as face:
        return face.convert("RGB").resize((side, side), Image.LANCZOS)


def group_photo(faces: list[Image.Image], gap: int = FACE_SIDE // 2) -> Image.Image:
    """The faces side by side on a plain background, `gap` px apart and from the edges."""
    width = sum(face.width for face in faces) + gap * (len(faces) + 1)
    height = max(face.height for face in faces) + 2 * gap
    photo = Image.new("RGB", (width, height), BACKGROUND)
    x = gap
    for face in faces:
        photo.paste(face, (x, gap))
        x += face.width + gap
    return photo
