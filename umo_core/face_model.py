"""The face model: a face pack's detector and recogniser behind one object.

This is the single entry point the CLI, the ComfyUI nodes and the trainer share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .alignment import align_faces
from .detection import FaceDetector, Faces
from .embedding import FaceEmbedder, make_embedder
from .errors import UMOError
from .face_pack import FacePack, find_face_pack, resolve_providers
from .images import ImageLike, float_image, to_rgb_uint8


@dataclass
class AnalysedImage:
    """One image's faces with their embeddings [N,D] (L2-normalised)."""

    faces: Faces
    embeddings: torch.Tensor


@dataclass
class Identities:
    """The reference people, one per reference photo, in order."""

    embeddings: torch.Tensor  # [M,D], L2-normalised, no grad
    faces: Faces  # the face used in each reference (one row per reference)
    crops: torch.Tensor  # [M,3,112,112] aligned crops in 0..1, for previews
    notes: list[str] = field(default_factory=list)  # e.g. "reference 2 has 3 faces; using the largest"

    def __len__(self) -> int:
        return len(self.embeddings)


class FaceModel:
    """Detector + embedder of one face pack, with explicit providers, backend, device and dtype."""

    def __init__(self, pack: FacePack, provider: str = "auto", backend: str = "onnx",
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                 det_threshold: float = 0.5):
        self.pack = pack
        self.providers = resolve_providers(provider)
        if device is None:
            device = "cuda" if "CUDAExecutionProvider" in self.providers else "cpu"
        self.device, self.dtype = torch.device(device), dtype
        self.detector = FaceDetector(pack.detector, self.providers, det_threshold)
        self.embedder = make_embedder(pack.recogniser, backend, self.providers, self.device, dtype)
        self._torch_embedder = self.embedder if backend == "torch" else None

    @property
    def torch_embedder(self) -> FaceEmbedder:
        """The differentiable embedder over the same ONNX file (made on first use)."""
        if self._torch_embedder is None:
            self._torch_embedder = make_embedder(self.pack.recogniser, "torch", self.providers, self.device, self.dtype)
        return self._torch_embedder

    def detect(self, images: ImageLike | list[ImageLike]) -> list[Faces]:
        return [self.detector.detect(image) for image in to_rgb_uint8(images)]

    @torch.no_grad()
    def analyse(self, images: ImageLike | list[ImageLike]) -> list[AnalysedImage]:
        """Detect and embed every face of every image; embeddings of all faces run as one batch."""
        arrays = to_rgb_uint8(images)
        detections = [self.detector.detect(a) for a in arrays]
        crops = [align_faces(float_image(a), f.keypoints) for a, f in zip(arrays, detections)]
        embeddings = self.embedder.embed(torch.cat(crops)).cpu()
        per_image = torch.split(embeddings, [len(f) for f in detections])
        return [AnalysedImage(f, e) for f, e in zip(detections, per_image)]

    def embed_faces(self, image: torch.Tensor, faces: Faces) -> torch.Tensor:
        """Differentiable embeddings [N,D] of given faces in one image tensor [H,W,3] (0..1)."""
        crops = align_faces(image, faces.keypoints)
        return self.torch_embedder.embed(crops)

    @torch.no_grad()
    def identities(self, references: ImageLike | list[ImageLike], names: list[str] | None = None) -> Identities:
        """One identity per reference photo: its largest face. A photo without a face is an error."""
        arrays = to_rgb_uint8(references)
        names = names or [f"reference {i + 1}" for i in range(len(arrays))]
        if not arrays:
            raise UMOError("no reference photos given; give one photo per person")
        chosen, crops, notes = [], [], []
        for name, array in zip(names, arrays):
            faces = self.detector.detect(array)
            if len(faces) == 0:
                raise UMOError(f"{name}: no face found; use a photo where the person's face is clearly visible")
            largest = int(np.argmax(faces.areas()))
            if len(faces) > 1:
                notes.append(f"{name} has {len(faces)} faces; using the largest")
            face = faces.select([largest])
            chosen.append(face)
            crops.append(align_faces(float_image(array), face.keypoints))
        crops = torch.cat(crops)
        faces = Faces(*(np.concatenate([getattr(f, k) for f in chosen]) for k in ("boxes", "keypoints", "scores")))
        return Identities(self.embedder.embed(crops).cpu(), faces, crops, notes)


def load_face_model(pack: str | Path, provider: str = "auto", backend: str = "onnx",
                    device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                    roots: list[Path] | None = None) -> FaceModel:
    """Load a face pack by name (searched in ComfyUI's and insightface's folders) or by folder path."""
    return FaceModel(find_face_pack(pack, roots), provider, backend, device, dtype)
