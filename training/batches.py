"""One training (or evaluation) batch read from disk: target latents, the backbone's references, identities, text.

The faces are not detected here: each sample carries what the data check found (its references' people
and its target's faces), so a step runs the face networks only on what it generates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from umo_core.backbones.text_embedding import TextEmbedding, load_text_embeddings
from umo_core.faces.face_model import AnalysedImage, Identities
from umo_core.images import load_image

from .buckets import fit_faces_to_bucket, fit_to_bucket
from .data import Sample


@dataclass
class Batch:
    rows: list[int]  # manifest row numbers
    target: torch.Tensor  # [B,C,h,w] the backbone's latents of the targets fitted to the bucket
    references: list[torch.Tensor]  # per person [B,C,hk,wk], each photo resized by the backbone's rule
    identities: list[Identities]  # per sample, its references' people
    names: list[list[str] | None]  # per sample, the manifest's names of those people (or None)
    ground_truth: list[AnalysedImage]  # per sample: the target photo's faces, in the bucket's pixels
    text: TextEmbedding


@torch.no_grad()
def load_batch(backbone, samples: list[Sample], size: tuple[int, int], vae, device: torch.device,
               negative: bool = False) -> Batch:
    """Samples of one shape key (see buckets.shape_key) as `backbone`'s tensors on `device`; with `negative`, the
    text with its negative_prompt_embeds (the evaluation's classifier-free guidance)."""
    targets = [load_image(s.target) for s in samples]
    target_images = torch.stack([fit_to_bucket(target, size) for target in targets])
    photos = [[load_image(p) for p in s.references] for s in samples]
    count = len(samples[0].references)
    references = [backbone.encode_images(vae, torch.stack([backbone.resize_reference(people[k], count)
                                                           for people in photos]).to(device))
                  for k in range(count)]
    text = load_text_embeddings([s.text_embedding for s in samples], device, negative)
    return Batch(rows=[s.row for s in samples], target=backbone.encode_images(vae, target_images.to(device)),
                 references=references, identities=[s.identities for s in samples],
                 names=[s.names for s in samples],
                 ground_truth=[fit_faces_to_bucket(s.target_faces, target.shape[:2], size)
                               for s, target in zip(samples, targets)], text=text)
