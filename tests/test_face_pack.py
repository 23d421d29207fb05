"""Finding face packs, routing the official packs' files like insightface, providers, and bad packs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ASSETS, PHOTOS, ROOT, make_pack
from tests.official_packs import OFFICIAL_PACKS, add_inswapper, add_pack_files, fixture_detector, make_official_pack
from umo_core import UMOError, load_face_model
from umo_core.cli import main
from umo_core.faces.face_pack import find_face_pack, model_kind, onnx_session, read_onnx_model, resolve_providers

REFERENCES = [PHOTOS / "Rob_Lowe_0001.jpg", PHOTOS / "Nathalie_Baye_0002.jpg"]
IMAGES = [PHOTOS / "t1_six_people.jpg", PHOTOS / "Rob_Lowe_0002.jpg", PHOTOS / "no_face_view.jpg"]
# insightface's model classes (model_zoo.get_model) and the kinds we route the same files to.
INSIGHTFACE_KINDS = {"SCRFD": "face detector", "Landmark": "landmark model", "Attribute": "gender/age model",
                     "INSwapper": "face swapper", "ArcFaceONNX": "face recogniser"}


def test_pack_by_folder_routes_files_by_shape(pack_dir):
    pack = find_face_pack(pack_dir)
    assert pack.detector.name == "det_500m.onnx"
    assert pack.recogniser.name == "mobilefacenet_128d.onnx"


def test_pack_by_name_in_comfyui_models_folder(assets, tmp_path, monkeypatch):
    make_pack(tmp_path / "ComfyUI" / "models" / "insightface" / "models" / "mypack")
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "ComfyUI"))
    assert find_face_pack("mypack").directory == tmp_path / "ComfyUI/models/insightface/models/mypack"


def test_pack_by_name_in_insightface_root(assets, tmp_path, monkeypatch):
    make_pack(tmp_path / "home" / "models" / "buffalo_x")
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path / "home"))
    assert find_face_pack("buffalo_x").directory == tmp_path / "home/models/buffalo_x"


def test_nested_antelopev2_layout_is_repaired(assets, tmp_path):
    make_pack(tmp_path / "models" / "antelopev2" / "antelopev2")
    pack = find_face_pack("antelopev2", roots=[tmp_path])
    assert pack.directory == tmp_path / "models/antelopev2/antelopev2"


def _score_report(faces: str, folder) -> dict:
    """`python -m umo_core score` of the Rob Lowe + Nathalie Baye references on three photos, as its JSON report."""
    args = ["score", "--faces", faces, "--provider", "cpu", "--json", folder / "report.json"]
    for reference in REFERENCES:
        args += ["--ref", reference]
    assert main([str(a) for a in [*args, "--image", *IMAGES]]) == 0
    return json.loads((folder / "report.json").read_text())


@pytest.fixture(scope="module")
def bare_report(assets, tmp_path_factory):
    """The report with the bare two-file pack holding a given fixture detector."""
    reports = {}

    def report(detector: str) -> dict:
        if detector not in reports:
            folder = tmp_path_factory.mktemp("bare")
            reports[detector] = _score_report(str(make_pack(folder / "pack", detector)), folder)
            assert [len(image["faces"]) for image in reports[detector]["images"]] == [6, 1, 0]
        return reports[detector]

    return report


@pytest.mark.parametrize("where", ["folder path", "COMFYUI_PATH", "INSIGHTFACE_HOME", "~/.insightface"])
@pytest.mark.parametrize("name", list(OFFICIAL_PACKS))
def test_official_pack_scores_exactly_like_the_bare_pack(name, where, bare_report, tmp_path, monkeypatch):
    """Every official layout, by folder path and by name through each search root: the same faces and figures."""
    for variable in ("COMFYUI_PATH", "INSIGHTFACE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    models = {"folder path": tmp_path / "downloads",
              "COMFYUI_PATH": tmp_path / "ComfyUI/models/insightface/models",
              "INSIGHTFACE_HOME": tmp_path / "insightface/models",
              "~/.insightface": tmp_path / "home/.insightface/models"}
    pack = make_official_pack(models[where], name)
    if where == "COMFYUI_PATH":
        monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "ComfyUI"))
    elif where == "INSIGHTFACE_HOME":
        monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path / "insightface"))
    report = _score_report(str(pack) if where == "folder path" else name, tmp_path)
    expected = bare_report(fixture_detector(name))
    assert report["face_pack"] == str(pack / name if name == "antelopev2" else pack)
    assert {**report, "face_pack": None} == {**expected, "face_pack": None}
    assert find_face_pack(pack).notes == ()  # an official pack is not ambiguous


@pytest.mark.parametrize("name", list(OFFICIAL_PACKS))
def test_official_files_are_routed_as_insightface_routes_them(name, assets, tmp_path):
    from insightface.model_zoo import model_zoo

    folder = add_pack_files(tmp_path / name, name)
    add_inswapper(folder)
    for path in sorted(folder.glob("*.onnx")):
        routed = model_zoo.get_model(str(path), providers=["CPUExecutionProvider"])
        assert model_kind(read_onnx_model(path)) == INSIGHTFACE_KINDS[type(routed).__name__], path.name


def test_mixed_folder_takes_what_insightface_takes_and_says_so(assets, tmp_path):
    """Two packs' files and a face swapper in one folder: the first detector and recogniser by name, with notes."""
    from insightface.app import FaceAnalysis

    folder = add_pack_files(add_pack_files(tmp_path / "mixed", "buffalo_l"), "buffalo_sc")
    insightface_models = FaceAnalysis(name=str(folder), providers=["CPUExecutionProvider"]).models
    add_inswapper(folder)  # after FaceAnalysis: insightface 2.1 fails on a swapper in a pack folder
    pack = find_face_pack(folder)
    assert (pack.detector.name, pack.recogniser.name) == ("det_10g.onnx", "w600k_mbf.onnx")
    assert pack.detector == Path(insightface_models["detection"].model_file)
    assert pack.recogniser == Path(insightface_models["recognition"].model_file)
    detector_note, recogniser_note = pack.notes
    assert "2 face detectors (det_10g.onnx, det_500m.onnx); using det_10g.onnx" in detector_note
    assert "2 face recognisers (w600k_mbf.onnx, w600k_r50.onnx); using w600k_mbf.onnx" in recogniser_note
    assert all("first by file name" in note and str(folder) in note for note in pack.notes)
    assert len(load_face_model(folder, provider="cpu").detect(PHOTOS / "t1_six_people.jpg")[0]) == 6


