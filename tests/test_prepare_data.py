"""python -m training.prepare_data on real photos and the real fixture face networks.

The collection is built from the face-assets photos: group composites of the ArcFace-aligned LFW faces
(several different photos of each person, pasted with a margin so the detector finds them), the two
Rob Lowe photos (one of them inside a composite) and photos made to fail one filter each.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps
from safetensors.torch import save_file

from tests.conftest import PHOTOS, ROOT
from tests.group_photos import FACE_SIDE, group_photo, lfw_face
from tests.tiny_models import random_text_embedding, save_flux_folder
from training.dataset_builder import filters, rows
from training.dataset_builder.faces import analyse_photos
from training.manifest import text_embedding_path
from training.prepare_data import main
from training.rerefl import main as rerefl_main
from umo_core.files import LOCK_NAME
from umo_core.images import load_image

SIDECAR_PROMPT = "three colleagues at the office"
ORIENTATION_TAG = 0x0112
ROTATE_ON_DISPLAY = 6  # EXIF: the stored pixels are shown turned 90 degrees clockwise


def real_photo(name: str) -> Image.Image:
    with Image.open(PHOTOS / name) as photo:
        return photo.convert("RGB")


# photo name -> the people in it, left to right (the ground truth the identities are checked against)
PEOPLE_IN = {
    "office/group_a.jpg": ["Akhmed_Zakayev", "Angela_Bassett", "Anders_Fogh_Rasmussen"],
    "group_b.png": ["Angela_Bassett", "Akhmed_Zakayev"],
    "group_c.webp": ["Anders_Fogh_Rasmussen", "Angela_Bassett", "Abel_Pacheco"],
    "group_d_rotated.jpg": ["Abel_Pacheco", "Akhmed_Zakayev"],
    "rob_and_amber.jpg": ["Rob_Lowe", "Amber_Tamblyn"],
    "Rob_Lowe_0001.jpg": ["Rob_Lowe"],
    "amber.jpg": ["Amber_Tamblyn"],
    "ann.jpg": ["Ann_Veneman"],
    "small_face.jpg": ["Angela_Bassett"],  # and a face too small to count
}
CLUSTERING_ROWS = ["Rob_Lowe_0001.jpg", "amber.jpg", "group_b.png", "group_c.webp", "group_d_rotated.jpg",
                   "office/group_a.jpg", "rob_and_amber.jpg", "small_face.jpg"]
CLUSTERING_REJECTED = {"ann.jpg": rows.NO_OTHER_PHOTO, "group_b_copy.jpg": filters.DUPLICATE,
                       "blurry.jpg": f"a face {filters.BLURRY}", "cut.jpg": f"a face {filters.CUT}",
                       "landscape.jpg": rows.NO_FACE, "broken.jpg": rows.UNREADABLE}
PEOPLE_FOLDERS = {"Akhmed_Zakayev": ["Akhmed_Zakayev_4"], "Angela_Bassett": ["Angela_Bassett_6"],
                  "Anders_Fogh_Rasmussen": ["Anders_Fogh_Rasmussen_4"]}


def write_collection(folder: Path) -> None:
    lfw = lfw_face
    (folder / "office").mkdir(parents=True)
    group_photo([lfw("Akhmed_Zakayev_1"), lfw("Angela_Bassett_1"), lfw("Anders_Fogh_Rasmussen_1")]).save(
        folder / "office/group_a.jpg", quality=95)
    (folder / "office/group_a.txt").write_text(SIDECAR_PROMPT + "\n")
    group_b = group_photo([lfw("Angela_Bassett_2"), lfw("Akhmed_Zakayev_2")])
    group_b.save(folder / "group_b.png")
    group_b.resize((group_b.width * 4 // 5, group_b.height * 4 // 5)).save(folder / "group_b_copy.jpg", quality=80)
    group_photo([lfw("Anders_Fogh_Rasmussen_2"), lfw("Angela_Bassett_3"), lfw("Abel_Pacheco_1")]).save(
        folder / "group_c.webp", quality=95)
    upright = group_photo([lfw("Abel_Pacheco_2"), lfw("Akhmed_Zakayev_3")])
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = ROTATE_ON_DISPLAY
    upright.transpose(Image.Transpose.ROTATE_90).save(folder / "group_d_rotated.jpg", exif=exif, quality=95)
    group_photo([real_photo("Rob_Lowe_0002.jpg"), lfw("Amber_Tamblyn_1")]).save(folder / "rob_and_amber.jpg")
    shutil.copyfile(PHOTOS / "Rob_Lowe_0001.jpg", folder / "Rob_Lowe_0001.jpg")
    group_photo([lfw("Amber_Tamblyn_2")]).save(folder / "amber.jpg", quality=95)
    group_photo([lfw("Ann_Veneman_1")]).save(folder / "ann.jpg", quality=95)
    group_photo([lfw("Angela_Bassett_4")]).filter(ImageFilter.GaussianBlur(4)).save(folder / "blurry.jpg")
    cut = group_photo([lfw("Anders_Fogh_Rasmussen_3"), lfw("Ann_Veneman_2")])
    cut.crop((0, 0, cut.width - FACE_SIDE // 2 - 90, cut.height)).save(folder / "cut.jpg")  # Ann's right part cut off
    small = group_photo([lfw("Angela_Bassett_5"), lfw("Abel_Pacheco_1", side=48)])
    small.save(folder / "small_face.jpg", quality=95)
    shutil.copyfile(PHOTOS / "no_face_view.jpg", folder / "landscape.jpg")
    (folder / "broken.jpg").write_text("not a photo")
    (folder / "notes.md").write_text("a file that is not a photo")


def write_people(folder: Path) -> None:
    for person, faces in PEOPLE_FOLDERS.items():
        (folder / person).mkdir(parents=True)
        for face in faces:
            group_photo([lfw_face(face)]).save(folder / person / f"{face}.jpg", quality=95)
    (folder / "Rob_Lowe").mkdir()
    shutil.copyfile(PHOTOS / "Rob_Lowe_0001.jpg", folder / "Rob_Lowe" / "Rob_Lowe_0001.jpg")  # also a target


@pytest.fixture(scope="module")
def inputs(assets, pack_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare_data")
    write_collection(root / "photos")
    write_people(root / "people")
    return root, pack_dir


def build(root: Path, pack: Path, out: Path, *extra: str, photos: Path | None = None) -> int:
    return main(["--photos", str(photos or root / "photos"), "--out", str(out), "--faces", str(pack),
                 "--provider", "cpu", "--cache", str(root / "cache"), *extra])


def manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


@pytest.fixture(scope="module")
def clustered(inputs):
    root, pack = inputs
    out = root / "clustered"
    assert build(root, pack, out) == 0
    return out


def _face_embedding(face_model, image) -> np.ndarray:
    analysed = face_model.analyse([image])[0]
    assert len(analysed.faces) == 1
    return analysed.embeddings[0].numpy()


def test_clustering_finds_each_person_once_and_references_come_from_other_photos(inputs, clustered, face_model):
    lines = manifest(clustered)
    assert [line["target"] for line in lines] == [f"images/{name}" for name in CLUSTERING_ROWS]
    # Cluster names map one to one onto the real people: nobody split, no two people in one cluster.
    person_of = {}
    for line in lines:
        truth = PEOPLE_IN[line["target"].removeprefix("images/")]
        assert len(line["identities"]) == len(truth) == len(line["references"])
        for cluster, person in zip(line["identities"], truth):
            assert person_of.setdefault(cluster, person) == person
    assert len(set(person_of.values())) == len(person_of) == 6  # Ann is seen once: no row
    assert all(cluster.startswith("person_") for cluster in person_of)

    for line in lines:
        assert (clustered / line["target"]).is_file() and "text_embedding" not in line
        for identity, reference in zip(line["identities"], line["references"]):
            assert reference.startswith(f"references/{identity}/")
            source = reference.split("/")[-1].rsplit("-", 1)[0].replace("__", "/")
            assert not line["target"].removeprefix("images/").startswith(source)  # never the target itself
    by_target = {line["target"]: line for line in lines}
    assert by_target["images/office/group_a.jpg"]["prompt"] == SIDECAR_PROMPT
    assert by_target["images/group_b.png"]["prompt"] == "a photo of two people"
    assert by_target["images/amber.jpg"]["prompt"] == "a photo of one person"

    # Rob in the composite gets his reference from the other photo (0001), never from the composite (0002).
    composite = by_target["images/rob_and_amber.jpg"]
    rob = composite["references"][0]
    assert "Rob_Lowe_0001" in rob
    reference = _face_embedding(face_model, load_image(clustered / rob))
    assert reference @ _face_embedding(face_model, PHOTOS / "Rob_Lowe_0001.jpg") > 0.95
    assert reference @ _face_embedding(face_model, PHOTOS / "Rob_Lowe_0002.jpg") < 0.9
    assert "rob_and_amber" in by_target["images/Rob_Lowe_0001.jpg"]["references"][0]


def test_report_and_contact_sheets_count_what_happened(clustered):
    result = report(clustered)
    assert result["mode"] == "clustering"
    assert result["photos"]["found"] == 14 and result["photos"]["read"] == 13
    assert list(result["photos"]["unreadable"]) == ["broken.jpg"]
    assert result["photos"]["near_duplicates"] == {"group_b_copy.jpg": "group_b.png"}
    assert result["photos"]["skipped_files"] == ["notes.md"]  # group_a.txt is a prompt, not skipped
    assert result["rejected_photos"] == dict(sorted(CLUSTERING_REJECTED.items()))
    assert result["rows"]["written"] == len(CLUSTERING_ROWS) and result["rows"]["evaluation"] == 0
    assert result["faces"]["rejected"] == {filters.SMALL: 1, filters.BLURRY: 1, filters.CUT: 1}
    # 20 faces in the 13 photos left after the duplicate: 17 usable (all identified) + small + blurry + cut
    assert result["faces"]["found"] == 20 and result["faces"]["usable"] == 17 and result["faces"]["unknown"] == 0
    identities = result["identities"]
    assert len(identities) == 7 and sum(entry["faces"] for entry in identities.values()) == 17
    (ann,) = result["single_photo_identities"]
    assert identities[ann] == {"split": "unused", "photos": 1, "faces": 1, "rows": 0, "best_reference": "ann.jpg",
                               "references": {}}
    angela = next(entry for entry in identities.values() if entry["photos"] == 4)
    assert angela["rows"] == 4 and sum(angela["references"].values()) == 4
    markdown = (clustered / "report.md").read_text()
    assert "| person_0001 |" in markdown and filters.BLURRY in markdown and "broken.jpg" in markdown
    for name, entry in identities.items():
        with Image.open(clustered / "sheets" / f"{name}.png") as sheet:  # one tile row per 10 faces
            assert sheet.height == 22 + math.ceil(entry["faces"] / 10) * (96 + 24)


def test_people_mode_matches_faces_to_the_people_folders(inputs, tmp_path):
    root, pack = inputs
    out = tmp_path / "people_data"
    assert build(root, pack, out, "--people", str(root / "people"), "--max-people", "2") == 0
    lines = {line["target"].removeprefix("images/"): line for line in manifest(out)}
    assert sorted(lines) == ["Rob_Lowe_0001.jpg", "group_b.png", "small_face.jpg"]
    for name, line in lines.items():
        assert line["identities"] == PEOPLE_IN[name]
    # The people folder's Rob_Lowe_0001.jpg is the target's own file: his reference is the composite's face.
    assert lines["Rob_Lowe_0001.jpg"]["references"] == ["references/Rob_Lowe/rob_and_amber-0.png"]
    assert all("group_b" not in reference for reference in lines["group_b.png"]["references"])
    rejected = report(out)["rejected_photos"]
    assert rejected["office/group_a.jpg"] == rows.TOO_MANY
    for name in ("group_c.webp", "group_d_rotated.jpg", "rob_and_amber.jpg", "amber.jpg", "ann.jpg"):
        assert rejected[name] == rows.UNKNOWN  # Abel, Amber and Ann have no people folder
    assert report(out)["faces"]["unknown"] == 5  # Abel twice, Amber twice, Ann


def test_same_photo_references_are_allowed_and_marked(inputs, tmp_path):
    root, pack = inputs
    out = tmp_path / "same_photo"
    assert build(root, pack, out, "--same-photo-references") == 0
    lines = {line["target"]: line for line in manifest(out)}
    ann = lines["images/ann.jpg"]
    assert ann["same_photo_references"] is True and ann["references"][0].endswith("/ann-0.png")
    assert sum("same_photo_references" in line for line in lines.values()) == 1
    assert report(out)["rows"]["same_photo_references"] == 1


def _add_text_embeddings(folder: Path) -> None:
    """What training.encode_prompts does, with random embeddings of the tiny test transformer's widths."""
    lines = manifest(folder)
    generator = torch.Generator().manual_seed(0)
    for line in lines:
        line["text_embedding"] = text_embedding_path(line["prompt"])
        (folder / "text").mkdir(exist_ok=True)
        save_file(random_text_embedding(generator), folder / line["text_embedding"])
    (folder / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return save_flux_folder(tmp_path_factory.mktemp("tiny_flux"))


def test_the_data_folder_and_its_evaluation_split_pass_the_data_check_and_train(inputs, tiny_models, tmp_path,
                                                                                  capsys):
    root, pack = inputs
    out, evaluation = tmp_path / "data", tmp_path / "data-eval"
    assert build(root, pack, out, "--eval-fraction", "0.3") == 0
    train_people = {i for line in manifest(out) for i in line["identities"]}
    eval_people = {i for line in manifest(evaluation) for i in line["identities"]}
    assert train_people and eval_people and not train_people & eval_people
    assert report(out)["rows"]["evaluation"] == len(manifest(evaluation))
    check = ["--check-data", "--data", str(out), "--eval-data", str(evaluation), "--faces", str(pack),
             "--provider", "cpu", "--transformer", str(tiny_models / "transformer")]
    assert rerefl_main(check) == 2  # no text embeddings yet: the rows are named with the encode_prompts hint
    assert "python -m training.encode_prompts" in capsys.readouterr().out
    _add_text_embeddings(out)
    _add_text_embeddings(evaluation)
    assert rerefl_main(check) == 0, capsys.readouterr().out
    assert "all usable" in capsys.readouterr().out
    # A re-run keeps the text embeddings the rows already have.
    assert build(root, pack, out, "--eval-fraction", "0.3") == 0
    assert all("text_embedding" in line for line in manifest(out))
    run = tmp_path / "run"
    assert rerefl_main(["--data", str(out), "--eval-data", str(evaluation), "--transformer",
                        str(tiny_models / "transformer"), "--vae", str(tiny_models / "vae"), "--faces", str(pack),
                        "--output", str(run), "--steps", "2", "--rank", "4", "--resolution", "64",
                        "--sampling-steps", "4", "--window", "2", "--mixed-precision", "no", "--provider", "cpu",
                        "--eval-every", "0"]) == 0
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_a_rerun_analyses_only_the_new_photo(inputs, tmp_path):
    root, pack = inputs
    photos = tmp_path / "photos"
    shutil.copytree(root / "photos", photos)
    cache = ["--cache", str(tmp_path / "cache")]
    assert build(root, pack, tmp_path / "out", *cache, photos=photos) == 0
    assert report(tmp_path / "out")["embedding_cache"] == {"folder": str(tmp_path / "cache"), "computed": 13,
                                                           "cached": 0}
    group_photo([lfw_face("Amber_Tamblyn_2"), lfw_face("Anders_Fogh_Rasmussen_4")]).save(photos / "new.jpg")
    assert build(root, pack, tmp_path / "out", *cache, photos=photos) == 0
    assert report(tmp_path / "out")["embedding_cache"]["computed"] == 1
    assert "images/new.jpg" in [line["target"] for line in manifest(tmp_path / "out")]


def _without_cache_counts(result: dict) -> dict:
    return {**result, "embedding_cache": None, "settings": None}


def test_two_processes_and_shards_give_the_single_process_result(inputs, clustered, tmp_path):
    root, pack = inputs
    arguments = ["--photos", str(root / "photos"), "--faces", str(pack), "--provider", "cpu", "--workers", "1"]
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "-m", "training.prepare_data", *arguments, "--out", str(tmp_path / "torchrun")],
                              cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    shards = ["--out", str(tmp_path / "shards"), "--cache", str(tmp_path / "shard_cache")]
    assert main([*arguments, *shards, "--shard", "0/2"]) == 0
    assert not (tmp_path / "shards" / "manifest.jsonl").exists()  # a shard only fills the cache
    assert main([*arguments, *shards, "--shard", "1/2"]) == 0
    assert main([*arguments, *shards]) == 0
    assert report(tmp_path / "shards")["embedding_cache"]["computed"] == 0  # the shards did all the work
    assert report(tmp_path / "torchrun")["embedding_cache"]["computed"] == 13
    for out in (tmp_path / "torchrun", tmp_path / "shards"):
        assert (out / "manifest.jsonl").read_text() == (clustered / "manifest.jsonl").read_text()
        assert _without_cache_counts(report(out)) == _without_cache_counts(report(clustered))
        for reference in {r for line in manifest(out) for r in line["references"]}:
            assert (out / reference).read_bytes() == (clustered / reference).read_bytes()


