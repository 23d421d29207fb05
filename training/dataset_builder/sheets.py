"""Contact sheets: one PNG per identity with every face assigned to it, to spot a wrong match at a glance.

Faces are sorted by their cosine to the identity's mean embedding, most similar first, so a face of
someone else sits at the end with a low number. A face used as a reference has a green frame.
Identities with more than SHEET_FACES faces show the most and the least similar halves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .identities import FaceId

SHEET_FACES = 60
TILE = 96
LABEL_HEIGHT = 24
COLUMNS = 10
TITLE_HEIGHT = 22
REFERENCE_COLOUR = (40, 200, 70)
BACKGROUND = (255, 255, 255)


@dataclass
class Tile:
    image: np.ndarray  # the face with a little margin, any size
    photo: str
    similarity: float  # to the identity's mean embedding
    reference: bool  # used as a reference by some row


def shown_faces(similarity: dict[FaceId, float]) -> list[FaceId]:
    """The faces a sheet shows, in order: most similar first; over SHEET_FACES, the most and least similar halves."""
    ordered = sorted(similarity, key=lambda face: (-similarity[face], face))
    if len(ordered) <= SHEET_FACES:
        return ordered
    return ordered[:SHEET_FACES - SHEET_FACES // 2] + ordered[-(SHEET_FACES // 2):]


def similarity_to_centre(embeddings: dict[FaceId, np.ndarray]) -> dict[FaceId, float]:
    """Each face's cosine to the normalised mean of all of them (one identity's faces)."""
    centre = np.sum(list(embeddings.values()), axis=0)
    centre = centre / max(float(np.linalg.norm(centre)), 1e-12)
    return {face: float(embedding @ centre) for face, embedding in embeddings.items()}


def draw_sheet(title: str, tiles: list[Tile], hidden: int) -> Image.Image:
    """The tiles in a grid of COLUMNS under a title line; `hidden` faces were left out (see shown_faces)."""
    rows = max(1, -(-len(tiles) // COLUMNS))
    sheet = Image.new("RGB", (COLUMNS * TILE, TITLE_HEIGHT + rows * (TILE + LABEL_HEIGHT)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((4, 4), title + (f" ({hidden} middle faces not shown)" if hidden else ""), fill=(0, 0, 0), font=font)
    for index, tile in enumerate(tiles):
        x, y = index % COLUMNS * TILE, TITLE_HEIGHT + index // COLUMNS * (TILE + LABEL_HEIGHT)
        thumbnail = Image.fromarray(tile.image).convert("RGB")
        thumbnail.thumbnail((TILE - 6, TILE - 6), Image.LANCZOS)
        sheet.paste(thumbnail, (x + (TILE - thumbnail.width) // 2, y + (TILE - thumbnail.height) // 2))
        if tile.reference:
            draw.rectangle((x + 1, y + 1, x + TILE - 2, y + TILE - 2), outline=REFERENCE_COLOUR, width=3)
        name = tile.photo if len(tile.photo) <= 15 else "..." + tile.photo[-12:]
        draw.text((x + 3, y + TILE), f"{name}\n{tile.similarity:.2f}", fill=(0, 0, 0), font=font, spacing=1)
    return sheet
