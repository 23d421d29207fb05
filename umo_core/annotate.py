"""Drawing matched faces: a box per face, labelled with its reference number and similarity."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .detection import Faces

COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
UNMATCHED = (160, 160, 160)


def annotate(image: np.ndarray, faces: Faces, similarity: list[list[float]],
             assignment: list[int | None]) -> np.ndarray:
    """RGB uint8 image with matched faces boxed as 'R<k> 0.63' and unmatched ones in grey."""
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(max(image.shape[:2]) / 400))
    font = ImageFont.load_default(size=max(12, round(max(image.shape[:2]) / 50)))
    owner = {j: k for k, j in enumerate(assignment) if j is not None}
    for j, box in enumerate(faces.boxes.tolist()):
        k = owner.get(j)
        colour = UNMATCHED if k is None else COLOURS[k % len(COLOURS)]
        draw.rectangle(box, outline=colour, width=line)
        if k is None:
            continue
        label = f"R{k + 1} {similarity[k][j]:.2f}"
        left, top, right, bottom = draw.textbbox((box[0], box[1]), label, font=font)
        height = bottom - top
        draw.rectangle((left, box[1] - height - 2 * line, right + 2 * line, box[1]), fill=colour)
        draw.text((box[0] + line, box[1] - height - line - (top - box[1])), label, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)
