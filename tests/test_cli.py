"""`python -m umo_core score` end to end on real photos, and every bad input."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import pwd
import shutil
import struct
import subprocess
import sys
import tempfile
import termios
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ASSETS, ROOT, make_pack
from tests.image_files import huge_png
from umo_core.cli import main

METRIC_KEYS = {"faces", "coverage", "duplicates", "missing", "present_sim", "mimr", "sir", "id_sim", "id_sim_matched",
               "id_conf", "bld", "sim_gt", "cp"}


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
    assert report["criterion"] == "complete"
    assert report["ranking"] == [1, 0, 2]
    assert [r["path"] for r in report["references"]] == [str(r) for r in refs]
    assert all(len(r["bbox"]) == 4 for r in report["references"])
    assert len(report["images"]) == 3
    for entry in report["images"]:
        assert set(entry) >= {"path", "faces", "similarity", "assignment", "matches", "present", "missing",
                              "duplicates", "bystanders", "metrics"}
        assert METRIC_KEYS <= set(entry["metrics"])
        assert len(entry["similarity"]) == 2 and len(entry["assignment"]) == 2
        for face in entry["faces"]:
            assert len(face["bbox"]) == 4 and np.shape(face["kps"]) == (5, 2) and 0 < face["det_score"] <= 1
    right = report["images"][1]
    # Rob Lowe is the right-hand face (x larger), Nathalie the left-hand one.
    left_face = int(np.argmin([f["bbox"][0] for f in right["faces"]]))
    assert right["assignment"] == [1 - left_face, left_face]
    assert right["metrics"]["id_sim_matched"] > 40
    assert right["present"] == [0, 1] and right["missing"] == [] and right["metrics"]["coverage"] == 1.0
    # The strangers of image 0 are matched too (Hungarian), but doubtful: below the 128-d network's 0.45.
    assert report["same_person_threshold"] == 0.45
    assert [m["doubtful"] for m in right["matches"]] == [False, False]
    others = report["images"][0]
    assert [(m["reference"], m["doubtful"]) for m in others["matches"]] == [(0, True), (1, True)]
    assert all(m["similarity"] == others["similarity"][m["reference"]][m["face"]] for m in others["matches"])
    empty = report["images"][2]
    assert empty["faces"] == [] and empty["assignment"] == [None, None]
    assert empty["metrics"]["mimr"] is None and empty["metrics"]["id_sim"] is None  # null without faces, never 0
    assert empty["missing"] == [0, 1] and empty["metrics"]["missing"] == [0, 1] and empty["metrics"]["faces"] == 0
    assert others["missing"] == [0, 1] and others["bystanders"] == [0, 1] and others["metrics"]["coverage"] == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert printed.index("right_people.png") < printed.index("others.png") < printed.index("no_face_view.jpg")
    rows = {line.split()[1]: line for line in printed.splitlines() if line[:1].isdigit()}
    assert "?" not in rows[str(images[1])] and rows[str(images[0])].count("?") == 2
    assert "? = doubtful match: cosine below 0.45" in printed
    assert "R1 missing" in rows[str(images[2])] and "R2 missing" in rows[str(images[2])]
    # stderr is not a terminal here, as in a log: no bar's redraws, a plain line at the end (console.progress)
    assert "\r" not in captured.err and [line.rsplit(",", 1)[0] for line in captured.err.splitlines()
                                         if line.startswith("scoring")] == ["scoring: 3/3 images"]
    annotated = sorted((folder / "annotated").iterdir())
    assert [p.name for p in annotated] == ["rank01_img02_right_people.png", "rank02_img01_others.png",
                                           "rank03_img03_no_face_view.png"]
    assert Image.open(annotated[0]).size == Image.open(images[1]).size


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


def test_real_command_line_in_a_terminal(pack_dir, case, tmp_path):
    """The command as a user types it, in a fresh interpreter, with the pack from $UMO_FACE_PACK and
    stderr on a terminal (a pseudo-terminal): a progress bar counts the images there."""
    _, refs, images = case
    env = dict(os.environ, UMO_FACE_PACK=str(pack_dir))
    args = [sys.executable, "-m", "umo_core", "score", "--provider", "cpu",
            "--ref", str(refs[0]), "--ref", str(refs[1]), "--image", *map(str, images)]
    terminal, terminal_end = pty.openpty()
    fcntl.ioctl(terminal_end, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 x 100 characters
    with open(tmp_path / "stdout.txt", "w") as stdout:
        process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=stdout, stderr=terminal_end)
    os.close(terminal_end)
    stderr = b""
    while True:  # read while it runs: a full terminal buffer would block the command
        try:
            chunk = os.read(terminal, 4096)
        except OSError:  # the command has closed its end
            break
        if not chunk:
            break
        stderr += chunk
    os.close(terminal)
    assert process.wait(timeout=300) == 0, stderr.decode()
    printed = (tmp_path / "stdout.txt").read_text()
    assert "ranking by complete" in printed and "right_people.png" in printed
    assert b"scoring:" in stderr and b"/3" in stderr  # tqdm's bar: "scoring:  33%|###   | 1/3 ..."


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


def test_unreadable_and_missing_files_are_named_by_role(pack_dir, case, tmp_path, capsys):
    _, refs, images = case
    missing = tmp_path / "missing.png"
    assert main(_args(pack_dir, refs, [images[0], missing])) == 2
    assert _error_line(capsys) == f"error: image 2 '{missing}' does not exist or is not a file"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(_args(pack_dir, [refs[0], broken], images)) == 2
    assert _error_line(capsys).startswith(f"error: reference 2 '{broken}' cannot be read as an image")
    assert main(_args(pack_dir, refs, images, "--gt", missing)) == 2
    assert _error_line(capsys) == f"error: --gt '{missing}' does not exist or is not a file"


def test_missing_pack(case, capsys, monkeypatch, tmp_path):
    _, refs, images = case
    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path))
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    assert main(_args("no_such_pack", refs, images)) == 2
    line = _error_line(capsys)
    assert "no_such_pack" in line and "insightface/models/no_such_pack" in line
    # A new user's first run ends here (the default pack is antelopev2): the line says where packs come from.
    assert line.endswith("(the official packs (antelopev2, buffalo_l) are insightface's release files: see 'Face "
                         "models' in the README, https://github.com/umo-identity/comfyui-umo#face-models)")


def test_an_onnx_file_as_the_pack_says_a_pack_is_a_folder(pack_dir, case, tmp_path, capsys):
    _, refs, images = case
    onnx_file = pack_dir / "det_500m.onnx"
    assert main(_args(onnx_file, refs, images, "--json", tmp_path / "report.json")) == 2
    assert _error_line(capsys) == (
        f"error: face pack '{onnx_file}' is a file, but a face pack is a folder with one SCRFD face detector (e.g. "
        "scrfd_10g_bnkps.onnx or det_10g.onnx) and one ArcFace recogniser (e.g. glintr100.onnx or w600k_r50.onnx); "
        f"give the folder that holds them (e.g. '{pack_dir}')")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_onnx(assets, case, tmp_path, capsys):
    _, refs, images = case
    pack = make_pack(tmp_path / "pack")
    (pack / "det_500m.onnx").write_bytes(b"garbage" * 100)
    assert main(_args(pack, refs, images)) == 2
    assert "det_500m.onnx" in _error_line(capsys)


def _notes(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith(("note: ", "warning: "))]


def test_ground_truth_without_a_face_says_why_sim_gt_is_null(pack_dir, case, photos, capsys):
    folder, refs, images = case
    out = folder / "gt_without_face.json"
    landscape = photos / "no_face_view.jpg"
    assert main(_args(pack_dir, refs, images[:2], "--gt", landscape, "--json", out)) == 0
    assert f"note: --gt '{landscape}' shows no face, so sim_gt and cp are null for every image; give a photo " \
           "where the people's faces are clearly visible" in _notes(capsys)
    report = json.loads(out.read_text())
    assert all(entry["metrics"]["sim_gt"] is None and entry["metrics"]["cp"] is None for entry in report["images"])
    assert report["notes"] == [f"--gt '{landscape}' shows no face, so sim_gt and cp are null for every image; "
                               "give a photo where the people's faces are clearly visible"]


def test_same_reference_twice_warns(pack_dir, case, photos, tmp_path, capsys):
    _, refs, images = case
    copy = shutil.copyfile(refs[0], tmp_path / "rob_copy.jpg")
    assert main(_args(pack_dir, [refs[0], refs[1], refs[0], copy], images[1:2])) == 0
    lines = _notes(capsys)
    first = f"reference 1 '{refs[0]}'"
    assert f"warning: reference 3 '{refs[0]}' is the same file as {first}; each reference should be a " \
           "different person (one person's two references split its faces between them)" in lines
    assert any(line.startswith(f"warning: reference 4 '{copy}' has the same content as {first};") for line in lines)
    # The face network says so too, for every pair of references that look like one person.
    assert sum("look like the same person (cosine 1.00, same person from 0.45" in line for line in lines) == 3
    assert not any("reference 2" in line for line in lines)


def test_two_detectors_in_the_pack_say_which_is_used(case, tmp_path, capsys):
    _, refs, images = case
    pack = make_pack(tmp_path / "two_detectors")
    shutil.copyfile(ASSETS / "models" / "det_2.5g.onnx", pack / "det_2.5g.onnx")
    assert main(_args(pack, refs, images[1:2])) == 0
    assert any(line.startswith("note: ") and "det_2.5g.onnx" in line and "det_500m.onnx" in line
               for line in _notes(capsys))


def test_animated_image_says_the_first_frame_is_used(pack_dir, case, photos, tmp_path, capsys):
    _, refs, _ = case
    frames = [Image.open(photos / name) for name in ("Rob_Lowe_0002.jpg", "Nathalie_Baye_0002.jpg")]
    animated = tmp_path / "animated.gif"
    frames[0].save(animated, save_all=True, append_images=frames[1:], duration=100)
    assert main(_args(pack_dir, refs, [photos / "Rob_Lowe_0002.jpg", animated])) == 0
    assert f"note: image 2 '{animated}' is animated (2 frames); using the first frame" in _notes(capsys)


def test_too_large_images_are_a_clear_error(pack_dir, case, tmp_path, capsys):
    _, refs, images = case
    bomb = huge_png(tmp_path / "bomb.png", 20000, 20000)  # PIL alone: DecompressionBombError
    assert main(_args(pack_dir, refs, [images[0], bomb])) == 2
    line = _error_line(capsys)
    assert line.startswith(f"error: image 2 '{bomb}' is 20000x20000 = 400.0 megapixels, above the limit of 100.0 "
                           "megapixels; pass --max-pixels 400000000 (or set UMO_MAX_PIXELS=400000000")
    assert main(_args(pack_dir, refs, images[:1], "--max-pixels", 62499)) == 2  # the references are 250 x 250
    assert _error_line(capsys).startswith(f"error: reference 1 '{refs[0]}' is 250x250")
    assert main(_args(pack_dir, refs, images[:1], "--max-pixels", -3)) == 2
    assert _error_line(capsys) == "error: --max-pixels is -3; give a positive number of pixels, or 0 for no limit"


def test_a_small_pixel_limit_is_shown_in_pixels(pack_dir, case, tmp_path, capsys):
    """Not "0.1 megapixels, above the limit of 0.0 megapixels"."""
    _, refs, images = case
    assert main(_args(pack_dir, refs, images[:1], "--max-pixels", 100, "--json", tmp_path / "report.json")) == 2
    assert _error_line(capsys) == (
        f"error: reference 1 '{refs[0]}' is 250x250 = 62500 pixels, above the limit of 100 pixels; pass --max-pixels "
        "62500 (or set UMO_MAX_PIXELS=62500, 0 for no limit) to read it anyway, or use a smaller copy")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("setting", ["abc", "-5", "1e8"])
def test_a_bad_pixel_limit_setting_is_one_line_before_any_work(setting, case, tmp_path, capsys, monkeypatch):
    """The variable is named, once (not as every photo's problem), before the face pack is loaded (it does not
    exist here)."""
    _, refs, images = case
    monkeypatch.setenv("UMO_MAX_PIXELS", setting)
    assert main(_args(tmp_path / "no_pack_here", refs, images, "--json", tmp_path / "report.json")) == 2
    assert _error_line(capsys) == (f"error: $UMO_MAX_PIXELS is '{setting}'; set it to a whole number of pixels "
                                   "(0 for no limit) or unset it")
    assert list(tmp_path.iterdir()) == []


def test_a_criterion_null_for_every_image_ranks_by_complete_and_says_so(pack_dir, case, photos, tmp_path, capsys):
    """id_conf needs two faces in an image: with one face or none it is null everywhere, and ranking by it would
    keep the input order (the image without a face first)."""
    _, refs, _ = case
    images = [photos / "no_face_view.jpg", photos / "Rob_Lowe_0002.jpg"]
    out = tmp_path / "report.json"
    assert main(_args(pack_dir, refs[:1], images, "--criterion", "id_conf", "--json", out)) == 0
    captured = capsys.readouterr()
    warning = ("--criterion id_conf: every image's id_conf is null (undefined: see the README's metrics table), so "
               "it cannot rank them; ranked by complete instead")
    assert [line for line in captured.err.splitlines() if line.startswith("warning: ")] == [f"warning: {warning}"]
    assert "ranking by complete, best first:" in captured.out
    report = json.loads(out.read_text())
    assert report["criterion"] == "complete" and report["ranking"] == [1, 0] and warning in report["notes"]
    assert all(entry["metrics"]["id_conf"] is None for entry in report["images"])


def test_every_score_option_says_its_default(capsys):
    """`score --help`: each option's text gives its default, or says it is required."""
    from umo_core.cli import _parser

    commands = next(action for action in _parser()._actions if isinstance(action, argparse._SubParsersAction))
    options = [action for action in commands.choices["score"]._actions if action.dest != "help"]
    assert len(options) == 10
    for action in options:
        assert action.help and ("(default" in action.help or "(required" in action.help), action.option_strings


