"""Drawing matched faces: a box per face, labelled with its reference number and similarity.

A real match: a solid box and label in the reference's colour ('R1 0.63'). A doubtful match
(below the face network's same-person threshold): a dashed box in the reference's colour and a
grey label ending in '?' ('R1 0.05?'). Unmatched faces: a grey box without a label.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .scoring import ImageScore

COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
UNMATCHED = (160, 160, 160)
DOUBTFUL_LABEL = (200, 200, 200)


def _dashed_rectangle(draw: ImageDraw.ImageDraw, box: list[float], colour: tuple, width: int) -> None:
    """A rectangle outline drawn as dashes of 3 line widths with gaps of 2."""
    x1, y1, x2, y2 = box
    dash, step = 3 * width, 5 * width
    for start in np.arange(x1, x2, step):
        end = min(start + dash, x2)
        draw.line((start, y1, end, y1), fill=colour, width=width)
        draw.line((start, y2, end, y2), fill=colour, width=width)
    for start in np.arange(y1, y2, step):
        end = min(start + dash, y2)
        draw.line((x1, start, x1, end), fill=colour, width=width)
        draw.line((x2, start, x2, end), fill=colour, width=width)


def annotate(image: np.ndarray, score: ImageScore) -> np.ndarray:
    """RGB uint8 image with the faces of `score` boxed and labelled (see the module docstring)."""
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(max(image.shape[:2]) / 400))
    font = ImageFont.load_default(size=max(12, round(max(image.shape[:2]) / 50)))
    owner = {j: k for k, j in enumerate(score.assignment) if j is not None}
    for j, box in enumerate(score.faces.boxes.tolist()):
        k = owner.get(j)
        if k is None:
            draw.rectangle(box, outline=UNMATCHED, width=line)
            continue
        colour = COLOURS[k % len(COLOURS)]
        doubtful = score.is_doubtful(k)
        if doubtful:
            _dashed_rectangle(draw, box, colour, line)
        else:
            draw.rectangle(box, outline=colour, width=line)
        label = score.match_text(k, with_face=False)
        left, top, right, bottom = draw.textbbox((box[0], box[1]), label, font=font)
        height = bottom - top
        draw.rectangle((left, box[1] - height - 2 * line, right + 2 * line, box[1]),
                       fill=DOUBTFUL_LABEL if doubtful else colour)
        draw.text((box[0] + line, box[1] - height - line - (top - box[1])), label, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)
