"""Finding an insightface-style face pack on disk and choosing ONNX execution providers.

A pack is a folder of ONNX files: one SCRFD detector and one ArcFace-style recogniser
(plus, in the official packs, landmark and attribute models we do not need). Files are
told apart by their graph shapes, the way insightface routes them, so any names work.
Nothing here ever downloads: a missing pack is an error that says what to put where.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime

from .errors import UMOError

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}

EXPECTED_FILES = (
    "one SCRFD face detector (e.g. scrfd_10g_bnkps.onnx or det_10g.onnx) and one ArcFace "
    "recogniser (e.g. glintr100.onnx or w600k_r50.onnx)"
)


@dataclass(frozen=True)
class FacePack:
    """The two ONNX files of a face pack that this project uses."""

    directory: Path
    detector: Path
    recogniser: Path
    notes: tuple[str, ...] = ()  # which file was chosen, and why, where a folder offered several of a kind


def pack_search_roots() -> list[Path]:
    """insightface roots searched for a pack given by name, in order.

    A root holds packs as `<root>/models/<pack>/*.onnx`: ComfyUI's `models/insightface`
    folder (from `$COMFYUI_PATH`), `$INSIGHTFACE_HOME` and insightface's default `~/.insightface`.
    """
    roots = []
    if os.environ.get("COMFYUI_PATH"):
        roots.append(Path(os.environ["COMFYUI_PATH"]) / "models" / "insightface")
    if os.environ.get("INSIGHTFACE_HOME"):
        roots.append(Path(os.environ["INSIGHTFACE_HOME"]))
    roots.append(Path("~/.insightface").expanduser())
    return roots


def _onnx_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.onnx") if p.is_file())


def _unnest(directory: Path) -> Path:
    """Repair the antelopev2 zip layout (`antelopev2/antelopev2/*.onnx`) by looking one level down."""
    if _onnx_files(directory):
        return directory
    nested = directory / directory.name
    if nested.is_dir() and _onnx_files(nested):
        return nested
    subfolders = [p for p in directory.iterdir() if p.is_dir()] if directory.is_dir() else []
    if len(subfolders) == 1 and _onnx_files(subfolders[0]):
        return subfolders[0]
    return directory


def locate_pack_directory(pack: str | Path, roots: list[Path] | None = None) -> Path:
    """The folder of a pack given as a directory path or as a pack name looked up in `roots`."""
    candidate = Path(pack).expanduser()
    if candidate.is_dir():
        return _unnest(candidate)
    if len(candidate.parts) > 1 or candidate.is_absolute():
        raise UMOError(f"face pack folder '{candidate}' does not exist; create it with {EXPECTED_FILES}")
    roots = pack_search_roots() if roots is None else roots
    for root in roots:
        folder = root / "models" / str(pack)
        if folder.is_dir():
            return _unnest(folder)
    searched = ", ".join(str(root / "models" / str(pack)) for root in roots)
    raise UMOError(
        f"face pack '{pack}' not found (looked in {searched}). Put {EXPECTED_FILES} into "
        f"ComfyUI/models/insightface/models/{pack}/, or pass the pack's folder path instead of a name"
    )


def _graph_shapes(path: Path) -> tuple[list, int]:
    """The first input's shape and the number of outputs of an ONNX graph."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # onnx raises protobuf's DecodeError and others
        raise UMOError(f"model file '{path}' is not a readable ONNX model ({type(error).__name__}); "
                       "download it again") from None
    graph_input = model.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in graph_input.type.tensor_type.shape.dim]
    return dims, len(model.graph.output)


def _is_recogniser(dims: list, n_outputs: int) -> bool:
    """insightface's rule: one output, a square input of at least 112 px, a multiple of 16."""
    return n_outputs == 1 and len(dims) == 4 and dims[2] == dims[3] and (dims[2] or 0) >= 112 and dims[2] % 16 == 0


def find_face_pack(pack: str | Path, roots: list[Path] | None = None) -> FacePack:
    """Locate a pack and pick its detector and recogniser (first of each, by file name)."""
    directory = locate_pack_directory(pack, roots)
    files = _onnx_files(directory)
    if not files:
        raise UMOError(f"face pack folder '{directory}' has no .onnx files; it needs {EXPECTED_FILES}")
    detector = recogniser = None
    for path in files:
        dims, n_outputs = _graph_shapes(path)
        if detector is None and n_outputs >= 5:  # SCRFD: scores, boxes and keypoints per stride
            detector = path
        elif recogniser is None and _is_recogniser(dims, n_outputs):
            recogniser = path
    if detector is None:
        raise UMOError(f"face pack '{directory}' has no face detector: add an SCRFD detector .onnx "
                       "(e.g. det_10g.onnx) next to the recogniser")
    if recogniser is None:
        raise UMOError(f"face pack '{directory}' has no face recogniser: add an ArcFace .onnx "
                       "(e.g. glintr100.onnx or w600k_r50.onnx) next to the detector")
    return FacePack(directory=directory, detector=detector, recogniser=recogniser)


def session_options() -> onnxruntime.SessionOptions:
    """onnxruntime options for our sessions: worker threads that sleep instead of spinning.

    Spinning threads keep both cores busy after every run, which starves the torch work
    (alignment) that alternates with detection and embedding: measured 2.3x faster on 2 CPU cores.
    """
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # SCRFD exports declare the output shapes of a 640 input; other sizes run fine but warn each time.
    options.log_severity_level = 3
    return options


def resolve_providers(provider: str = "auto") -> list[str]:
    """ONNX Runtime providers for a user choice: auto, cpu, cuda, rocm or coreml.

    auto = CUDA when this onnxruntime build offers it and torch sees a GPU, else CPU.
    An explicit choice that this onnxruntime cannot serve is an error, not a silent CPU run.
    """
    available = onnxruntime.get_available_providers()
    choice = provider.lower()
    if choice == "auto":
        import torch

        if "CUDAExecutionProvider" in available and torch.cuda.is_available():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]
    if choice not in PROVIDERS:
        raise UMOError(f"provider '{provider}' is unknown; choose one of auto, {', '.join(PROVIDERS)}")
    name = PROVIDERS[choice]
    if name not in available:
        hint = " (install onnxruntime-gpu instead of onnxruntime)" if choice == "cuda" else ""
        raise UMOError(f"provider '{provider}' is not offered by this onnxruntime, which has "
                       f"{', '.join(available)}{hint}")
    return [name] if name == "CPUExecutionProvider" else [name, "CPUExecutionProvider"]