def _symlink_loop(path: Path) -> Path:
    path.symlink_to(path.name)  # a link to itself
    return path


LOOPS = {
    "image": lambda refs, images, loop: _args(NO_PACK, refs, [images[0], loop]),
    "reference": lambda refs, images, loop: _args(NO_PACK, [refs[0], loop], images),
    "gt": lambda refs, images, loop: _args(NO_PACK, refs, images, "--gt", loop),
    "json": lambda refs, images, loop: _args(NO_PACK, refs, images, "--json", loop),
    "annotate": lambda refs, images, loop: _args(NO_PACK, refs, images, "--annotate", loop),
    "json below": lambda refs, images, loop: _args(NO_PACK, refs, images, "--json", loop / "report.json"),
    "faces": lambda refs, images, loop: _args(loop, refs, images),
}
LOOP_LINES = {
    "image": "error: image 2 '{loop}' is a symbolic link loop (its links lead back to themselves); give the image "
             "file itself",
    "reference": "error: reference 2 '{loop}' is a symbolic link loop (its links lead back to themselves); give the "
                 "image file itself",
    "gt": "error: --gt '{loop}' is a symbolic link loop (its links lead back to themselves); give the image file "
          "itself",
    "json": "error: --json '{loop}' is a symbolic link loop (its links lead back to themselves); give another file "
            "name",
    "annotate": "error: --annotate '{loop}' is a symbolic link loop (its links lead back to themselves); give "
                "another folder",
    "json below": "error: --json '{loop}/report.json' is a symbolic link loop (its links lead back to themselves); "
                  "give another file name",
    "faces": "error: face pack '{loop}' is a symbolic link loop (its links lead back to themselves); give the pack's "
             "folder itself",
}
NO_PACK = Path("/nonexistent/no_pack_here")


