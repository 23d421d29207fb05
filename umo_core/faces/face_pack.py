"""Finding an insightface-style face pack on disk and choosing ONNX execution providers.

A pack is a folder of ONNX files: one SCRFD detector and one ArcFace-style recogniser, plus,
in the official packs, landmark and gender/age models, and in ComfyUI folders often a face
swapper, which we set aside. Files are told apart by their graph shapes in insightface's order
(`model_zoo/model_zoo.py`), so any names work. Nothing here ever downloads: a missing pack is
an error that says what to put where.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import onnxruntime

from ..errors import UMOError
from ..files import is_symlink_loop

if TYPE_CHECKING:
    from onnx import ModelProto

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}

PROVIDER_CHOICES = ("auto", *PROVIDERS)  # what resolve_providers takes (in any case)

EXPECTED_FILES = (
    "one SCRFD face detector (e.g. scrfd_10g_bnkps.onnx or det_10g.onnx) and one ArcFace "
    "recogniser (e.g. glintr100.onnx or w600k_r50.onnx)"
)
DETECTOR, RECOGNISER = "face detector", "face recogniser"
# Where a user without a pack learns which files to download and where they go.
WHERE_TO_GET_PACKS = ("the official packs (antelopev2, buffalo_l) are insightface's release files: see 'Face models' "
                      "in the README, https://github.com/umo-identity/comfyui-umo#face-models")


DEFAULT_PACK = "antelopev2"
FACE_PACK_ENV = "UMO_FACE_PACK"
DEFAULT_PACK_HELP = f"${FACE_PACK_ENV}, else {DEFAULT_PACK}"  # how help texts name the default


def default_face_pack() -> str:
    """The face pack of every command given no --faces: $UMO_FACE_PACK (a name or folder), else DEFAULT_PACK."""
    return os.environ.get(FACE_PACK_ENV) or DEFAULT_PACK


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
    """The folder's .onnx files sorted by name, the order insightface's FaceAnalysis reads them in."""
    return sorted((p for p in directory.glob("*.onnx") if p.is_file()), key=lambda p: p.name)


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


def _not_found(pack: str, roots: list[Path], default_roots: bool) -> UMOError:
    """Every folder searched and, for the default search, how to search others (environment variables, a path).

    Roots passed in (ComfyUI's insightface folders) are the only places their caller can look.
    """
    searched = ", ".join(str(root / "models" / pack) for root in roots)
    where = f"put them into {'that folder' if len(roots) == 1 else 'one of these folders'}"
    if default_roots:
        unset = [name for name in ("COMFYUI_PATH", "INSIGHTFACE_HOME") if not os.environ.get(name)]
        if unset:
            searched += f" ({' and '.join(unset)} {'is' if len(unset) == 1 else 'are'} not set)"
        where += (f", set COMFYUI_PATH to your ComfyUI folder (to search ComfyUI/models/insightface/models/{pack}) "
                  f"or INSIGHTFACE_HOME to an insightface root (to search $INSIGHTFACE_HOME/models/{pack}), "
                  "or pass the pack's folder path instead of a name")
    return UMOError(f"face pack '{pack}' not found; looked in {searched}. It needs {EXPECTED_FILES}: {where} "
                    f"({WHERE_TO_GET_PACKS})")


def locate_pack_directory(pack: str | Path, roots: list[Path] | None = None) -> Path:
    """The folder of a pack given as a directory path or as a pack name looked up in `roots`."""
    candidate = Path(pack).expanduser()
    if candidate.is_dir():
        return _unnest(candidate)
    if candidate.is_file():
        raise UMOError(f"face pack '{candidate}' is a file, but a face pack is a folder with {EXPECTED_FILES}; "
                       f"give the folder that holds them (e.g. '{candidate.parent}')")
    if is_symlink_loop(candidate):
        raise UMOError(f"face pack '{candidate}' is a symbolic link loop (its links lead back to themselves); "
                       "give the pack's folder itself")
    if len(candidate.parts) > 1 or candidate.is_absolute():
        raise UMOError(f"face pack folder '{candidate}' does not exist; create it with {EXPECTED_FILES} "
                       f"({WHERE_TO_GET_PACKS})")
    search = pack_search_roots() if roots is None else roots
    for root in search:
        folder = root / "models" / str(pack)
        if folder.is_dir():
            return _unnest(folder)
    raise _not_found(str(pack), search, default_roots=roots is None)


def _onnx_schema() -> ModuleType:
    """onnx's generated protobuf module (ModelProto and the rest), without running `import onnx`.

    `import onnx` also imports ml_dtypes for helpers we do not use, which alone costs 1-2.5 s of
    every start; the generated module needs only protobuf. It is registered under its own name,
    so a later `import onnx` (the torch backend's onnx2torch) reuses it rather than loading it twice.
    """
    name = "onnx.onnx_ml_pb2"
    if name not in sys.modules:
        package = importlib.util.find_spec("onnx")
        if package is None or not package.submodule_search_locations:
            raise UMOError("the onnx package is not installed; install it with: pip install onnx")
        location = Path(package.submodule_search_locations[0]) / "onnx_ml_pb2.py"
        spec = importlib.util.spec_from_file_location(name, location)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def read_onnx_model(path: Path, what: str = "model file") -> ModelProto:
    """The ONNX graph of `path` (weights included: official files keep them inside); `what` names it in errors."""
    model = _onnx_schema().ModelProto()
    try:
        model.ParseFromString(Path(path).read_bytes())
    except Exception as error:  # protobuf's DecodeError, and OSError for an unreadable file
        raise UMOError(f"{what} '{path}' is not a readable ONNX model ({type(error).__name__}); download it "
                       "again or move it out of the face pack folder") from None
    return model


def _dims(value_info) -> list[int | None]:
    """A graph input's shape, None for a dynamic axis."""
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def model_kind(model: ModelProto) -> str | None:
    """What an ONNX graph is, by insightface's routing rule (`model_zoo.py`), tested in this order.

    >=5 outputs: SCRFD detector (scores, boxes and keypoints per stride); a 192x192 input: landmark
    model (1k3d68, 2d106det); 96x96: gender/age; two inputs at 128x128: face swapper (inswapper_128);
    only then a square input of at least 112 px, a multiple of 16: ArcFace recogniser. Checking the
    recogniser rule first would take the 192 px landmark models for recognisers. None: unknown.
    """
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    dims = _dims(inputs[0]) if inputs else []
    if len(model.graph.output) >= 5:
        return DETECTOR
    if len(dims) != 4:
        return None
    height, width = dims[2:]
    if (height, width) == (192, 192):
        return "landmark model"
    if (height, width) == (96, 96):
        return "gender/age model"
    if len(inputs) == 2 and (height, width) == (128, 128):
        return "face swapper"
    if height == width and (height or 0) >= 112 and height % 16 == 0:
        return RECOGNISER
    return None


def _choose(kind: str, candidates: list[Path], directory: Path) -> tuple[Path, list[str]]:
    """The first candidate by file name, as insightface's FaceAnalysis takes it, with a note when there were several.

    Taking the one insightface takes keeps this pack on the same file as other insightface-based
    nodes (PuLID, InstantID) that read the same folder.
    """
    chosen = candidates[0]
    if len(candidates) == 1:
        return chosen, []
    names = ", ".join(p.name for p in candidates)
    return chosen, [f"face pack '{directory}' has {len(candidates)} {kind}s ({names}); using {chosen.name}, the "
                    f"first by file name as insightface does (to use another, move the others out of the folder)"]


def find_face_pack(pack: str | Path, roots: list[Path] | None = None) -> FacePack:
    """Locate a pack and pick its detector and recogniser, routing every .onnx by its graph like insightface."""
    directory = locate_pack_directory(pack, roots)
    files = _onnx_files(directory)
    if not files:
        raise UMOError(f"face pack folder '{directory}' has no .onnx files; it needs {EXPECTED_FILES}")
    found: dict[str, list[Path]] = {DETECTOR: [], RECOGNISER: []}
    for path in files:
        kind = model_kind(read_onnx_model(path))
        if kind in found:
            found[kind].append(path)
    if not found[DETECTOR]:
        raise UMOError(f"face pack '{directory}' has no face detector: add an SCRFD detector .onnx "
                       "(e.g. det_10g.onnx) next to the recogniser")
    if not found[RECOGNISER]:
        raise UMOError(f"face pack '{directory}' has no face recogniser: add an ArcFace .onnx "
                       "(e.g. glintr100.onnx or w600k_r50.onnx) next to the detector")
    detector, detector_notes = _choose(DETECTOR, found[DETECTOR], directory)
    recogniser, recogniser_notes = _choose(RECOGNISER, found[RECOGNISER], directory)
    return FacePack(directory, detector, recogniser, tuple(detector_notes + recogniser_notes))


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


def onnx_session(path: Path, providers: list[str], what: str) -> onnxruntime.InferenceSession:
    """An onnxruntime session for one model file of the pack on `providers` (the first is the one wanted).

    onnxruntime quietly falls back to the CPU when an accelerator's libraries cannot be loaded (e.g. an
    onnxruntime-gpu built for another CUDA major version than the one installed): that is an error here, so a
    GPU user never waits on a CPU run without knowing it.
    """
    try:
        session = onnxruntime.InferenceSession(str(path), session_options(), providers=providers)
    except Exception as error:  # onnxruntime raises its own exception types for bad graphs
        raise UMOError(f"{what} '{path}' cannot be loaded by onnxruntime ({error}); download it again") from None
    wanted = providers[0]
    if wanted not in session.get_providers():
        raise UMOError(f"onnxruntime {onnxruntime.__version__} could not start {wanted} for {what} '{path}' "
                       "(its libraries, e.g. CUDA and cuDNN for onnxruntime-gpu, are missing or of another version; "
                       "onnxruntime's log above says which); choose provider cpu, or install the onnxruntime build "
                       "that matches your CUDA")
    return session


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
        raise UMOError(f"provider '{provider}' is unknown; choose one of {', '.join(PROVIDER_CHOICES)}")
    name = PROVIDERS[choice]
    if name not in available:
        hint = " (install onnxruntime-gpu instead of onnxruntime)" if choice == "cuda" else ""
        raise UMOError(f"provider '{provider}' is not offered by this onnxruntime, which has "
                       f"{', '.join(available)}{hint}")
    return [name] if name == "CPUExecutionProvider" else [name, "CPUExecutionProvider"]
