"""The face model: a face pack's detector and recogniser behind one object.

This is the single entry point the CLI, the ComfyUI nodes and the trainer share.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UMOError
from ..images import ImageLike, float_image, to_rgb_uint8
from .alignment import align_faces
from .detection import FaceDetector, Faces
from .embedding import FaceEmbedder, make_embedder
from .face_pack import FacePack, find_face_pack, resolve_providers

SAME_PERSON_COSINE = {512: 0.40, 128: 0.45}  # by embedding size; the numbers' sources: same_person_threshold
DEFAULT_SAME_PERSON_COSINE = 0.40


def same_person_threshold(embedding_dim: int) -> tuple[float, str | None]:
    """The cosine from which a matched face counts as the reference person, for a recogniser with this
    embedding size, and a note when it is a guess. Below it a match is "doubtful" (marked '?' in labels
    and tables; the metrics count it as always). The face networks are told apart by embedding size:

    - 512-d, insightface's ArcFace packs (antelopev2's glintr100, buffalo_l/m's w600k_r50, buffalo_s/sc's
      w600k_mbf): 0.40, insightface 2.1's own default (insightface/gui/core/constants.py
      DEFAULT_THRESHOLD, with 0.35-0.40 called "uncertain").
    - 128-d, the MobileFaceNet of the test assets: calibrated on face-assets/images/lfw (20 aligned LFW
      faces of 6 people; tests/test_labels.py repeats it). The 30 same-person pairs have cosines
      0.515-1.00 (mean 0.72), the 160 different-person pairs at most 0.185 (mean 0.02); the 6 strangers
      of t1_six_people reach 0.31 against each other and 0.35 from head-and-shoulders crops (the assets'
      MANIFEST: up to 0.42). 0.45 is above every stranger pair and below every same-person pair.
    - Any other size: ArcFace's 0.40, with a note that it is not calibrated for that network.
    """
    if embedding_dim in SAME_PERSON_COSINE:
        return SAME_PERSON_COSINE[embedding_dim], None
    return DEFAULT_SAME_PERSON_COSINE, (
        f"no same-person threshold is calibrated for a {embedding_dim}-d face recogniser; matches below "
        f"{DEFAULT_SAME_PERSON_COSINE:.2f} (ArcFace's) are marked doubtful")


def aligned_crops(arrays: list[np.ndarray], keypoints: list[np.ndarray]) -> torch.Tensor:
    """The aligned crops [F,3,112,112] (CPU, no gradient) of the faces with these keypoints, image by image.

    Joined in NumPy: a torch.cat of a few crops is large enough to run on torch's OpenMP threads, which
    then spin and take the cores from onnxruntime (about 30 ms of CPU per call on two cores).
    """
    crops = [align_faces(float_image(array), points).numpy() for array, points in zip(arrays, keypoints)]
    return torch.from_numpy(np.concatenate(crops))


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
    crops: torch.Tensor | None  # [M,3,112,112] aligned crops in 0..1, for previews; None where none are shown
    notes: list[str] = field(default_factory=list)  # e.g. "reference 2 has 3 faces; using the largest"
    # The reference photos as given (RGB uint8 [H,W,3]), for re-sampling toward a person (the face fix);
    # None for identities made without photos (e.g. from stored embeddings).
    photos: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.embeddings)

    def person(self, reference: int) -> Identities:
        """Reference `reference` alone, as one-person identities (its notes are about the whole set: dropped)."""
        one = [reference]
        return Identities(self.embeddings[one], self.faces.select(one),
                          None if self.crops is None else self.crops[one], [],
                          None if self.photos is None else [self.photos[reference]])


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
        self.same_person_threshold, threshold_note = same_person_threshold(self.embedder.dim)
        # What the user should be told about this model: the pack's choices, a guessed threshold.
        self.notes = [*pack.notes, *([threshold_note] if threshold_note else [])]

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
        embeddings = self.embedder.embed(aligned_crops(arrays, [f.keypoints for f in detections])).cpu()
        per_image = torch.split(embeddings, [len(f) for f in detections])
        return [AnalysedImage(f, e) for f, e in zip(detections, per_image)]

    def embed_faces(self, image: torch.Tensor, faces: Faces) -> torch.Tensor:
        """Differentiable embeddings [N,D] of given faces in one image tensor [H,W,3] (0..1)."""
        return self.embed_faces_of_images([image], [faces])[0]

    def embed_faces_of_images(self, images: Sequence[torch.Tensor], faces: Sequence[Faces]) -> list[torch.Tensor]:
        """Differentiable embeddings, per image [N_i,D], of the given faces of several images [H,W,3] (0..1),
        whatever their sizes: every face of every image in one recogniser call (in the graph's fixed batch
        size, if it has one)."""
        crops = torch.cat([align_faces(image, image_faces.keypoints) for image, image_faces in zip(images, faces)])
        return list(self.torch_embedder.embed(crops).split([len(image_faces) for image_faces in faces]))

    @torch.no_grad()
    def identities(self, references: ImageLike | list[ImageLike], names: list[str] | None = None) -> Identities:
        """One identity per reference photo: its largest face. A photo without a face is an error.

        The notes say when a photo has several faces, and when two references look like the same
        person (cosine at or above the same-person threshold): the matching cannot tell them apart.
        """
        arrays = to_rgb_uint8(references)
        names = names or [f"reference {i + 1}" for i in range(len(arrays))]
        if not arrays:
            raise UMOError("no reference photos given; give one photo per person")
        chosen, notes = [], []
        for name, array in zip(names, arrays):
            faces = self.detector.detect(array)
            if len(faces) == 0:
                raise UMOError(f"{name}: no face found; use a photo where the person's face is clearly visible")
            largest = int(np.argmax(faces.areas()))
            if len(faces) > 1:
                notes.append(f"{name} has {len(faces)} faces; using the largest")
            chosen.append(faces.select([largest]))
        crops = aligned_crops(arrays, [face.keypoints for face in chosen])
        faces = Faces(*(np.concatenate([getattr(f, k) for f in chosen]) for k in ("boxes", "keypoints", "scores")))
        embeddings = self.embedder.embed(crops).cpu()
        similarity = embeddings @ embeddings.T
        for first, second in itertools.combinations(range(len(names)), 2):
            if similarity[first, second] >= self.same_person_threshold:
                notes.append(f"{names[first]} and {names[second]} look like the same person (cosine "
                             f"{similarity[first, second]:.2f}, same person from {self.same_person_threshold:.2f} "
                             "for this face network): the matching cannot tell them apart; give one photo per person")
        return Identities(embeddings, faces, crops, notes, arrays)


def load_face_model(pack: str | Path, provider: str = "auto", backend: str = "onnx",
                    device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                    roots: list[Path] | None = None) -> FaceModel:
    """Load a face pack by name (searched in ComfyUI's and insightface's folders) or by folder path."""
    return FaceModel(find_face_pack(pack, roots), provider, backend, device, dtype)