@pytest.mark.parametrize("role", list(LOOPS))
def test_a_symlink_loop_is_one_line_naming_it(role, case, tmp_path, capsys):
    """Not pathlib's RuntimeError traceback. Before any work: the face pack given does not exist (except where the
    pack is the loop), and nothing is written."""
    _, refs, images = case
    loop = _symlink_loop(tmp_path / "loop")
    args = LOOPS[role](refs, images, loop)
    for flag, output in (("--json", tmp_path / "report.json"), ("--annotate", tmp_path / "annotated")):
        if flag not in args:
            args += [flag, str(output)]
    assert main(args) == 2
    assert _error_line(capsys) == LOOP_LINES[role].format(loop=loop)
    assert [p.name for p in tmp_path.iterdir()] == ["loop"]


def test_a_missing_last_image_is_named_before_any_work(case, tmp_path, capsys):
    _, refs, images = case
    missing = tmp_path / "typo.png"
    assert main(_args(NO_PACK, refs, [*images, missing])) == 2
    assert _error_line(capsys) == f"error: image 4 '{missing}' does not exist or is not a file"


BAD_OUTPUTS = {
    "json onto a folder": ("--json", lambda tmp, inputs: tmp, "is a folder; give a file name such as"),
    "json into /proc": ("--json", lambda tmp, inputs: "/proc/umo_report.json", "cannot create files in '/proc'"),
    "json below a file": ("--json", lambda tmp, inputs: inputs[0] / "report.json", "is a file, not a folder"),
    "json onto an input photo": ("--json", lambda tmp, inputs: inputs[1], "is one of the input photos"),
    "annotate onto a file": ("--annotate", lambda tmp, inputs: inputs[0], "is a file; give a folder"),
    "annotate into /proc": ("--annotate", lambda tmp, inputs: "/proc/umo_annotated", "cannot create files in '/proc'"),
}