def test_ctrl_c_keeps_what_was_analysed(inputs, tmp_path):
    root, pack = inputs
    out = tmp_path / "out"
    cache = out / ".face-cache"  # the default place
    command = [sys.executable, "-m", "training.prepare_data", "--photos", str(root / "photos"), "--out", str(out),
               "--faces", str(pack), "--provider", "cpu", "--batch-size", "1"]
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(cache.rglob("*.safetensors")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, error = process.communicate(timeout=60)
    assert process.returncode == 130, error[-2000:]
    assert "run the same command again" in error and "Traceback" not in error
    done = len(list(cache.rglob("*.safetensors")))
    assert 1 <= done < 13 and not list(cache.rglob("*.tmp"))
    assert main(command[3:]) == 0  # the folder holding only the cache is taken as the builder's
    assert report(out)["embedding_cache"] == {"folder": str(cache), "computed": 13 - done, "cached": done}


def _error(capsys) -> str:
    """The one error line (after the progress bars, which also go to stderr)."""
    output = capsys.readouterr().err
    error = output.strip().splitlines()[-1]
    assert error.startswith("error: ") and "Traceback" not in output
    return error


def test_bad_inputs_are_one_clear_error_each(inputs, tmp_path, capsys):
    root, pack = inputs
    assert build(root, pack, tmp_path / "out", photos=tmp_path / "missing") == 2
    assert "--photos" in (message := _error(capsys)) and "does not exist" in message

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no photos here")
    assert build(root, pack, tmp_path / "out", photos=tmp_path / "empty") == 2
    assert "holds no photos" in _error(capsys)

    faceless = tmp_path / "faceless" / "Nobody"
    faceless.mkdir(parents=True)
    shutil.copyfile(PHOTOS / "no_face_view.jpg", faceless / "view.jpg")
    assert build(root, pack, tmp_path / "out", "--people", str(tmp_path / "faceless")) == 2
    assert "Nobody" in (message := _error(capsys)) and "no face found" in message

    nothing = tmp_path / "nothing"
    nothing.mkdir()
    shutil.copyfile(PHOTOS / "no_face_view.jpg", nothing / "view.jpg")
    (nothing / "broken.png").write_bytes(b"\x89PNG broken")
    assert build(root, pack, tmp_path / "nothing_out", photos=nothing) == 2
    message = _error(capsys)
    assert "no photo" in message and "passed the filters" in message and rows.NO_FACE in message
    assert report(tmp_path / "nothing_out")["photos"]["unreadable"].keys() == {"broken.png"}

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("someone else's folder")
    assert build(root, pack, foreign) == 2
    assert "was not written by training.prepare_data" in _error(capsys)
    assert build(root, pack, tmp_path / "out", "--shard", "2/2") == 2
    assert "--shard" in _error(capsys)


def test_a_bad_pixel_limit_setting_is_one_error_not_every_photo_unreadable(inputs, tmp_path, capsys, monkeypatch):
    """$UMO_MAX_PIXELS=abc: the variable named once, no data folder written (not every photo 'unreadable')."""
    root, pack = inputs
    monkeypatch.setenv("UMO_MAX_PIXELS", "abc")
    assert build(root, pack, tmp_path / "out") == 2
    assert _error(capsys) == ("error: $UMO_MAX_PIXELS is 'abc'; set it to a whole number of pixels (0 for no limit) "
                              "or unset it")
    assert not (tmp_path / "out").exists()


def test_unusable_out_and_cache_folders_are_named_before_any_model_loads(inputs, clustered, tmp_path, capsys):
    root, pack = inputs
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert build(root, pack, loop) == 2
    assert _error(capsys) == f"error: --out '{loop}' is a broken link or a symlink loop; give a folder"

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "a").symlink_to(foreign / "b")
    (foreign / "b").symlink_to(foreign / "a")  # a symlink loop inside a folder the builder did not write
    assert build(root, pack, foreign) == 2
    assert "was not written by training.prepare_data" in _error(capsys)
    assert sorted(p.name for p in foreign.iterdir()) == ["a", "b"]

    a_file = tmp_path / "cache_file"
    a_file.write_text("not a folder")
    for cache in (a_file, a_file / "below"):
        assert main(["--photos", str(root / "photos"), "--out", str(tmp_path / "out"), "--faces", str(pack),
                     "--provider", "cpu", "--cache", str(cache)]) == 2
        assert _error(capsys) == (f"error: --cache '{cache}': '{a_file}' is a file; give a folder for the embedding "
                                  "cache")
    assert not (tmp_path / "out").exists()

    # A data folder the builder wrote, with a symlink loop in it: written again, the loop left alone.
    written = tmp_path / "written"
    shutil.copytree(clustered, written)
    (written / "loop").symlink_to(written / "loop")
    (written / "images" / "loop").symlink_to(written / "images" / "loop")
    assert build(root, pack, written) == 0
    assert (written / "loop").is_symlink() and (written / "images" / "loop").is_symlink()
    assert (written / "manifest.jsonl").read_text() == (clustered / "manifest.jsonl").read_text()


