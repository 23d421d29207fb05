"""Finding face packs, repairing the nested antelopev2 layout, providers, and bad packs."""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import ASSETS, make_pack
from umo_core import UMOError, load_face_model
from umo_core.face_pack import find_face_pack, resolve_providers


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


def test_missing_pack_names_the_places_and_files(tmp_path):
    with pytest.raises(UMOError) as error:
        find_face_pack("antelopev2", roots=[tmp_path / "root"])
    message = str(error.value)
    assert "antelopev2" in message and str(tmp_path / "root" / "models" / "antelopev2") in message
    assert "detector" in message and "recogniser" in message


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


def test_embedding_size_comes_from_the_model(face_model, torch_face_model):
    assert face_model.embedder.dim == 128
    assert torch_face_model.embedder.dim == 128


def test_other_detector_in_the_pack(assets, tmp_path, photos):
    model = load_face_model(make_pack(tmp_path / "det25", detector="det_2.5g.onnx"), provider="cpu")
    assert model.pack.detector.name == "det_2.5g.onnx"
    assert len(model.detect(photos / "t1_six_people.jpg")[0]) == 6
