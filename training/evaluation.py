"""Evaluation during training: images of fixed rows at fixed seeds, with their identity report.

Each evaluation writes `OUTPUT/eval/step_NNNNNN/` (one PNG per row and `report.json` with every
image's faces, assignment and metrics against the references and the target photo) and appends
the averaged metrics to `OUTPUT/eval.jsonl`, so the same images can be compared across steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from umo_core.backbones.flow import generate_image
from umo_core.faces.face_model import FaceModel
from umo_core.faces.metrics import average_metrics
from umo_core.faces.scoring import score_image
from umo_core.images import save_image

from .batches import Batch

EVAL_LOG_FILE = "eval.jsonl"  # one summary per evaluation


@torch.no_grad()
def evaluate(backbone, step: int, transformer, vae, face_model: FaceModel, batches: list[Batch], output: Path,
             seed: int, sampling_steps: int, guidance: float) -> dict:
    """Generate one image per evaluation row (seed + row), score it, write the images and the report."""
    folder = output / "eval" / f"step_{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for batch in batches:
        height, width = (side * backbone.latent_scale for side in batch.target.shape[2:])  # the target's bucket
        image = generate_image(backbone, transformer, vae, batch.text, batch.references, seed + batch.rows[0],
                               height, width, sampling_steps, guidance)
        name = f"row_{batch.rows[0]:04d}.png"
        save_image(image, folder / name)
        score = score_image(face_model, batch.identities[0], image, batch.ground_truth[0].embeddings)
        images.append({"row": batch.rows[0], "image": name, **score.to_json()})
    summary = {"step": step, **average_metrics([i["metrics"] for i in images])}
    report = {"step": step, "seed": seed, "sampling_steps": sampling_steps, "guidance": guidance,
              "summary": summary, "images": images}
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    with (output / EVAL_LOG_FILE).open("a") as log:
        log.write(json.dumps(summary) + "\n")
    return summary