def test_a_second_run_on_the_same_out_is_refused_and_a_dead_runs_lock_is_taken_over(inputs, clustered, tmp_path,
                                                                                      capsys):
    root, pack = inputs
    out = tmp_path / "out"
    shutil.copytree(clustered, out)
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    other_run = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    lock = out / LOCK_NAME
    try:
        lock.write_text(f"{other_run.pid} {socket.gethostname()} training.prepare_data\n")
        assert build(root, pack, out) == 2
        assert _error(capsys) == (f"error: --out '{out}' is being written by another training.prepare_data run "
                                  f"(process {other_run.pid}, see '{lock}'); wait for it to end, or give another "
                                  "--out. If no such run is going on, delete that file")
        assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file() and path != lock} == before
        assert lock.read_text() == f"{other_run.pid} {socket.gethostname()} training.prepare_data\n"
    finally:
        other_run.kill()
        other_run.wait()
    assert build(root, pack, out) == 0  # the run is gone: its lock is stale
    assert not lock.exists()


def test_a_run_whose_eval_out_another_run_writes_is_refused_and_writes_nothing(inputs, clustered, tmp_path, capsys):
    root, pack = inputs
    out, eval_out = tmp_path / "out", tmp_path / "shared-eval"
    eval_out.mkdir()
    other_run = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    lock = eval_out / LOCK_NAME
    try:
        lock.write_text(f"{other_run.pid} {socket.gethostname()} training.prepare_data\n")
        assert build(root, pack, out, "--eval-fraction", "0.3", "--eval-out", str(eval_out)) == 2
        assert _error(capsys) == (f"error: --eval-out '{eval_out}' is being written by another training.prepare_data "
                                  f"run (process {other_run.pid}, see '{lock}'); wait for it to end, or give another "
                                  "--eval-out. If no such run is going on, delete that file")
        assert not out.exists() and os.listdir(eval_out) == [LOCK_NAME]
    finally:
        other_run.kill()
        other_run.wait()


