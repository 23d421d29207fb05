"""Every person, exactly once: who is present, missing or shown twice (IdentityMatch), the `complete` ranking,
and how both are shown (table, JSON, annotated picture). The composites put real LFW photos side by side."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from tests.group_photos import group_photo
from umo_core.faces.annotate import DUPLICATE_LABEL, UNMATCHED, annotate, reference_colour
from umo_core.faces.matching import IdentityMatch, assign, match_identities
from umo_core.faces.scoring import CRITERIA, rank, ranking_key, score_images, score_table

THRESHOLD = 0.45  # the fixture recogniser's same-person cosine


def _match(similarity: list[list[float]]) -> IdentityMatch:
    """A match of the given cosines (the embeddings play no part in presence)."""
    s = torch.tensor(similarity)
    return IdentityMatch(torch.zeros(s.shape[0], 4), torch.zeros(s.shape[1], 4), s, assign(s), THRESHOLD)


def test_present_missing_duplicates_and_bystanders():
    match = _match([[0.9, 0.1, 0.7, 0.0],   # R1: face 0, and face 2 is R1 again
                    [0.1, 0.2, 0.0, 0.1],   # R2: only doubtful faces
                    [0.0, 0.1, 0.1, 0.8]])  # R3: face 3
    assert match.assignment[0] == 0 and match.assignment[2] == 3 and match.assignment[1] in (1, 2)
    assert match.present == [0, 2] and match.missing == [1] and match.coverage == pytest.approx(2 / 3)
    assert match.duplicates == {2: 0}  # face 2 shows R1 again (whether or not R2 took it doubtfully)
    assert match.bystanders == [1]
    assert not match.complete
    assert [match.face_role(j).kind for j in range(4)] == ["match", "doubtful" if match.assignment[1] == 1
                                                          else "bystander", "duplicate", "match"]
    as_json = match.to_json()
    assert as_json["missing"] == [1] and as_json["present"] == [0, 2]  # 0-based
    assert as_json["duplicates"] == [{"face": 2, "reference": 0, "similarity": pytest.approx(0.7)}]


def test_a_doubtful_match_that_is_another_person_again_is_a_duplicate():
    # Two faces of R1, R2 absent: the assignment gives R2 the second R1 face (doubtfully).
    match = _match([[0.9, 0.8], [0.1, 0.2]])
    assert match.assignment == [0, 1] and match.missing == [1]
    assert match.duplicates == {1: 0} and match.bystanders == []
    assert match.face_role(1).kind == "duplicate"


def test_no_faces_and_more_references_than_faces():
    empty = match_identities(torch.eye(3)[:2], torch.zeros(0, 3), THRESHOLD)
    assert empty.missing == [0, 1] and empty.coverage == 0.0 and empty.duplicates == {} and empty.bystanders == []
    one_face = _match([[0.9], [0.3]])
    assert one_face.present == [0] and one_face.missing == [1] and one_face.to_json()["assignment"] == [0, None]
    assert _match([[0.9, 0.1], [0.2, 0.8]]).complete


def _metrics(coverage, duplicates, present_sim, mimr):
    return {"coverage": coverage, "duplicates": duplicates, "present_sim": present_sim, "mimr": mimr,
            "id_sim": None, "id_conf": None}


def test_complete_ranks_by_presence_then_duplicates_then_quality():
    images = [_metrics(0.5, 0, 0.99, 0.9),  # one person missing, however good the other
              _metrics(1.0, 1, 0.95, 0.5),  # everyone, one twice
              _metrics(1.0, 0, 0.60, 0.1),  # everyone once, weakly, in a crowd (a low MIMR)
              _metrics(1.0, 0, 0.80, 0.0),  # everyone once, better
              _metrics(0.0, 0, None, None),  # no face
              _metrics(0.0, 0, None, -0.2)]  # strangers only
    order = sorted(range(len(images)), key=lambda i: ranking_key(images[i], "complete"))
    assert order == [3, 2, 1, 0, 5, 4]
    assert sorted(range(len(images)), key=lambda i: ranking_key(images[i], "mimr")) == [0, 1, 2, 3, 5, 4]
    assert CRITERIA[0] == "complete"
    with pytest.raises(ValueError, match="criterion must be one of"):
        ranking_key(images[0], "coverage")


def _photo(photos, name: str, mirrored: bool = False) -> Image.Image:
    image = Image.open(photos / name).convert("RGB")
    return ImageOps.mirror(image) if mirrored else image


@pytest.fixture(scope="module")
def composites(face_model, photos):
    """References Rob Lowe (0001) and Nathalie Baye (0002); candidates built from other photos of them (Rob's
    0002, Nathalie mirrored, Rob's 0002 mirrored as a second Rob) and two strangers, left to right."""
    rob, second_rob = _photo(photos, "Rob_Lowe_0002.jpg"), _photo(photos, "Rob_Lowe_0002.jpg", mirrored=True)
    nathalie = _photo(photos, "Nathalie_Baye_0002.jpg", mirrored=True)
    mary, teresa = _photo(photos, "Mary_Katherine_Smart_0001_5k.jpg"), _photo(photos, "Teresa_Williams_0001_1k.jpg")
    cases = {"everyone": [rob, nathalie], "everyone and a stranger": [mary, rob, nathalie], "only Rob": [rob],
             "Rob and a stranger": [rob, teresa], "Rob twice": [rob, nathalie, second_rob],
             "Rob twice, no Nathalie": [rob, second_rob]}
    identities = face_model.identities([photos / "Rob_Lowe_0001.jpg", photos / "Nathalie_Baye_0002.jpg"])
    images = [np.asarray(group_photo(people, gap=60)) for people in cases.values()]
    seen = []
    scores = score_images(face_model, identities, iter(images), progress=seen.append, batch_size=4)
    assert seen == scores  # the progress callback saw each score, in order
    return list(cases), images, scores


def _left_to_right(score) -> list[int]:
    return list(np.argsort(score.detections.boxes[:, 0]))


def test_the_composites_report_who_is_missing_and_who_is_doubled(composites):
    names, _, scores = composites
    by_name = dict(zip(names, scores))
    assert all(score.metrics["faces"] == len(score.detections) for score in scores)
    assert [len(by_name[n].detections) for n in names] == [2, 3, 1, 2, 3, 2]
    for name in ("everyone", "everyone and a stranger"):
        assert by_name[name].match.complete and by_name[name].metrics["coverage"] == 1.0, name
    stranger = _left_to_right(by_name["everyone and a stranger"])[0]
    assert by_name["everyone and a stranger"].match.bystanders == [stranger]
    for name in ("only Rob", "Rob and a stranger"):
        assert by_name[name].match.missing == [1] and by_name[name].metrics["missing"] == [1], name
        assert by_name[name].metrics["coverage"] == 0.5 and by_name[name].metrics["duplicates"] == 0, name
    for name in ("Rob twice", "Rob twice, no Nathalie"):
        score = by_name[name]
        rob_faces = _left_to_right(score)[0::2] if name == "Rob twice" else _left_to_right(score)
        assert score.metrics["duplicates"] == 1 and list(score.match.duplicates.values()) == [0], name
        assert set(score.match.duplicates) | {score.match.assignment[0]} == set(rob_faces), name
    assert by_name["Rob twice"].match.missing == []
    assert by_name["Rob twice, no Nathalie"].match.missing == [1]
    assert by_name["Rob twice, no Nathalie"].metrics["coverage"] == 0.5


def test_complete_ranks_everyone_once_first_where_mimr_does_not(composites):
    """The issue's case: the candidate with only Rob must rank below the one with Rob, Nathalie and a stranger
    (MIMR, diluted by the stranger's face, puts it above)."""
    names, _, scores = composites
    complete = [names[i] for i in rank(scores)]
    assert set(complete[:2]) == {"everyone", "everyone and a stranger"}
    assert complete[2:] == ["Rob twice", "only Rob", "Rob and a stranger", "Rob twice, no Nathalie"]
    by_mimr = [names[i] for i in rank(scores, "mimr")]
    assert by_mimr.index("only Rob") < by_mimr.index("everyone and a stranger")


def test_the_table_says_who_is_missing_and_doubled(composites):
    names, _, scores = composites
    lines = score_table(scores, rank(scores), names)
    rows = {name: next(line for line in lines[1:] if f"  {name}  " in line) for name in names}
    assert lines[0].split()[:5] == ["rank", "image", "faces", "coverage", "duplicates"]
    assert lines[0].split()[-1] == "people"
    assert rows["only Rob"].endswith("R2 missing")
    assert "R2 missing (face" in rows["Rob and a stranger"] and "?" in rows["Rob and a stranger"]
    twice = scores[names.index("Rob twice")]
    duplicate = next(iter(twice.match.duplicates))
    assert rows["Rob twice"].endswith(f"R1 again->face {duplicate + 1} {twice.match.cosines[0][duplicate]:.2f}")
    assert "missing" not in rows["Rob twice"] and "again" not in rows["everyone and a stranger"]


def test_the_annotated_picture_numbers_the_faces_and_marks_missing_and_doubled(composites, tmp_path):
    names, images, scores = composites
    index = names.index("Rob twice, no Nathalie")
    score, image = scores[index], images[index]
    duplicate = next(iter(score.match.duplicates))
    rob = score.match.assignment[0]
    assert score.face_label(rob) == f"{rob + 1}: R1 {score.match.cosines[0][rob]:.2f}"
    assert score.face_label(duplicate) == f"{duplicate + 1}: R1 again {score.match.cosines[0][duplicate]:.2f}"
    drawn = annotate(image, score)
    Image.fromarray(drawn).save(tmp_path / "annotated.png")  # a valid picture
    x1, y1, x2, y2 = (int(round(v)) for v in score.detections.boxes[duplicate])
    assert tuple(drawn[y1 - 1, x1 + 1]) == DUPLICATE_LABEL  # the duplicate's black label
    red = reference_colour(0)
    line = max(2, round(max(image.shape[:2]) / 400))
    middle = (y1 + y2) // 2
    inner = x1 + 2 * line
    assert tuple(drawn[middle, x1]) == red and tuple(drawn[middle, inner]) == red  # a double box
    assert tuple(drawn[middle, x1 + line + 1]) != red  # with a gap between its lines
    assert tuple(drawn[1, 1]) == reference_colour(1)  # "R2 missing" on R2's colour, top left
    assert tuple(annotate(images[names.index("everyone")], scores[names.index("everyone")])[1, 1]) != \
        reference_colour(1)  # nothing there when no one is missing
    bystanders = scores[names.index("everyone and a stranger")]
    stranger = bystanders.match.bystanders[0]
    assert bystanders.face_label(stranger) == str(stranger + 1)
    box = bystanders.detections.boxes[stranger]
    drawn = annotate(images[names.index("everyone and a stranger")], bystanders)
    assert tuple(drawn[int(box[1]) - 1, int(box[0]) + 1]) == UNMATCHED  # the number on a grey label
