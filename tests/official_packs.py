"""Stand-ins for the official insightface packs, laid out exactly as their zips unpack.

Users have antelopev2 and buffalo_* folders, not two-file packs: beside the detector and the
recogniser they hold landmark and gender/age models (file names and shapes from
../shared/docs/face-stack-notes.md). Those extras are built here as tiny runnable graphs of the
same input and output shapes. The detector and the recogniser are the real fixture models of
../shared/face-assets copied under the official names: face-assets has no 10g detector and no
512-d recogniser, so the 10g names get det_500m and every recogniser name gets the 128-d
MobileFaceNet (`FIXTURE_DETECTORS`, `FIXTURE_RECOGNISER`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import ASSETS

LANDMARK_3D, LANDMARK_2D, GENDER_AGE, SWAPPER = "1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "inswapper_128.onnx"
OFFICIAL_PACKS = {
    "antelopev2": (LANDMARK_3D, LANDMARK_2D, GENDER_AGE, "glintr100.onnx", "scrfd_10g_bnkps.onnx"),
    "buffalo_l": (LANDMARK_3D, LANDMARK_2D, "det_10g.onnx", GENDER_AGE, "w600k_r50.onnx"),
    "buffalo_m": (LANDMARK_3D, LANDMARK_2D, "det_2.5g.onnx", GENDER_AGE, "w600k_r50.onnx"),
    "buffalo_s": (LANDMARK_3D, LANDMARK_2D, "det_500m.onnx", GENDER_AGE, "w600k_mbf.onnx"),
    "buffalo_sc": ("det_500m.onnx", "w600k_mbf.onnx"),
}
NESTED_PACKS = {"antelopev2"}  # its zip holds a folder of its own name: antelopev2/antelopev2/*.onnx

# Official detector name -> the fixture detector copied under it.
FIXTURE_DETECTORS = {"scrfd_10g_bnkps.onnx": "det_500m.onnx", "det_10g.onnx": "det_500m.onnx",
                     "det_2.5g.onnx": "det_2.5g.onnx", "det_500m.onnx": "det_500m.onnx"}
RECOGNISERS = ("glintr100.onnx", "w600k_r50.onnx", "w600k_mbf.onnx")
FIXTURE_RECOGNISER = "mobilefacenet_128d.onnx"
# Input and output shapes of the official models that we only need the shape of.
SHAPES = {LANDMARK_3D: ((1, 3, 192, 192), (1, 3309)), LANDMARK_2D: ((1, 3, 192, 192), (1, 212)),
          GENDER_AGE: ((1, 3, 96, 96), (1, 3))}
OPSET = 17


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="umo-tests")
    onnx.checker.check_model(model, full_check=True)  # full_check also infers and checks the output shapes
    return model


def shape_standin(input_shape: tuple[int, ...], output_shape: tuple[int, int]) -> onnx.ModelProto:
    """A graph `data` -> `fc1` of these shapes: global average pool, flatten, one matrix product."""
    weight = np.linspace(-1, 1, input_shape[1] * output_shape[1], dtype=np.float32).reshape(input_shape[1], -1)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["data"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("MatMul", ["flat", "weight"], ["fc1"])],
        "standin",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, output_shape)],
        [numpy_helper.from_array(weight, "weight")],
    )
    return _model(graph)


def swapper_standin() -> onnx.ModelProto:
    """inswapper_128's interface: `target` 1x3x128x128 and `source` 1x512 -> `output` 1x3x128x128.

    Like the real file, its last initializer is the 512x512 embedding map insightface's INSwapper reads.
    """
    emap = np.eye(512, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["source", "emap"], ["latent"]),
         helper.make_node("ReduceMean", ["latent"], ["mean"], keepdims=1),
         helper.make_node("Reshape", ["mean", "scalar_shape"], ["shift"]),
         helper.make_node("Add", ["target", "shift"], ["output"])],
        "swapper_standin",
        [helper.make_tensor_value_info("target", TensorProto.FLOAT, (1, 3, 128, 128)),
         helper.make_tensor_value_info("source", TensorProto.FLOAT, (1, 512))],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, (1, 3, 128, 128))],
        [numpy_helper.from_array(np.array([1, 1, 1, 1], np.int64), "scalar_shape"),
         numpy_helper.from_array(emap, "emap")],
    )
    return _model(graph)


def _write_file(folder: Path, name: str) -> None:
    if name in SHAPES:
        onnx.save(shape_standin(*SHAPES[name]), folder / name)
    elif name == SWAPPER:
        onnx.save(swapper_standin(), folder / name)
    else:
        fixture = FIXTURE_DETECTORS.get(name) or (FIXTURE_RECOGNISER if name in RECOGNISERS else None)
        if fixture is None:
            raise ValueError(f"no stand-in for '{name}'")
        shutil.copyfile(ASSETS / "models" / fixture, folder / name)


def add_pack_files(folder: Path, name: str) -> Path:
    """Put official pack `name`'s files straight into `folder` (as when two packs get mixed in one folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    for file_name in OFFICIAL_PACKS[name]:
        _write_file(folder, file_name)
    return folder


def add_inswapper(folder: Path) -> Path:
    """Add a stand-in inswapper_128.onnx (face-swap nodes' model, often found in ComfyUI's insightface folders)."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_file(folder, SWAPPER)
    return folder / SWAPPER


def make_official_pack(root: Path, name: str) -> Path:
    """Official pack `name` as its zip unpacks at `root/<name>`; returns that folder, the one a user names."""
    add_pack_files(root / name / name if name in NESTED_PACKS else root / name, name)
    return root / name


def fixture_detector(name: str) -> str:
    """The fixture detector that official pack `name` holds under its own detector name."""
    (detector,) = (FIXTURE_DETECTORS[f] for f in OFFICIAL_PACKS[name] if f in FIXTURE_DETECTORS)
    return detector