def test_ctrl_c_while_python_loads_torch_is_one_line(inputs, tmp_path):
    """The imports take seconds; a Ctrl-C then used to be a traceback from inside torch."""
    root, pack = inputs
    out = tmp_path / "out"
    command = [sys.executable, "-X", "importtime", "-m", "training.prepare_data", "--photos", str(root / "photos"),
               "--out", str(out), "--faces", str(pack), "--provider", "cpu"]
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []  # -X importtime writes a line as each module is imported: torch's come after the module's first lines
    while not lines or "torch" not in lines[-1]:
        lines.append(process.stderr.readline())
        assert lines[-1], "".join(lines)[-2000:]
    process.send_signal(signal.SIGINT)
    _, error = process.communicate(timeout=120)
    said = [line for line in error.splitlines() if not line.startswith("import time:")]
    assert process.returncode == 130 and said == ["stopped by Ctrl-C while starting: nothing was read or written"], \
        error[-3000:]
    assert not out.exists()


def test_a_person_folder_must_agree_with_itself(inputs, tmp_path, capsys):
    """Rob's folder holds a group photo where a stranger (Ann) is larger than Rob, Amber's two photos of her and one
    of Abel only: the stranger never becomes Rob, and Abel's photo is left out with a warning."""
    root, pack = inputs
    people = tmp_path / "people"
    shutil.copytree(root / "people", people)
    group_photo([lfw_face("Ann_Veneman_1"), real_photo("Rob_Lowe_0002.jpg")]).save(people / "Rob_Lowe" / "group.jpg")
    (people / "Amber_Tamblyn").mkdir()
    group_photo([lfw_face("Amber_Tamblyn_1")]).save(people / "Amber_Tamblyn" / "amber_1.jpg")
    group_photo([lfw_face("Amber_Tamblyn_2")]).resize((300, 300)).save(people / "Amber_Tamblyn" / "amber_2.jpg")
    group_photo([lfw_face("Abel_Pacheco_2")]).save(people / "Amber_Tamblyn" / "abel.jpg")
    out = tmp_path / "out"
    assert build(root, pack, out, "--people", str(people), "--max-people", "2") == 0
    warnings = capsys.readouterr().err
    assert ("warning: --people 'Amber_Tamblyn': 'Amber_Tamblyn/abel.jpg': no face in it matches the folder's other "
            "photos, so it is left out (is it a photo of Amber_Tamblyn?)") in warnings
    assert report(out)["people_photos_left_out"] == {
        "people:Amber_Tamblyn/abel.jpg": "no face in it matches Amber_Tamblyn's other photos"}
    lines = {line["target"].removeprefix("images/"): line for line in manifest(out)}
    for name, line in lines.items():
        assert line["identities"] == PEOPLE_IN[name]  # Ann is nobody's, Abel is not Amber
    assert "ann.jpg" not in lines and report(out)["rejected_photos"]["ann.jpg"] == rows.UNKNOWN
    assert lines["amber.jpg"]["identities"] == ["Amber_Tamblyn"]


