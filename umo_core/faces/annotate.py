"""Drawing an image's match: every face boxed and numbered as the score table numbers it, and who is missing.

- A present reference's face: a solid box and a label in the reference's colour ('2: R1 0.63').
- A doubtful match (below the face network's same-person threshold; that reference is missing): a dashed
  box in the reference's colour and a grey label ending in '?' ('1: R2 0.05?').
- A duplicate (a reference shown again): a double box in the reference's colour and a black label in that
  colour ('3: R1 again 0.61').
- A bystander: a grey box and a grey label with its number only ('4').
- Each missing reference: a line 'R2 missing' in its colour in the image's top-left corner.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .scoring import ImageScore

COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
UNMATCHED = (160, 160, 160)
DOUBTFUL_LABEL = (200, 200, 200)
DUPLICATE_LABEL = (0, 0, 0)
TEXT = (0, 0, 0)


def reference_colour(reference: int) -> tuple[int, int, int]:
    return COLOURS[reference % len(COLOURS)]


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


def _label(draw: ImageDraw.ImageDraw, corner: tuple[float, float], text: str, font: ImageFont.ImageFont,
           background: tuple, colour: tuple, line: int) -> None:
    """`text` on a `background` box whose bottom-left corner is `corner`."""
    x, y = corner
    left, top, right, bottom = draw.textbbox((x, y), text, font=font)
    height = bottom - top
    draw.rectangle((left, y - height - 2 * line, right + 2 * line, y), fill=background)
    draw.text((x + line, y - height - line - (top - y)), text, fill=colour, font=font)


def annotate(image: np.ndarray, score: ImageScore) -> np.ndarray:
    """RGB uint8 image with the faces of `score` boxed, numbered and labelled (see the module docstring)."""
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(max(image.shape[:2]) / 400))
    font = ImageFont.load_default(size=max(12, round(max(image.shape[:2]) / 50)))
    for face, box in enumerate(score.detections.boxes.tolist()):
        role = score.match.face_role(face)
        label = score.face_label(face)
        if role.kind == "bystander":
            draw.rectangle(box, outline=UNMATCHED, width=line)
            _label(draw, (box[0], box[1]), label, font, UNMATCHED, TEXT, line)
            continue
        colour = reference_colour(role.reference)
        if role.kind == "doubtful":
            _dashed_rectangle(draw, box, colour, line)
            _label(draw, (box[0], box[1]), label, font, DOUBTFUL_LABEL, TEXT, line)
        elif role.kind == "duplicate":
            draw.rectangle(box, outline=colour, width=line)
            inner = [box[0] + 2 * line, box[1] + 2 * line, box[2] - 2 * line, box[3] - 2 * line]
            draw.rectangle(inner, outline=colour, width=line)
            _label(draw, (box[0], box[1]), label, font, DUPLICATE_LABEL, colour, line)
        else:
            draw.rectangle(box, outline=colour, width=line)
            _label(draw, (box[0], box[1]), label, font, colour, TEXT, line)
    top = 0
    for reference in score.match.missing:  # one line each, top left, on the reference's colour
        text = f"R{reference + 1} missing"
        _, _, right, bottom = draw.textbbox((line, top + line), text, font=font)
        draw.rectangle((0, top, right + line, bottom + line), fill=reference_colour(reference))
        draw.text((line, top + line), text, fill=TEXT, font=font)
        top = bottom + line
    return np.asarray(canvas)