def test_pack_not_found_names_every_folder_searched_and_how_to_set_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "ComfyUI"))
    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path / "insightface"))
    with pytest.raises(UMOError) as error:
        find_face_pack("antelopev2")
    message = str(error.value)
    for folder in ("ComfyUI/models/insightface/models", "insightface/models", "home/.insightface/models"):
        assert f"{tmp_path / folder / 'antelopev2'}" in message
    assert "not set" not in message
    monkeypatch.delenv("COMFYUI_PATH")
    monkeypatch.delenv("INSIGHTFACE_HOME")
    with pytest.raises(UMOError) as error:
        find_face_pack("antelopev2")
    message = str(error.value)
    assert str(tmp_path / "home/.insightface/models/antelopev2") in message
    assert "COMFYUI_PATH and INSIGHTFACE_HOME are not set" in message
    assert "set COMFYUI_PATH to your ComfyUI folder" in message and "INSIGHTFACE_HOME to an insightface root" in message
    assert "pass the pack's folder path" in message and "detector" in message and "recogniser" in message


SLOW_IMPORTS = ("onnx", "ml_dtypes", "torchvision", "torch._dynamo")
STARTUP_CHECK = """
import sys
from umo_core.cli import main
assert main(sys.argv[1:]) == 0
print("loaded:", sorted(set(SLOW_IMPORTS) & set(sys.modules)))
import onnx
from umo_core import load_face_model
from umo_core.faces.face_pack import read_onnx_model
model = load_face_model(sys.argv[sys.argv.index("--faces") + 1], provider="cpu", backend="torch")
assert type(read_onnx_model(model.pack.recogniser)) is onnx.ModelProto and model.embedder.dim == 128
"""