@pytest.mark.parametrize("name", list(BAD_OUTPUTS))
def test_bad_output_paths_fail_before_any_work(name, case, tmp_path, capsys):
    """One error line, exit 2, before the face pack is loaded: the pack path given does not even exist."""
    _, refs, images = case
    flag, target, message = BAD_OUTPUTS[name]
    target = target(tmp_path, images)
    assert main(_args(tmp_path / "no_pack_here", refs, images, flag, target)) == 2
    line = _error_line(capsys)
    assert line.startswith(f"error: {flag} '{target}'") and message in line, line


NO_CAPABILITIES = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]


def _unprivileged() -> tuple[list[str], pwd.struct_passwd | None] | str:
    """How to run a command that a folder's permission bits stop: (a command prefix, a user to switch to), or
    why there is no way.

    Not root: as is. Root (permission bits do not stop it): first still uid 0 but without any capability
    (setpriv), so mode bits apply to it like to any owner and the interpreter stays reachable (pyenv's lives
    under /root, which `nobody` cannot enter); else as `nobody` (needs the interpreter and this checkout
    readable by everyone). Each way is tried with a short probe that imports the CLI."""
    if os.geteuid() != 0:
        return [], None
    probe = [sys.executable, "-c", "import re, umo_core.cli; "
             "print(re.search(r'CapEff:\\s+(\\w+)', open('/proc/self/status').read())[1])"]
    tried = []
    if shutil.which("setpriv"):
        result = subprocess.run(NO_CAPABILITIES + probe, cwd=ROOT, capture_output=True, text=True, timeout=300)
        if result.returncode == 0 and int(result.stdout.split()[-1], 16) == 0:
            return NO_CAPABILITIES, None
        tried.append(f"setpriv without capabilities failed: {result.stderr.strip()[-300:]}")
    else:
        tried.append("no setpriv (util-linux) to drop root's capabilities")
    try:
        nobody = pwd.getpwnam("nobody")
        result = subprocess.run(probe, cwd=ROOT, capture_output=True, text=True, timeout=300,
                                user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[])
        if result.returncode == 0:
            return [], nobody
        tried.append(f"as nobody the interpreter or this checkout is not readable: {result.stderr.strip()[-300:]}")
    except (KeyError, OSError) as error:
        tried.append(f"cannot run as nobody: {error}")
    return "running as root without a way to drop privileges, so a read-only folder would not stop the CLI: " + \
        "; ".join(tried)


