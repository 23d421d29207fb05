"""From identified faces to manifest rows: which photos are targets, and whose face is each reference.

A photo is a target when every face in it that is not background (filters.IGNORED) is usable and
identified, no identity appears twice, and it shows between --min-people and --max-people people.
The row's identities go left to right. Each person's reference is their best face (references.py)
in another photo: never the target itself or a near-duplicate of it, which would teach the model to
paste the reference (WithAnyone's paired data, arXiv 2510.14975). With --same-photo-references
a person without another photo is cropped from the target instead, and the row says so.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .faces import PhotoFaces
from .filters import IGNORED, is_near_duplicate
from .identities import FaceId
from .references import reference_quality

NO_FACE = "no face found"
UNKNOWN = "a face matches no identity"
TWICE = "two faces of one identity"
TOO_FEW = "fewer people than --min-people"
TOO_MANY = "more people than --max-people"
NO_OTHER_PHOTO = "a person has no other photo for a reference (see --same-photo-references)"
MIXED_SPLIT = "shows both training and evaluation people (--eval-fraction)"
UNREADABLE = "unreadable file"
PEOPLE_WORDS = ("no people", "one person", "two people", "three people", "four people", "five people",
                "six people", "seven people", "eight people", "nine people", "ten people")
DEFAULT_PROMPT_TEMPLATE = "a photo of {people}"


@dataclass
class Row:
    target: str  # photo name
    identities: list[str]  # left to right
    references: list[FaceId]  # the face each reference is cropped from, one per identity
    same_photo: bool  # some reference is cropped from the target (--same-photo-references)


@dataclass
class Selection:
    rows: list[Row]
    rejected: dict[str, str]  # photo name -> why it is no target
    candidates: dict[str, list[FaceId]]  # identity -> its usable faces, best reference first


def prompt_for(sidecar: str | None, people: int, template: str) -> str:
    """The sidecar prompt when there is one, else the template with {n} (a number) and {people} (words)."""
    if sidecar:
        return sidecar
    words = PEOPLE_WORDS[people] if people < len(PEOPLE_WORDS) else f"{people} people"
    return template.format(n=people, people=words)


def rank_candidates(photos: dict[str, PhotoFaces], labels: dict[FaceId, str]) -> dict[str, list[FaceId]]:
    """identity -> its labelled faces, best reference quality first (ties: by photo name)."""
    quality = {name: reference_quality(faces) for name, faces in photos.items()}
    candidates: dict[str, list[FaceId]] = {}
    for face, identity in labels.items():
        candidates.setdefault(identity, []).append(face)
    for faces in candidates.values():
        faces.sort(key=lambda face: (-float(quality[face[0]][face[1]]), face))
    return dict(sorted(candidates.items()))


def select_rows(targets: list[str], photos: dict[str, PhotoFaces], problems: dict[str, list[str | None]],
                labels: dict[FaceId, str], min_people: int, max_people: int, same_photo_references: bool,
                duplicate_bits: int) -> Selection:
    """Rows for the target photos (names, sorted); photos holds them and every other photo with labels."""
    candidates = rank_candidates(photos, labels)
    rows, rejected = [], {}
    for target in targets:
        kept = [j for j, problem in enumerate(problems[target]) if problem not in IGNORED]
        blocking = [problems[target][j] for j in kept if problems[target][j] is not None]
        identities = [labels.get((target, j)) for j in kept]
        if not problems[target]:
            rejected[target] = NO_FACE
        elif blocking:
            rejected[target] = f"a face {blocking[0]}"
        elif None in identities:
            rejected[target] = UNKNOWN
        elif len(set(identities)) < len(identities):
            rejected[target] = TWICE
        elif len(identities) < min_people:
            rejected[target] = TOO_FEW
        elif len(identities) > max_people:
            rejected[target] = TOO_MANY
        else:
            references = [_other_photo_face(candidates[identity], target, photos, duplicate_bits)
                          for identity in identities]
            same_photo = any(reference is None for reference in references)
            if same_photo and not same_photo_references:
                rejected[target] = NO_OTHER_PHOTO
                continue
            references = [reference or (target, j) for reference, j in zip(references, kept)]
            rows.append(Row(target, identities, references, same_photo))
    return Selection(rows, rejected, candidates)


def _other_photo_face(candidates: list[FaceId], target: str, photos: dict[str, PhotoFaces],
                      duplicate_bits: int) -> FaceId | None:
    """The best candidate face in a photo that is neither the target nor a near-duplicate of it."""
    for face in candidates:  # an exact copy is never a reference, even with near-duplicates kept
        if face[0] != target and not is_near_duplicate(photos[target], photos[face[0]], max(duplicate_bits, 0)):
            return face
    return None


def split_by_identity(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row], list[Row]]:
    """(training rows, evaluation rows, rows showing people of both) with no evaluation person in training.

    People are drawn in a seeded order and moved to evaluation until the rows that show only them
    reach `fraction` of all rows.
    """
    if fraction <= 0:
        return rows, [], []
    people = sorted({identity for row in rows for identity in row.identities})
    random.Random(seed).shuffle(people)
    held_out: set[str] = set()
    for person in people:
        if sum(set(row.identities) <= held_out for row in rows) >= fraction * len(rows):
            break
        held_out.add(person)
    training, evaluation, mixed = [], [], []
    for row in rows:
        shown = set(row.identities)
        (evaluation if shown <= held_out else mixed if shown & held_out else training).append(row)
    return training, evaluation, mixed
