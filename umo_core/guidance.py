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
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from .detection import Faces
from .face_model import FaceModel, Identities
from .images import to_rgb_uint8
from .reward import reward_of_faces

Decoder = Callable[[torch.Tensor], torch.Tensor]  # latent [1,C,h,w] -> image [1,H,W,3] in 0..1


@dataclass
class GuidanceResult:
    reward: float
    gradient: torch.Tensor  # d reward / d latent, the latent's shape; zero where no face is
    faces: Faces


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
    if faces is None:
        with torch.no_grad():
            preview = decode(latent)
        faces = face_model.detector.detect(to_rgb_uint8(preview)[0])
        scale = preview.shape[1] // latent.shape[2]
    if len(faces) == 0:
        return GuidanceResult(0.0, torch.zeros_like(latent), faces)

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
    reward, _, _ = reward_of_faces(identities, torch.cat(embeddings), kind)
    grads = torch.autograd.grad(reward, [cells for cells, _, _ in windows])
    gradient = torch.zeros_like(latent, dtype=torch.float32)
    for grad, (cells, top, left) in zip(grads, windows):
        gradient[:, :, top:top + cells.shape[2], left:left + cells.shape[3]] += grad.float()
    return GuidanceResult(reward.item(), gradient.to(latent.dtype), faces)


def guide(latent: torch.Tensor, decode: Decoder, identities: Identities, face_model: FaceModel,
          strength: float, kind: str = "mimr") -> tuple[torch.Tensor, list[GuidanceResult]]:
    """One guidance step on a batch of clean estimates [B,C,h,w]: x0 + strength * normalised gradient.

    The gradient is divided by its RMS over the latent cells it touches, so `strength` is a step
    in latent units whatever the image size or number of faces. Strength 0 or no face: unchanged.
    """
    guided, results = [], []
    for item in latent.split(1):
        result = reward_gradient(item, decode, identities, face_model, kind)
        touched = result.gradient != 0
        if strength == 0 or not touched.any():
            guided.append(item)
        else:
            rms = result.gradient[touched].float().pow(2).mean().sqrt()
            guided.append(item + strength * result.gradient / rms.clamp_min(1e-12))
        results.append(result)
    return torch.cat(guided), results
