"""`python -m umo_core score`: rank images by how well they show the reference people."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from .backbones.flux1.text_embedding import TextEmbedding, load_text_embeddings
from .errors import UMOError
from .faces.annotate import annotate
from .faces.embedding import BACKENDS
from .faces.face_model import load_face_model
from .faces.face_pack import PROVIDER_CHOICES
from .faces.scoring import (
    CRITERIA,
    DEFAULT_CRITERION,
    ImageScore,
    ground_truth_embeddings,
    rank,
    score_images,
    score_table,
)
from .files import atomic_path, is_symlink_loop
from .images import MAX_PIXELS, MAX_PIXELS_ENV, check_image_file, load_image, pixel_limit, save_image

DEFAULT_PACK = "antelopev2"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m umo_core", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", help="score and rank images against reference photos")
    score.add_argument("--faces", default=os.environ.get("UMO_FACE_PACK", DEFAULT_PACK), metavar="PACK",
                       help="face pack: a name looked up in $COMFYUI_PATH/models/insightface/models, "
                            "$INSIGHTFACE_HOME/models and ~/.insightface/models, or a folder (default "
                            f"$UMO_FACE_PACK, else {DEFAULT_PACK}; where to get one: the README's 'Face models')")
    score.add_argument("--ref", action="append", required=True, type=Path, metavar="PHOTO",
                       help="reference photo, one per person, in order (required; repeat for each person)")
    score.add_argument("--image", action="extend", nargs="+", required=True, type=Path,
                       help="images to score (required; one or more, the flag may repeat)")
    score.add_argument("--gt", type=Path, metavar="PHOTO",
                       help="ground-truth photo of the same people, for sim_gt and cp (default: none, they are null)")
    score.add_argument("--criterion", choices=CRITERIA, default=DEFAULT_CRITERION,
                       help=f"ranking criterion (default {DEFAULT_CRITERION}: every person present once first, see "
                            f"the README's Ranking; where every image's value is null, the ranking is by "
                            f"{DEFAULT_CRITERION}, with a warning)")
    score.add_argument("--json", type=Path, metavar="FILE",
                       help="write the full report as JSON to this file (default: none)")
    score.add_argument("--annotate", type=Path, metavar="FOLDER",
                       help="write annotated copies of the images into this folder, made if missing (default: none)")
    score.add_argument("--provider", default="auto", help=f"onnxruntime provider: {', '.join(PROVIDER_CHOICES)} "
                       "(default auto: cuda where onnxruntime and torch have a GPU, else cpu)")
    score.add_argument("--backend", choices=BACKENDS, default="onnx",
                       help="face embedder: onnx (onnxruntime, fastest) or torch (the differentiable network over "
                            "the same file) (default onnx)")
    score.add_argument("--max-pixels", type=int, metavar="N",
                       help=f"refuse image files with more pixels than this (default ${MAX_PIXELS_ENV} or "
                            f"{MAX_PIXELS}; 0 = no limit)")
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
        return load_text_embeddings([args.text_embedding])
    if not args.text_encoders:
        raise UMOError("--prompt needs --text-encoders: a diffusers FLUX folder with text_encoder/, tokenizer/, "
                       "text_encoder_2/ and tokenizer_2/")
    from .backbones.flux1.text_encoders import encode_prompts, load_text_encoders

    return encode_prompts(load_text_encoders(args.text_encoders, dtype, args.device), [args.prompt])


def generate_command(args: argparse.Namespace) -> list[Path]:
    """The headless twin of the UMO-UNO ComfyUI graph."""
    from .backbones.flux1.generation import generate_image
    from .backbones.flux1.loading import load_transformer, load_vae, merge_lora
    from .backbones.flux1.runtime import encode_images
    from .backbones.references import reference_long_side, resize_reference

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    # The prompt first: the text encoders are freed before the transformer takes the memory.
    text = _prompt_embedding(args, dtype)
    transformer = load_transformer(args.transformer, dtype).to(args.device)
    vae = load_vae(args.vae, dtype).to(args.device)
    if args.lora:
        merge_lora(transformer, args.lora, args.lora_strength)
    side = reference_long_side(len(args.ref))
    references = []
    with torch.no_grad():
        for i, path in enumerate(args.ref):
            photo = load_image(path, f"reference {i + 1} '{path}'")
            references.append(encode_images(vae, resize_reference(photo, side)[None]))
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for seed in range(args.seed, args.seed + args.count):
        image = generate_image(transformer, vae, text, references, seed, args.size, args.size, args.steps,
                               args.guidance)
        path = args.out / f"umo_{seed:06d}.png"
        save_image(image, path)
        written.append(path)
        print(path)
    return written


def _tell(kind: str, text: str) -> None:
    """A 'note:' or 'warning:' line on stderr that does not break the progress bar."""
    tqdm.write(f"{kind}: {text}", file=sys.stderr)


def _writable_folder(folder: Path, what: str) -> None:
    """`folder`, or the nearest of its parents that exists, must be a folder that takes new files.

    Tried by creating (and at once removing) a temporary file: permission bits say nothing about
    root, read-only mounts or /proc.
    """
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UMOError(f"{what}: '{existing}' is a file, not a folder; choose another place")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UMOError(f"{what}: cannot create files in '{existing}' ({error.strerror}); "
                       "choose another place") from None


def _check_outputs(args: argparse.Namespace) -> None:
    """--json and --annotate must be writable before any model is loaded (a bad path is a 2-second error,
    not one after all the scoring)."""
    inputs = {path.resolve() for path in [*args.ref, *args.image, *([args.gt] if args.gt else [])]}
    if args.json:
        what = f"--json '{args.json}'"
        if is_symlink_loop(args.json):
            raise UMOError(f"{what} is a symbolic link loop (its links lead back to themselves); give another "
                           "file name")
        if args.json.is_dir():
            raise UMOError(f"{what} is a folder; give a file name such as '{args.json / 'report.json'}'")
        if args.json.resolve() in inputs:
            raise UMOError(f"{what} is one of the input photos; give another file name for the report")
        if args.json.exists() and not os.access(args.json, os.W_OK):
            raise UMOError(f"{what} exists and is read-only; give another file name or make it writable")
        _writable_folder(args.json.parent, what)
    if args.annotate:
        what = f"--annotate '{args.annotate}'"
        if is_symlink_loop(args.annotate):
            raise UMOError(f"{what} is a symbolic link loop (its links lead back to themselves); give another "
                           "folder")
        if args.annotate.exists() and not args.annotate.is_dir():
            raise UMOError(f"{what} is a file; give a folder for the annotated copies (it is made if missing)")
        _writable_folder(args.annotate, what)


def _file_digest(path: Path) -> str | None:
    """sha256 of a file's bytes, None when it cannot be read (reading it later says why)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _same_reference_warnings(references: list[Path], labels: list[str]) -> list[str]:
    """Warnings for a reference given twice: the same file, or another file with the same bytes."""
    first_by_file: dict[Path, int] = {}
    first_by_bytes: dict[str, int] = {}
    warnings = []
    for index, path in enumerate(references):
        file, digest = path.resolve(), _file_digest(path)
        if file in first_by_file:
            same = f"is the same file as {labels[first_by_file[file]]}"
        elif digest is not None and digest in first_by_bytes:
            same = f"has the same content as {labels[first_by_bytes[digest]]}"
        else:
            same = None
        if same:
            warnings.append(f"{labels[index]} {same}; each reference should be a different person "
                            "(one person's two references split its faces between them)")
        first_by_file.setdefault(file, index)
        if digest is not None:
            first_by_bytes.setdefault(digest, index)
    return warnings


