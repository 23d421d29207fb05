"""`python -m umo_core score` end to end on real photos, and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, make_pack
from umo_core.cli import main

METRIC_KEYS = {"mimr", "sir", "id_sim", "id_sim_matched", "id_conf", "bld", "sim_gt", "cp"}


def _side_by_side(paths, out):
    tiles = [Image.open(p).convert("RGB") for p in paths]
    canvas = Image.new("RGB", (sum(t.width for t in tiles), max(t.height for t in tiles)))
    x = 0
    for tile in tiles:
        canvas.paste(tile, (x, 0))
        x += tile.width
    canvas.save(out)
    return out


@pytest.fixture(scope="module")
def case(photos, tmp_path_factory):
    """References Rob Lowe + Nathalie Baye; image 0 shows other people, image 1 the reference people
    (another photo of Rob Lowe, and Nathalie mirrored), image 2 no one."""
    folder = tmp_path_factory.mktemp("cli")
    nathalie_mirrored = folder / "nathalie_mirrored.png"
    Image.open(photos / "Nathalie_Baye_0002.jpg").transpose(Image.FLIP_LEFT_RIGHT).save(nathalie_mirrored)
    others = _side_by_side([photos / "Mary_Katherine_Smart_0001_5k.jpg", photos / "Teresa_Williams_0001_1k.jpg"],
                           folder / "others.png")
    right = _side_by_side([nathalie_mirrored, photos / "Rob_Lowe_0002.jpg"], folder / "right_people.png")
    refs = [photos / "Rob_Lowe_0001.jpg", photos / "Nathalie_Baye_0002.jpg"]
    return folder, refs, [others, right, photos / "no_face_view.jpg"]


def _args(pack, refs, images, *extra):
    args = ["score", "--faces", str(pack), "--provider", "cpu"]
    for ref in refs:
        args += ["--ref", str(ref)]
    for image in images:
        args += ["--image", str(image)]
    return args + [str(e) for e in extra]


def test_score_ranks_the_right_people_first_and_writes_json(pack_dir, case, capsys):
    folder, refs, images = case
    out = folder / "report.json"
    assert main(_args(pack_dir, refs, images, "--json", out, "--annotate", folder / "annotated")) == 0
    report = json.loads(out.read_text())
    assert report["criterion"] == "mimr"
    assert report["ranking"] == [1, 0, 2]
    assert [r["path"] for r in report["references"]] == [str(r) for r in refs]
    assert all(len(r["bbox"]) == 4 for r in report["references"])
    assert len(report["images"]) == 3
    for entry in report["images"]:
        assert set(entry) >= {"path", "faces", "similarity", "assignment", "metrics"}
        assert METRIC_KEYS <= set(entry["metrics"])
        assert len(entry["similarity"]) == 2 and len(entry["assignment"]) == 2
        for face in entry["faces"]:
            assert len(face["bbox"]) == 4 and np.shape(face["kps"]) == (5, 2) and 0 < face["det_score"] <= 1
    right = report["images"][1]
    # Rob Lowe is the right-hand face (x larger), Nathalie the left-hand one.
    left_face = int(np.argmin([f["bbox"][0] for f in right["faces"]]))
    assert right["assignment"] == [1 - left_face, left_face]
    assert right["metrics"]["id_sim_matched"] > 40
    empty = report["images"][2]
    assert empty["faces"] == [] and empty["assignment"] == [None, None]
    assert empty["metrics"]["mimr"] == 0 and empty["metrics"]["id_conf"] is None
    printed = capsys.readouterr().out
    assert printed.index("right_people.png") < printed.index("others.png") < printed.index("no_face_view.jpg")
    annotated = sorted((folder / "annotated").iterdir())
    assert [p.name for p in annotated] == ["00_others.png", "01_right_people.png", "02_no_face_view.png"]
    assert Image.open(annotated[1]).size == Image.open(images[1]).size


def test_criteria_and_ground_truth(pack_dir, case, photos):
    folder, refs, images = case
    out = folder / "gt.json"
    assert main(_args(pack_dir, refs[:1], images[:2], "--criterion", "id_sim", "--gt", photos / "Rob_Lowe_0002.jpg",
                      "--json", out)) == 0
    report = json.loads(out.read_text())
    assert report["criterion"] == "id_sim" and report["ranking"] == [1, 0]
    right = report["images"][1]["metrics"]
    assert right["sim_gt"] is not None and right["sim_gt"] > 0.9  # the image holds the ground-truth photo itself
    assert right["cp"] is not None and right["cp"] < -0.5  # closer to the target than to the reference


def test_real_command_line(pack_dir, case, tmp_path):
    """The command as a user types it, in a fresh interpreter, with the pack from $UMO_FACE_PACK."""
    _, refs, images = case
    env = dict(os.environ, UMO_FACE_PACK=str(pack_dir))
    args = [sys.executable, "-m", "umo_core", "score", "--provider", "cpu",
            "--ref", str(refs[0]), "--ref", str(refs[1]), "--image", str(images[1])]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ranking by mimr" in done.stdout and "right_people.png" in done.stdout


def _error_line(capsys):
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_reference_without_face(pack_dir, case, photos, capsys):
    _, refs, images = case
    assert main(_args(pack_dir, [refs[0], photos / "no_face_view.jpg"], images[:1])) == 2
    line = _error_line(capsys)
    assert "reference 2" in line and "no_face_view.jpg" in line and "no face" in line


def test_reference_with_several_faces_says_so(pack_dir, case, photos, capsys):
    _, _, images = case
    assert main(_args(pack_dir, [photos / "t1_six_people.jpg"], images[:1])) == 0
    assert "6 faces; using the largest" in capsys.readouterr().err


def test_unreadable_and_missing_images(pack_dir, case, tmp_path, capsys):
    _, refs, images = case
    assert main(_args(pack_dir, refs, [tmp_path / "missing.png"])) == 2
    assert "missing.png" in _error_line(capsys)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(_args(pack_dir, [broken], images)) == 2
    assert "broken.jpg" in _error_line(capsys)


def test_missing_pack(case, capsys, monkeypatch, tmp_path):
    _, refs, images = case
    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path))
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    assert main(_args("no_such_pack", refs, images)) == 2
    line = _error_line(capsys)
    assert "no_such_pack" in line and "insightface/models/no_such_pack" in line


def test_corrupt_onnx(assets, case, tmp_path, capsys):
    _, refs, images = case
    pack = make_pack(tmp_path / "pack")
    (pack / "det_500m.onnx").write_bytes(b"garbage" * 100)
    assert main(_args(pack, refs, images)) == 2
    assert "det_500m.onnx" in _error_line(capsys)
