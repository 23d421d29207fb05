"""Identity guidance: the matching reward's gradient with respect to a clean-latent estimate.

At a sampling step the denoiser's clean estimate x0 is decoded, scored with MIMR against the
reference identities, and nudged up the reward's gradient. Memory is the constraint (1024 px
next to a large transformer), so the gradient never goes through a full-image decode:

1. a preview decode of the whole latent *without* gradient finds the faces;
2. only a latent window around each face (plus a margin, so the decoder sees context) is
   decoded *with* gradient, and the face is embedded from that region; with several faces each
   window is checkpointed (its activations are recomputed during the backward pass), so the
   peak memory is that of one window, not of all of them;
3. all faces' embeddings form one similarity matrix, so the reward is the same MIMR as the
   trainer's and the rerank node's (`reward_of_faces`), and its gradient lands in the windows.

The FLUX autoencoder's decoder has a global attention block, so a window decodes almost, not
exactly, like the same region of a full decode; the margin keeps the difference small. No face
found: reward 0 and a zero gradient, so the estimate is left unchanged.

Late in sampling the faces barely move, so the preview (step 1, a full decode) is the largest part of
a guided step. `FaceReuse` keeps the faces found at one guided step for the following ones (step 1
skipped, the windows cut around the same boxes) and detects again every `every` steps, or at once
when a reference's cosine with its matched face falls more than `drop` below its value at the last
detection (the face has moved out of its box or changed).

Reproducibility (what "deterministic" means here): the same inputs and settings give the same step on the
same machine with the same thread count (bit for bit, or within a float32 ulp, in our runs). Another order
of float additions (another thread count, a loaded CPU whose math library splits its work differently,
another GPU or convolution algorithm) changes the float32 rounding of the gradient, about 1e-7 relative.
That alone would change the step by about that much; but the face networks are built of ReLUs, and rounding
at that level can also move an activation that sits within rounding of zero across its kink, switching its
part of the gradient on or off. So the promise is about the step as a whole: the faces found, their matches
and the reward stay the same (the reward to float rounding), and the step's move (RMS `strength` over the
cells it touches) stays within STEP_REPRODUCIBILITY of its size. Measured, 1 thread against 2 on the CPU:
0.0007% for one face, 0.7% for six faces, whose networks cross more kinks
(`tests/test_guidance.py::test_deterministic`). A decoder whose preview rounds to other 8-bit pixels can in
rare cases also move a face box, and the step with it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from ..errors import UMOError
from ..images import to_rgb_uint8
from .detection import Faces
from .face_model import FaceModel, Identities
from .matching import IdentityMatch, match_identities
from .reward import reward_of_faces

Decoder = Callable[[torch.Tensor], torch.Tensor]  # latent [1,C,h,w] -> image [1,H,W,3] in 0..1
REDETECT_EVERY = 3  # guided steps between two detections when faces are reused
SIMILARITY_DROP = 0.1  # a matched cosine falling this much below its value at detection: detect again
# Two runs' guided steps differ by at most this fraction of the step's RMS (see "Reproducibility" above):
# about 3x the largest difference measured (0.7%, six faces), all of it from activations crossing kinks.
STEP_REPRODUCIBILITY = 0.02


@dataclass
class GuidanceResult:
    reward: float
    gradient: torch.Tensor  # d reward / d latent, the latent's shape; zero where no face is
    faces: Faces  # in the decoded image's pixels
    scale: int  # decoded pixels per latent cell
    matched: np.ndarray  # [M] each reference's cosine with its assigned face, 0 where none is assigned
    detected: bool  # the faces were found on this step's preview (not reused)
    match: IdentityMatch  # the references matched to the faces' embeddings (no faces: every reference missing)


@dataclass
class _Detection:
    faces: Faces
    scale: int
    matched: np.ndarray  # at the detection step
    age: int = 0  # guided steps since the detection


class FaceReuse:
    """The faces of each batch item across the guided steps of one sampling run (make one per run, or
    `reset` it): detected at the first guided step, reused while fewer than `every` steps old, detected
    again earlier when a reference's matched cosine drops by more than `drop`. `every=1` detects at
    every step."""

    def __init__(self, every: int = REDETECT_EVERY, drop: float = SIMILARITY_DROP):
        if every < 1:
            raise UMOError(f"identity guidance: redetect_every is {every}; use 1 (detect at every step) or more")
        self.every, self.drop = every, drop
        self._detections: dict[int, _Detection] = {}

    def reset(self) -> None:
        self._detections.clear()

    def faces(self, index: int) -> _Detection | None:
        """The detection batch item `index` may reuse at this step, if any."""
        detection = self._detections.get(index)
        return detection if detection is not None and detection.age < self.every else None

    def dropped(self, index: int, result: GuidanceResult) -> bool:
        """Whether a reference's matched cosine fell sharply since the detection this result reused."""
        return bool(np.any(result.matched < self._detections[index].matched - self.drop))

    def record(self, index: int, result: GuidanceResult) -> None:
        """After a guided step: a new detection starts over, a reuse ages the old one."""
        if result.detected:
            self._detections[index] = _Detection(result.faces, result.scale, result.matched, age=1)
        else:
            self._detections[index].age += 1