def test_scoring_imports_neither_onnx_nor_torchvision(pack_dir, photos):
    """Start-up time: `import onnx` costs 1-2.5 s (ml_dtypes) and any torchvision import 2.5 s (torch._dynamo);
    `score` with the onnx backend needs neither. The torch backend, which does, still works afterwards."""
    args = ["score", "--faces", str(pack_dir), "--provider", "cpu", "--ref", str(REFERENCES[0]), "--image", *IMAGES]
    result = subprocess.run([sys.executable, "-c", f"SLOW_IMPORTS = {SLOW_IMPORTS}\n{STARTUP_CHECK}", *map(str, args)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "loaded: []" in result.stdout


def test_missing_pack_names_the_places_and_files(tmp_path):
    with pytest.raises(UMOError) as error:
        find_face_pack("antelopev2", roots=[tmp_path / "root"])
    message = str(error.value)
    assert "antelopev2" in message and str(tmp_path / "root" / "models" / "antelopev2") in message
    assert "detector" in message and "recogniser" in message
    assert "COMFYUI_PATH" not in message  # roots given (ComfyUI's folders) are the only places to look


def test_missing_folder_path(tmp_path):
    with pytest.raises(UMOError, match="does not exist"):
        find_face_pack(tmp_path / "nowhere" / "pack")


def test_pack_without_detector_or_recogniser(assets, tmp_path):
    only_recogniser = tmp_path / "only_rec"
    only_recogniser.mkdir()
    shutil.copyfile(ASSETS / "models/mobilefacenet_128d.onnx", only_recogniser / "w.onnx")
    with pytest.raises(UMOError, match="no face detector"):
        find_face_pack(only_recogniser)
    only_detector = tmp_path / "only_det"
    only_detector.mkdir()
    shutil.copyfile(ASSETS / "models/det_500m.onnx", only_detector / "d.onnx")
    with pytest.raises(UMOError, match="no face recogniser"):
        find_face_pack(only_detector)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UMOError, match="no .onnx files"):
        find_face_pack(empty)


def test_corrupt_onnx_is_named(assets, tmp_path):
    pack = make_pack(tmp_path / "corrupt")
    data = (pack / "mobilefacenet_128d.onnx").read_bytes()
    (pack / "mobilefacenet_128d.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(UMOError, match="mobilefacenet_128d.onnx"):
        load_face_model(pack, provider="cpu")


def test_providers():
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert resolve_providers("auto")[-1] == "CPUExecutionProvider"
    with pytest.raises(UMOError, match="unknown"):
        resolve_providers("tpu")


def test_unavailable_provider_is_an_error_not_a_silent_cpu_run():
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime offers CUDA")
    with pytest.raises(UMOError, match="onnxruntime-gpu"):
        resolve_providers("cuda")


@pytest.mark.parametrize("what", ["face detector", "face recogniser"])
def test_accelerator_that_does_not_start_is_an_error_not_a_silent_cpu_run(what, pack_dir):
    """onnxruntime runs on the CPU when the wanted provider cannot start (here: a build without CUDA, as when
    onnxruntime-gpu finds no matching CUDA libraries); the session must say so instead."""
    import onnxruntime
    import torch

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers() and torch.cuda.is_available():
        pytest.skip("CUDA starts on this machine")
    pack = find_face_pack(pack_dir)
    path = pack.detector if what == "face detector" else pack.recogniser
    with pytest.raises(UMOError, match=f"could not start CUDAExecutionProvider for {what} .*choose provider cpu"):
        onnx_session(path, ["CUDAExecutionProvider", "CPUExecutionProvider"], what)
    assert onnx_session(path, ["CPUExecutionProvider"], what).get_providers() == ["CPUExecutionProvider"]


def test_embedding_size_comes_from_the_model(face_model, torch_face_model):
    assert face_model.embedder.dim == 128
    assert torch_face_model.embedder.dim == 128


def test_other_detector_in_the_pack(assets, tmp_path, photos):
    model = load_face_model(make_pack(tmp_path / "det25", detector="det_2.5g.onnx"), provider="cpu")
    assert model.pack.detector.name == "det_2.5g.onnx"
    assert len(model.detect(photos / "t1_six_people.jpg")[0]) == 6
