"""One training (or evaluation) batch read from disk: target latents, UNO's references, identities, text."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors.torch import load_file

from umo_core.face_model import AnalysedImage, FaceModel, Identities
from umo_core.flux import TextEmbedding, encode_images
from umo_core.images import float_image, load_image
from umo_core.references import reference_long_side, resize_reference

from .buckets import fit_to_bucket
from .data import Sample


@dataclass
class Batch:
    rows: list[int]  # manifest row numbers
    target_images: torch.Tensor  # [B,H,W,3] in 0..1, fitted to the bucket
    target: torch.Tensor  # [B,16,H/8,W/8] normalised latents
    references: list[torch.Tensor]  # per person [B,16,hk,wk]
    identities: list[Identities]  # per sample
    names: list[list[str] | None]  # per sample, the manifest's identity names (or None)
    ground_truth: list[AnalysedImage]  # per sample: the faces of the target photo
    text: TextEmbedding


@torch.no_grad()
def load_batch(samples: list[Sample], size: tuple[int, int], vae, face_model: FaceModel,
               device: torch.device) -> Batch:
    """Samples of one shape key (see buckets.shape_key) as tensors on `device`."""
    target_images = torch.stack([fit_to_bucket(load_image(s.target), size) for s in samples])
    photos = [[load_image(p) for p in s.references] for s in samples]
    side = reference_long_side(len(samples[0].references))
    references = [encode_images(vae, torch.stack([resize_reference(float_image(people[k]), side)
                                                  for people in photos]).to(device))
                  for k in range(len(photos[0]))]
    embeddings = [load_file(s.text_embedding) for s in samples]
    text = TextEmbedding(torch.stack([e["prompt_embeds"] for e in embeddings]).to(device),
                         torch.stack([e["pooled_prompt_embeds"] for e in embeddings]).to(device))
    return Batch(rows=[s.row for s in samples], target_images=target_images,
                 target=encode_images(vae, target_images.to(device)), references=references,
                 identities=[face_model.identities(people) for people in photos],
                 names=[s.identities for s in samples],
                 ground_truth=face_model.analyse(list(target_images)), text=text)