def autograd_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of a module whose weights can take part in autograd.

    Hosts like ComfyUI load weights under `torch.inference_mode()`; such "inference tensors" cannot
    be saved for backward, so a gradient w.r.t. the input through them fails. A copy made outside
    inference mode holds ordinary tensors.
    """
    with torch.inference_mode(False):  # deepcopy clones every tensor: outside inference mode, ordinary ones
        duplicate = copy.deepcopy(module)
    return duplicate.requires_grad_(False)


def _window(box: list[float], scale: int, margin: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Latent cells (top, left, bottom, right) covering a pixel box plus `margin` cells."""
    x1, y1, x2, y2 = box
    top, left = max(0, int(y1 // scale) - margin), max(0, int(x1 // scale) - margin)
    bottom, right = min(height, int(-(-y2 // scale)) + margin), min(width, int(-(-x2 // scale)) + margin)
    return top, left, bottom, right


def reward_gradient(latent: torch.Tensor, decode: Decoder, identities: Identities, face_model: FaceModel,
                    kind: str = "mimr", margin: int = 4, faces: Faces | None = None,
                    scale: int = 8) -> GuidanceResult:
    """MIMR (or SIR) of the decoded latent [1,C,h,w] and its gradient w.r.t. the latent.

    `faces` (pixel coordinates) skips the preview decode, e.g. to reuse the faces of an earlier
    step; `scale` is then the decoder's upsampling factor (otherwise it is measured).
    """
    latent = latent.detach()
    detected = faces is None
    if detected:
        with torch.no_grad():
            preview = decode(latent)
        faces = face_model.detector.detect(to_rgb_uint8(preview)[0])
        scale = preview.shape[1] // latent.shape[2]
    if len(faces) == 0:
        no_faces = match_identities(identities.embeddings, identities.embeddings[:0], face_model.same_person_threshold)
        return GuidanceResult(0.0, torch.zeros_like(latent), faces, scale, np.zeros(len(identities)), detected,
                              no_faces)

    def embed_window(cells: torch.Tensor, face: Faces) -> torch.Tensor:
        return face_model.embed_faces(decode(cells)[0], face)

    windows, embeddings = [], []
    for i, box in enumerate(faces.boxes.tolist()):
        top, left, bottom, right = _window(box, scale, margin, latent.shape[2], latent.shape[3])
        cells = latent[:, :, top:bottom, left:right].clone().requires_grad_(True)
        offset = [left * scale, top * scale]
        face = Faces(faces.boxes[i:i + 1] - (offset * 2), faces.keypoints[i:i + 1] - offset, faces.scores[i:i + 1])
        if len(faces) > 1:  # one window's activations alive at a time, for one extra window forward each
            embeddings.append(checkpoint(embed_window, cells, face, use_reentrant=False))
        else:
            embeddings.append(embed_window(cells, face))
        windows.append((cells, top, left))
    reward, match = reward_of_faces(identities, torch.cat(embeddings), face_model.same_person_threshold, kind)
    grads = torch.autograd.grad(reward, [cells for cells, _, _ in windows])
    gradient = torch.zeros_like(latent, dtype=torch.float32)
    for grad, (cells, top, left) in zip(grads, windows):
        gradient[:, :, top:top + cells.shape[2], left:left + cells.shape[3]] += grad.float()
    matched = np.array([match.matched_similarity(k) or 0.0 for k in range(len(identities))])
    return GuidanceResult(reward.item(), gradient.to(latent.dtype), faces, scale, matched, detected,
                          match.detach())


def _reward_gradient_of_item(latent: torch.Tensor, index: int, decode: Decoder, identities: Identities,
                             face_model: FaceModel, kind: str, reuse: FaceReuse | None) -> GuidanceResult:
    """`reward_gradient` of batch item `index`, on the faces `reuse` keeps for it where it may."""
    known = reuse.faces(index) if reuse is not None else None
    if known is not None:
        result = reward_gradient(latent, decode, identities, face_model, kind, faces=known.faces, scale=known.scale)
        if reuse.dropped(index, result):  # the face left its box: this step's gradient from a fresh detection
            result = reward_gradient(latent, decode, identities, face_model, kind)
    else:
        result = reward_gradient(latent, decode, identities, face_model, kind)
    if reuse is not None:
        reuse.record(index, result)
    return result


def guide(latent: torch.Tensor, decode: Decoder, identities: Identities, face_model: FaceModel,
          strength: float, kind: str = "mimr",
          reuse: FaceReuse | None = None) -> tuple[torch.Tensor, list[GuidanceResult]]:
    """One guidance step on a batch of clean estimates [B,C,h,w]: x0 + strength * normalised gradient.

    The gradient is divided by its RMS over the latent cells it touches, so `strength` is a step
    in latent units whatever the image size or number of faces. Strength 0 or no face: unchanged.
    `reuse` (one per sampling run) keeps the faces between steps; without it every step detects.
    """
    guided, results = [], []
    for index, item in enumerate(latent.split(1)):
        result = _reward_gradient_of_item(item, index, decode, identities, face_model, kind, reuse)
        touched = result.gradient != 0
        if strength == 0 or not touched.any():
            guided.append(item)
        else:
            rms = result.gradient[touched].float().pow(2).mean().sqrt()
            guided.append(item + strength * result.gradient / rms.clamp_min(1e-12))
        results.append(result)
    return torch.cat(guided), results