def test_linked_folders_are_searched_and_loops_and_broken_links_named(inputs, tmp_path, capsys):
    root, pack = inputs
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "collection").symlink_to(root / "photos")  # a linked sub-folder: searched like any other
    (photos / "again").symlink_to(photos)  # a loop
    (photos / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    group_photo([lfw_face("Amber_Tamblyn_1")]).save(photos / "zoe.jpg")
    (photos / "zoe.txt").write_bytes("Zoé au café".encode("latin-1"))
    out = tmp_path / "out"
    assert build(root, pack, out, photos=photos) == 0
    warnings = capsys.readouterr().err
    assert (f"warning: --photos '{photos}': 'again' links to a folder already searched (a symlink loop or a second "
            "link to it); its photos are taken once") in warnings
    assert f"warning: --photos '{photos}': 'gone.jpg' is a broken link or a symlink loop; skipped" in warnings
    assert (f"warning: prompt file '{photos / 'zoe.txt'}' is not UTF-8 (byte 0xe9 at 2); read as "
            "Windows-1252/Latin-1: 'Zoé au café'") in warnings
    assert report(out)["photos"]["found"] == 15
    lines = {line["target"]: line for line in manifest(out)}
    assert lines["images/zoe.jpg"]["prompt"] == "Zoé au café"
    assert "images/collection/office/group_a.jpg" in lines


def test_mirrored_and_padded_copies_are_near_duplicates(assets, face_model):
    base = group_photo([lfw_face("Angela_Bassett_1"), lfw_face("Akhmed_Zakayev_1")])
    rob = real_photo("Rob_Lowe_0001.jpg")
    photos = {"a_base.jpg": base, "b_mirrored.jpg": ImageOps.mirror(base),
              "c_padded.jpg": ImageOps.expand(base, (0, 0, 400, 0), fill=(0, 0, 0)),
              "d_other_photos.jpg": group_photo([lfw_face("Angela_Bassett_2"), lfw_face("Akhmed_Zakayev_2")]),
              "e_rob.jpg": rob, "f_rob_mirrored.jpg": ImageOps.mirror(rob),
              "g_rob_padded.jpg": ImageOps.expand(rob, 60, fill=(255, 255, 255)),
              "h_rob_other.jpg": real_photo("Rob_Lowe_0002.jpg")}
    faces = dict(zip(photos, analyse_photos(face_model, [np.asarray(photo) for photo in photos.values()])))
    assert filters.near_duplicates(faces, filters.DEFAULT_DUPLICATE_BITS) == {
        "b_mirrored.jpg": "a_base.jpg", "c_padded.jpg": "a_base.jpg", "f_rob_mirrored.jpg": "e_rob.jpg",
        "g_rob_padded.jpg": "e_rob.jpg"}
    # Never a reference of its copy, even with near-duplicates kept (--duplicate-bits -1).
    assert filters.is_near_duplicate(faces["e_rob.jpg"], faces["f_rob_mirrored.jpg"], 0)


def test_the_pixel_limit_is_an_option_of_prepare_data(inputs, tmp_path, capsys):
    root, pack = inputs
    out = tmp_path / "out"
    assert main(["--photos", str(root / "photos"), "--out", str(out), "--faces", str(pack), "--provider", "cpu",
                 "--cache", str(tmp_path / "cache"), "--max-pixels", "1000"]) == 2
    assert "no photo of" in _error(capsys)
    unreadable = report(out)["photos"]["unreadable"]
    assert len(unreadable) == 14 and "pass --max-pixels" in unreadable["amber.jpg"]


def _prepare_data_process(root: Path, pack: Path, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "training.prepare_data", "--photos", str(root / "photos"), "--out", str(out),
               "--faces", str(pack), "--provider", "cpu", "--cache", str(root / "cache")]
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_ctrl_c_while_the_folder_is_written_leaves_one_line_and_a_folder_a_rerun_takes(inputs, clustered, tmp_path):
    root, pack = inputs
    out = tmp_path / "out"
    process = _prepare_data_process(root, pack, out)  # every photo is in the cache: straight to the writing
    deadline = time.monotonic() + 300
    while not (out / "references").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, error = process.communicate(timeout=120)
    assert process.returncode == 130, error[-2000:]
    assert error.splitlines()[-1] == ("stopped by Ctrl-C: the photos analysed so far are kept in the embedding cache "
                                      "(--cache); run the same command again to carry on")
    assert "Traceback" not in error
    assert not [path for path in out.rglob("*") if path.name.startswith(".") and path.name != ".face-cache"]
    assert build(root, pack, out) == 0  # the folder is the builder's: a re-run writes it whole
    assert (out / "manifest.jsonl").read_text() == (clustered / "manifest.jsonl").read_text()


def test_ctrl_c_after_the_work_is_no_traceback_and_progress_in_a_log_is_plain_lines(inputs, clustered, tmp_path):
    root, pack = inputs
    out = tmp_path / "out"
    process = _prepare_data_process(root, pack, out)
    assert "training rows in" in process.stdout.readline()  # the last thing the command does
    process.send_signal(signal.SIGINT)
    _, error = process.communicate(timeout=120)
    assert process.returncode == 0 and "Traceback" not in error, error[-2000:]  # the finished run is not stopped
    assert (out / "manifest.jsonl").read_text() == (clustered / "manifest.jsonl").read_text()
    assert not (out / LOCK_NAME).exists()
    # stderr is a pipe here, as a log file would be: no bar redraws, a plain line per pass
    assert "\r" not in error and "photos: 14/14 photos, " in error