def test_json_into_a_read_only_folder_fails_before_any_work(photos, tmp_path):
    """The real command, run by a user that a folder's permission bits stop (see _unprivileged): one error
    line, exit 2, before the face pack is loaded (the pack path given does not exist). The read-only folder is
    owned by that user, in a fresh folder everyone can enter (pytest's tmp_path is root's alone)."""
    how = _unprivileged()
    if isinstance(how, str):
        pytest.skip(how)
    prefix, user = how
    scratch = Path(tempfile.mkdtemp(prefix="umo_read_only_"))
    try:
        scratch.chmod(0o755)
        refs = [shutil.copyfile(photos / name, scratch / name) for name in ("Rob_Lowe_0001.jpg", "Rob_Lowe_0002.jpg")]
        locked = scratch / "locked"
        locked.mkdir()
        switch = {}
        if user is not None:
            os.chown(locked, user.pw_uid, user.pw_gid)
            switch = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        locked.chmod(0o555)
        args = _args(tmp_path / "no_pack_here", refs[:1], refs[1:], "--json", locked / "report.json")
        result = subprocess.run([*prefix, sys.executable, "-m", "umo_core", *args], cwd=ROOT, capture_output=True,
                                text=True, timeout=300, **switch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert f"cannot create files in '{locked}' (Permission denied)" in errors[0], errors[0]


def test_every_command_takes_its_default_face_pack_from_umo_face_pack(monkeypatch):
    """One rule (face_pack.default_face_pack) for score, evaluate, prepare_data and the trainer (generate's
    reference check: tests/test_bad_inputs_train.py)."""
    from training.config import parse_config
    from training.prepare_data import parse_args
    from umo_core.cli import _parser

    def defaults() -> list[str]:
        return [_parser().parse_args(["score", "--ref", "a.jpg", "--image", "b.jpg"]).faces,
                _parser().parse_args(["evaluate", "bench", "--out", "out"]).faces,
                parse_args(["--photos", "photos", "--out", "out"]).faces,
                parse_config(["--data", "data", "--check-data"]).faces]

    monkeypatch.setenv("UMO_FACE_PACK", "/packs/team_pack")
    assert defaults() == ["/packs/team_pack"] * 4
    monkeypatch.delenv("UMO_FACE_PACK")
    assert defaults() == ["antelopev2"] * 4