def annotated_name(place: int, index: int, count: int, path: Path) -> str:
    """The annotated copy's file name: rank and input number (1-based, zero-padded to the count), stem."""
    digits = max(2, len(str(count)))
    return f"rank{place:0{digits}d}_img{index + 1:0{digits}d}_{path.stem}.png"


def _ranking_criterion(criterion: str, scores: list[ImageScore]) -> tuple[str, str | None]:
    """The criterion that ranks the images: `criterion`, or DEFAULT_CRITERION with a warning where `criterion`
    is null (undefined) for every image, since it would then rank nothing (the input order)."""
    if criterion == DEFAULT_CRITERION or any(score.metrics[criterion] is not None for score in scores):
        return criterion, None
    return DEFAULT_CRITERION, (f"--criterion {criterion}: every image's {criterion} is null (undefined: see the "
                               f"README's metrics table), so it cannot rank them; ranked by {DEFAULT_CRITERION} "
                               "instead")


def score_command(args: argparse.Namespace) -> dict:
    reference_labels = [f"reference {i + 1} '{p}'" for i, p in enumerate(args.ref)]
    image_labels = [f"image {i + 1} '{p}'" for i, p in enumerate(args.image)]
    gt_label = f"--gt '{args.gt}'"
    # Every input is a file before any model loads: a typo in the last image is not found after the rest are scored.
    for path, label in [*zip(args.ref, reference_labels), *zip(args.image, image_labels),
                        *([(args.gt, gt_label)] if args.gt else [])]:
        check_image_file(path, label)
    _check_outputs(args)
    pixel_limit(args.max_pixels)  # a bad --max-pixels or $UMO_MAX_PIXELS is named before the models load
    for warning in _same_reference_warnings(args.ref, reference_labels):
        _tell("warning", warning)

    face_model = load_face_model(args.faces, provider=args.provider, backend=args.backend)
    notes = list(face_model.notes)
    references = [load_image(p, label, notes, args.max_pixels) for p, label in zip(args.ref, reference_labels)]
    ground_truth = load_image(args.gt, gt_label, notes, args.max_pixels) if args.gt else None
    identities = face_model.identities(references, names=reference_labels)
    notes += identities.notes
    gt_embeddings = ground_truth_embeddings(face_model, ground_truth) if ground_truth is not None else None
    if gt_embeddings is not None and len(gt_embeddings) == 0:
        notes.append(f"{gt_label} shows no face, so sim_gt and cp are null for every image; "
                     "give a photo where the people's faces are clearly visible")
    for note in notes:
        _tell("note", note)

    def images():  # loaded one at a time, as the scoring reaches them
        for path, label in zip(args.image, image_labels):
            image_notes: list[str] = []
            image = load_image(path, label, image_notes, args.max_pixels)
            for note in image_notes:
                _tell("note", note)
            notes.extend(image_notes)
            yield image

    with tqdm(total=len(args.image), desc="scoring", unit="image", file=sys.stderr, disable=None,
              leave=False) as bar:
        scores = score_images(face_model, identities, images(), gt_embeddings, progress=lambda _: bar.update())
    criterion, warning = _ranking_criterion(args.criterion, scores)
    if warning:
        _tell("warning", warning)
        notes.append(warning)
    ranking = rank(scores, criterion)

    report = {
        "criterion": criterion,
        "ranking": ranking,
        "face_pack": str(face_model.pack.directory),
        "same_person_threshold": face_model.same_person_threshold,
        "notes": notes,
        "references": [{"path": str(p), "bbox": box} for p, box in zip(args.ref, identities.faces.boxes.tolist())],
        "ground_truth": str(args.gt) if args.gt else None,
        "images": [{"path": str(p), **s.to_json()} for p, s in zip(args.image, scores)],
    }

    print(f"{len(args.ref)} reference(s), {len(args.image)} image(s), face pack {face_model.pack.directory}")
    print(f"ranking by {criterion}, best first:")
    for line in score_table(scores, ranking, [str(p) for p in args.image]):
        print(line)

    if args.json:
        try:
            with atomic_path(args.json) as temporary:
                temporary.write_text(json.dumps(report, indent=2))
        except OSError as error:
            raise UMOError(f"--json '{args.json}' cannot be written ({error.strerror})") from None
    if args.annotate:
        args.annotate.mkdir(parents=True, exist_ok=True)
        for place, index in enumerate(ranking, 1):
            path = args.image[index]
            # Read again rather than kept: scoring many images holds one image in memory at a time.
            drawn = annotate(load_image(path, image_labels[index], max_pixels=args.max_pixels), scores[index])
            with atomic_path(args.annotate / annotated_name(place, index, len(args.image), path),
                             suffix=".tmp.png") as temporary:  # PIL picks the format by the suffix
                save_image(drawn, temporary)
    return report


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        (score_command if args.command == "score" else generate_command)(args)
    except UMOError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
