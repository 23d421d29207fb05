"""Identity nodes: face model loader, reference identities, rerank and report."""

from __future__ import annotations

import numpy as np
import torch
from comfy.utils import ProgressBar

from umo_core import FaceModel, Identities, load_face_model, rank
from umo_core.faces.annotate import annotate
from umo_core.faces.embedding import BACKENDS
from umo_core.faces.scoring import (
    CRITERIA,
    DEFAULT_CRITERION,
    ImageScore,
    ground_truth_embeddings,
    score_images,
    score_table,
)
from umo_core.images import float_image, to_rgb_uint8

from .model_paths import face_pack_names, insightface_roots
from .node_api import io, ui
from .sockets import FaceModelSocket, IdentitiesSocket, collect_references, reference_image_inputs

PROVIDERS = ["auto", "CPU", "CUDA", "ROCm", "CoreML"]


def _progress_scores(face_model: FaceModel, identities: Identities, images: torch.Tensor,
                     ground_truth: torch.Tensor | None = None) -> list[ImageScore]:
    """Scores image by image so the progress bar moves and Cancel stops between images."""
    # The ground truth's faces once, not once per image.
    gt = ground_truth_embeddings(face_model, ground_truth[0]) if ground_truth is not None else None
    bar = ProgressBar(len(images))
    return score_images(face_model, identities, images, gt, progress=lambda _: bar.update(1))


def _annotated(images: torch.Tensor, scores: list[ImageScore], order: list[int]) -> torch.Tensor:
    arrays = to_rgb_uint8(images)
    drawn = [annotate(arrays[i], scores[i]) for i in order]
    return float_image(np.stack(drawn))


def _table(scores: list[ImageScore], ranking: list[int], criterion: str, input_order: bool = False) -> str:
    """The score table (umo_core.faces.scoring.score_table: who is present, missing or shown again; doubtful
    matches marked '?'), images by input number; rows best first, or in input order with their rank."""
    rows = list(range(len(scores))) if input_order else ranking
    title = f"in input order, ranked by {criterion}" if input_order else f"ranked by {criterion}, best first"
    return "\n".join([title, *score_table(scores, ranking, [str(i + 1) for i in range(len(scores))], rows)])


class FaceModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UMOFaceModelLoader",
            display_name="UMO Face Model Loader",
            category="UMO",
            description="Loads an insightface face pack (detector + ArcFace recogniser) from "
                        "models/insightface/models.",
            inputs=[
                io.Combo.Input("face_pack", options=face_pack_names(), tooltip="a folder in models/insightface/models"),
                io.Combo.Input("provider", options=PROVIDERS, default="auto"),
                io.Combo.Input("embedder", options=list(BACKENDS), default="onnx",
                               tooltip="onnx: fastest; torch: differentiable (needed for identity guidance)"),
            ],
            outputs=[FaceModelSocket.Output(display_name="face_model")],
        )

    @classmethod
    def execute(cls, face_pack, provider, embedder) -> io.NodeOutput:
        return io.NodeOutput(load_face_model(face_pack, provider=provider, backend=embedder, roots=insightface_roots()))


class ReferenceIdentities(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UMOReferenceIdentities",
            display_name="UMO Reference Identities",
            category="UMO",
            description="One reference photo per person, in order (the batch first, then image_1, image_2...). "
                        "Each photo's largest face is that person.",
            inputs=[FaceModelSocket.Input("face_model")] + reference_image_inputs(),
            outputs=[IdentitiesSocket.Output(display_name="identities"),
                     io.Image.Output(display_name="aligned_faces")],
        )

    @classmethod
    def execute(cls, face_model, images=None, **single_images) -> io.NodeOutput:
        identities = face_model.identities(collect_references(images, single_images))
        preview = identities.crops.permute(0, 2, 3, 1).clamp(0, 1)
        notes = ui.PreviewText("\n".join(identities.notes)) if identities.notes else None  # "...using the largest"
        return io.NodeOutput(identities, preview, ui=notes)


class IdentityRerank(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UMOIdentityRerank",
            display_name="UMO Identity Rerank",
            category="UMO",
            description="Sorts candidate images by how well they show the reference people (best first).",
            inputs=[
                io.Image.Input("images"),
                FaceModelSocket.Input("face_model"),
                IdentitiesSocket.Input("identities"),
                io.Combo.Input("criterion", options=list(CRITERIA), default=DEFAULT_CRITERION,
                               tooltip="complete: every person present once first, then identity quality "
                                       "(README, Ranking); mimr, id_sim, id_conf: that metric"),
                io.Int.Input("top_k", default=1, min=0, max=4096, tooltip="how many to keep; 0 keeps all"),
            ],
            outputs=[io.Image.Output(display_name="best"), io.Image.Output(display_name="annotated"),
                     io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, images, face_model, identities, criterion, top_k) -> io.NodeOutput:
        scores = _progress_scores(face_model, identities, images)
        order = rank(scores, criterion)
        kept = order[:top_k] if top_k > 0 else order
        report = _table(scores, order, criterion)
        return io.NodeOutput(images[kept], _annotated(images, scores, kept), report)


class IdentityReport(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UMOIdentityReport",
            display_name="UMO Identity Report",
            category="UMO",
            description="Who is present, missing or shown twice, and ID-Sim, ID-Conf, MIMR, Sim(GT), CP and Bld "
                        "of each image against the reference people.",
            inputs=[
                io.Image.Input("images"),
                FaceModelSocket.Input("face_model"),
                IdentitiesSocket.Input("identities"),
                io.Image.Input("ground_truth", optional=True, tooltip="a photo of the same people, for Sim(GT) and CP"),
            ],
            outputs=[io.String.Output(display_name="report"), io.Image.Output(display_name="annotated")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, face_model, identities, ground_truth=None) -> io.NodeOutput:
        scores = _progress_scores(face_model, identities, images, ground_truth)
        report = _table(scores, rank(scores, DEFAULT_CRITERION), DEFAULT_CRITERION, input_order=True)
        order = list(range(len(scores)))
        return io.NodeOutput(report, _annotated(images, scores, order), ui=ui.PreviewText(report))
