"""`python -m umo_core score`: rank images by how well they show the reference people."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from .annotate import annotate
from .errors import UMOError
from .face_model import load_face_model
from .flux import TextEmbedding
from .images import load_image
from .scoring import CRITERIA, rank, score_images

DEFAULT_PACK = "antelopev2"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m umo_core", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", help="score and rank images against reference photos")
    score.add_argument("--faces", default=os.environ.get("UMO_FACE_PACK", DEFAULT_PACK),
                       help="face pack name (looked up in ComfyUI's models/insightface/models and "
                            "~/.insightface/models) or folder; default $UMO_FACE_PACK or antelopev2")
    score.add_argument("--ref", action="append", required=True, type=Path, help="reference photo, one per person")
    score.add_argument("--image", action="extend", nargs="+", required=True, type=Path, help="images to score")
    score.add_argument("--gt", type=Path, help="ground-truth photo of the same people (for Sim(GT) and CP)")
    score.add_argument("--criterion", choices=CRITERIA, default="mimr", help="ranking criterion (default mimr)")
    score.add_argument("--json", type=Path, help="write the full report as JSON here")
    score.add_argument("--annotate", type=Path, help="write annotated copies of the images into this folder")
    score.add_argument("--provider", default="auto", help="onnxruntime provider: auto, cpu, cuda, rocm, coreml")
    score.add_argument("--backend", choices=("onnx", "torch"), default="onnx", help="face embedder backend")
    generate = commands.add_parser("generate", help="images of the reference people from a prompt (FLUX + UNO)")
    generate.add_argument("--transformer", type=Path, required=True,
                          help="FLUX transformer: diffusers folder or single .safetensors file (flux1-dev.safetensors)")
    generate.add_argument("--vae", type=Path, required=True,
                          help="FLUX autoencoder: diffusers folder or single .safetensors file (ae.safetensors)")
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--text-embedding", type=Path, help="safetensors with prompt_embeds and pooled_prompt_embeds "
                        "(python -m training.encode_prompts writes them)")
    prompt.add_argument("--prompt", help="the prompt, encoded with the text encoders of --text-encoders")
    generate.add_argument("--text-encoders", type=Path, help="with --prompt: diffusers FLUX folder with text_encoder/, "
                          "tokenizer/, text_encoder_2/ and tokenizer_2/")
    generate.add_argument("--ref", action="append", required=True, type=Path, help="reference photo, one per person")
    generate.add_argument("--lora", type=Path, help="UMO_UNO.safetensors or a LoRA from the trainer")
    generate.add_argument("--lora-strength", type=float, default=1.0)
    generate.add_argument("--size", type=int, default=768, help="width and height (multiple of 16)")
    generate.add_argument("--steps", type=int, default=25)
    generate.add_argument("--guidance", type=float, default=4.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--count", type=int, default=1, help="images to make (seeds seed, seed+1, ...)")
    generate.add_argument("--out", type=Path, required=True, help="output folder")
    generate.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def _prompt_embedding(args: argparse.Namespace, dtype: torch.dtype) -> TextEmbedding:
    """--text-embedding's file, or --prompt encoded with the text encoders of --text-encoders."""
    if args.prompt is None:
        if args.text_encoders:
            raise UMOError("--text-encoders goes with --prompt; with --text-embedding leave it out")
        embedding = load_file(args.text_embedding)
        return TextEmbedding(embedding["prompt_embeds"][None], embedding["pooled_prompt_embeds"][None])
    if not args.text_encoders:
        raise UMOError("--prompt needs --text-encoders: a diffusers FLUX folder with text_encoder/, tokenizer/, "
                       "text_encoder_2/ and tokenizer_2/")
    from .text_encoders import encode_prompts, load_text_encoders

    return encode_prompts(load_text_encoders(args.text_encoders, dtype, args.device), [args.prompt])


def generate_command(args: argparse.Namespace) -> list[Path]:
    """The headless twin of the UMO-UNO ComfyUI graph."""
    from .flux import decode_latents, encode_images, load_transformer, load_vae, merge_lora, sample
    from .images import float_image
    from .references import reference_long_side, resize_reference

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    # The prompt first: the text encoders are freed before the transformer takes the memory.
    text = _prompt_embedding(args, dtype)
    transformer = load_transformer(args.transformer, dtype).to(args.device)
    vae = load_vae(args.vae, dtype).to(args.device)
    if args.lora:
        merge_lora(transformer, args.lora, args.lora_strength)
    side = reference_long_side(len(args.ref))
    with torch.no_grad():
        references = [encode_images(vae, resize_reference(float_image(load_image(p)), side)[None]) for p in args.ref]
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(args.count):
        generator = torch.Generator().manual_seed(args.seed + index)
        noise = torch.randn(1, 16, args.size // 8, args.size // 8, generator=generator).to(args.device)
        latent = sample(transformer, noise, text, references, args.steps, args.guidance)
        with torch.no_grad():
            image = decode_latents(vae, latent)[0]
        path = args.out / f"umo_{args.seed + index:06d}.png"
        Image.fromarray((image.cpu().numpy() * 255 + 0.5).astype("uint8")).save(path)
        written.append(path)
        print(path)
    return written


def _format(value: float | None) -> str:
    return "null" if value is None else f"{value:.3f}"


def score_command(args: argparse.Namespace) -> dict:
    face_model = load_face_model(args.faces, provider=args.provider, backend=args.backend)
    references = [load_image(path) for path in args.ref]
    images = [load_image(path) for path in args.image]
    ground_truth = load_image(args.gt) if args.gt else None
    identities = face_model.identities(references, names=[f"reference {i + 1} ('{p}')" for i, p in enumerate(args.ref)])
    for note in identities.notes:
        print(f"note: {note}", file=sys.stderr)
    scores = score_images(face_model, identities, images, ground_truth)
    ranking = rank(scores, args.criterion)

    report = {
        "criterion": args.criterion,
        "ranking": ranking,
        "face_pack": str(face_model.pack.directory),
        "references": [{"path": str(p), "bbox": box} for p, box in zip(args.ref, identities.faces.boxes.tolist())],
        "ground_truth": str(args.gt) if args.gt else None,
        "images": [{"path": str(p), "faces": s.faces_json(), "similarity": s.similarity,
                    "assignment": s.assignment, "metrics": s.metrics} for p, s in zip(args.image, scores)],
    }

    print(f"{len(args.ref)} reference(s), {len(images)} image(s), face pack {face_model.pack.directory}")
    print(f"ranking by {args.criterion}, best first:")
    for place, index in enumerate(ranking, 1):
        metrics = scores[index].metrics
        shown = "  ".join(f"{name} {_format(value)}" for name, value in metrics.items())
        print(f"{place:3d}. {args.image[index]}  faces {len(scores[index].faces)}  {shown}")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    if args.annotate:
        args.annotate.mkdir(parents=True, exist_ok=True)
        for i, (path, image, score) in enumerate(zip(args.image, images, scores)):
            drawn = annotate(image, score.faces, score.similarity, score.assignment)
            Image.fromarray(drawn).save(args.annotate / f"{i:02d}_{path.stem}.png")
    return report


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        (score_command if args.command == "score" else generate_command)(args)
    except UMOError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
