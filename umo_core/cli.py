"""`python -m umo_core score`: rank images by how well they show the reference people.
`python -m umo_core generate`: images of the reference people from a prompt (FLUX + UNO)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .arguments import at_least, check_device, check_seed, finite
from .backbones import DEFAULT, TRAINABLE, get
from .backbones.flow import needs_negative_prompt
from .backbones.text_embedding import TextEmbedding, check_negative, checked_text_embedding_widths, load_text_embeddings
from .console import HelpFormatter, command_status, progress, tell
from .errors import UMOError
from .evaluate import add_parser as add_evaluate_parser
from .evaluate import evaluate_command
from .faces.annotate import annotate
from .faces.embedding import BACKENDS
from .faces.face_model import load_face_model
from .faces.face_pack import DEFAULT_PACK_HELP, PROVIDER_CHOICES, default_face_pack
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

SIZE_MULTIPLE = 16  # generate's sides: FLUX's 2x2 patches of the 8x downscaled latent


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m umo_core", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", help="score and rank images against reference photos")
    score.add_argument("--faces", default=default_face_pack(), metavar="PACK",
                       help="face pack: a name looked up in $COMFYUI_PATH/models/insightface/models, "
                            "$INSIGHTFACE_HOME/models and ~/.insightface/models, or a folder (default "
                            f"{DEFAULT_PACK_HELP}; where to get one: the README's 'Face models')")
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
    _add_generate_parser(commands)
    add_evaluate_parser(commands)
    return parser


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class GenerateConfig:
    """One `generate` run (see `_add_generate_parser` for each field), checked when made: before any file is read
    or model loaded."""

    transformer: Path
    vae: Path
    references: tuple[Path, ...]
    out: Path
    backbone: str = DEFAULT  # a name in umo_core.backbones.TRAINABLE
    text_embedding: Path | None = None
    prompt: str | None = None
    text_encoders: Path | None = None
    faces: str | None = None  # None: default_face_pack(), skipped with a note where not installed
    lora: Path | None = None
    lora_strength: float = 1.0
    size: int = 768
    steps: int | None = None  # None: the backbone's for the transformer (sampling_defaults)
    guidance: float | None = None
    seed: int = 0
    count: int = 1
    device: str = field(default_factory=_default_device)

    def __post_init__(self) -> None:
        if self.backbone not in TRAINABLE:
            raise UMOError(f"--backbone '{self.backbone}' is not one of {', '.join(TRAINABLE)}")
        if (self.text_embedding is None) == (self.prompt is None):
            raise UMOError("give the prompt as --prompt (with --text-encoders) or as --text-embedding, one of them")
        if self.prompt is None and self.text_encoders:
            raise UMOError("--text-encoders goes with --prompt; with --text-embedding leave it out")
        if self.prompt is not None and not self.text_encoders:
            raise UMOError(f"--prompt needs --text-encoders: {get(self.backbone).text_encoder_files}")
        if not self.references:
            raise UMOError("give --ref: one reference photo per person")
        if self.size < SIZE_MULTIPLE or self.size % SIZE_MULTIPLE:
            below = max(SIZE_MULTIPLE, self.size // SIZE_MULTIPLE * SIZE_MULTIPLE)
            raise UMOError(f"--size {self.size} must be a multiple of {SIZE_MULTIPLE} (FLUX's latent patches); "
                           f"give e.g. {below} or {below + SIZE_MULTIPLE}")
        if self.steps is not None:
            at_least("--steps", self.steps, 1)
        at_least("--count", self.count, 1, " (images to make)")
        if self.guidance is not None:
            at_least("--guidance", self.guidance, 0)
        finite("--lora-strength", self.lora_strength)
        check_seed("--seed", self.seed, self.count)
        check_device("--device", self.device)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> GenerateConfig:
        values = {name: getattr(args, name) for name in cls.__dataclass_fields__ if name != "references"}
        return cls(references=tuple(args.ref), **values)


def _add_generate_parser(commands) -> None:
    generate = commands.add_parser("generate", help="images of the reference people from a prompt (FLUX.1 + UNO, "
                                                    "or FLUX.2)", formatter_class=HelpFormatter)
    generate.add_argument("--backbone", choices=TRAINABLE, default=GenerateConfig.backbone,
                          help="flux1: FLUX.1 with UNO's references; flux2: FLUX.2 [klein] or [dev]")
    generate.add_argument("--transformer", type=Path, required=True,
                          help="transformer: diffusers folder or single .safetensors file (flux1-dev.safetensors, "
                               "flux-2-klein-4b.safetensors ...)")
    generate.add_argument("--vae", type=Path, required=True,
                          help="autoencoder: diffusers folder or single .safetensors file (ae.safetensors, "
                               "flux2-vae.safetensors)")
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--text-embedding", type=Path, help="safetensors with prompt_embeds (and FLUX.1's "
                        "pooled_prompt_embeds), made for --backbone (python -m training.encode_prompts writes them)")
    prompt.add_argument("--prompt", help="the prompt, encoded with the text encoders of --text-encoders")
    generate.add_argument("--text-encoders", type=Path, help="with --prompt: the backbone's diffusers folder "
                          "(FLUX.1: text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/; FLUX.2 [klein]: "
                          "text_encoder/, tokenizer/)")
    generate.add_argument("--ref", action="append", required=True, type=Path, help="reference photo, one per person")
    generate.add_argument("--faces", help=f"face pack that checks each --ref shows a face (default "
                          f"{DEFAULT_PACK_HELP}; where that is not installed the check is skipped with a note)")
    generate.add_argument("--lora", type=Path, help="UMO_UNO.safetensors or a LoRA from the trainer (of --backbone)")
    generate.add_argument("--lora-strength", type=float, default=GenerateConfig.lora_strength,
                          help="the LoRA's weight delta is scaled by this")
    generate.add_argument("--size", type=int, default=GenerateConfig.size,
                          help=f"width and height (a multiple of {SIZE_MULTIPLE})")
    generate.add_argument("--steps", type=int, help="sampling steps (default: the backbone's, 25 for FLUX.1; 4 for a "
                          "distilled FLUX.2 klein, 50 for klein base and dev)")
    generate.add_argument("--guidance", type=float, help="guidance (default: the backbone's, 4; 1 for a distilled "
                          "klein, which ignores it)")
    generate.add_argument("--seed", type=int, default=GenerateConfig.seed, help="seed of the first image")
    generate.add_argument("--count", type=int, default=GenerateConfig.count,
                          help="images to make (seeds seed, seed+1, ...)")
    generate.add_argument("--out", type=Path, required=True, help="output folder (made if missing)")
    generate.add_argument("--device", default=_default_device(),
                          help="torch device: cpu, cuda or cuda:N (default here %(default)s: cuda where torch sees a "
                               "GPU, else cpu)")


def _guidance(config: GenerateConfig, backbone) -> float:
    """--guidance, or the backbone's for the transformer."""
    return backbone.sampling_defaults(config.transformer)[1] if config.guidance is None else config.guidance


def _prompt_embedding(config: GenerateConfig, backbone, dtype: torch.dtype, negative: bool) -> TextEmbedding:
    """--text-embedding's file, or --prompt encoded with the backbone's text encoders of --text-encoders; with the
    empty prompt's embedding only where the sampling is classifier-free guidance (`negative`)."""
    if config.prompt is None:
        return load_text_embeddings([config.text_embedding], negative=negative)
    encoders = backbone.load_text_encoders(config.text_encoders, dtype, config.device)
    text = backbone.encode_prompts(encoders, [config.prompt])
    return text if negative else replace(text, negative_prompt_embeds=None)


def _check_generate_inputs(config: GenerateConfig) -> list[np.ndarray]:
    """Every file `generate` reads, from its header, and the output folder, before any model loads (seconds, not
    the minutes of loading FLUX); the reference photos."""
    backbone = get(config.backbone)
    widths = backbone.transformer_text_widths(config.transformer)
    backbone.check_vae(config.vae)
    if config.text_embedding is not None:
        hint = "make it with python -m training.encode_prompts, or give --prompt and --text-encoders"
        if not config.text_embedding.is_file():
            raise UMOError(f"--text-embedding '{config.text_embedding}' does not exist or is not a file; {hint}")
        name = f"--text-embedding '{config.text_embedding}'"
        checked_text_embedding_widths(config.text_embedding, name, f"{hint} --backbone {backbone.name}", backbone,
                                      widths)
        if needs_negative_prompt(backbone, config.transformer, _guidance(config, backbone)):
            check_negative(config.text_embedding, name, "make it again with python -m training.encode_prompts "
                           f"--backbone {backbone.name} (it encodes the files that lack it), or give --prompt and "
                           "--text-encoders, or --guidance 1")
    if config.lora and not config.lora.is_file():
        raise UMOError(f"--lora '{config.lora}' does not exist or is not a file; give the path of a UNO-layout "
                       "(UMO_UNO) or diffusers FLUX LoRA .safetensors (FLUX.2: the trainer's lora_comfy or "
                       "lora_diffusers file)")
    if config.out.exists() and not config.out.is_dir():
        raise UMOError(f"--out '{config.out}' is a file; give a folder for the images (it is made if missing)")
    _writable_folder(config.out, f"--out '{config.out}'")
    notes: list[str] = []
    photos = [load_image(path, label, notes) for path, label in zip(config.references, _reference_labels(config))]
    for note in notes:
        tell("note", note)
    return photos


def _reference_labels(config: GenerateConfig) -> list[str]:
    return [f"reference {i + 1} '{path}'" for i, path in enumerate(config.references)]


def _warn_faceless_references(config: GenerateConfig, photos: list[np.ndarray]) -> None:
    """A warning per reference without a face: UNO takes any picture as a reference, but UMO's LoRA is trained to
    keep faces (`score` refuses such a reference: it has no one to score against)."""
    pack = config.faces or default_face_pack()
    try:
        face_model = load_face_model(pack, provider="auto", backend="onnx")
    except UMOError as error:
        if config.faces:
            raise
        tell("note", f"the references are not checked for faces ({error}); give --faces to check them")
        return
    for photo, label in zip(photos, _reference_labels(config)):
        if len(face_model.detect(photo)[0]) == 0:
            tell("warning", f"{label}: no face found; UMO keeps the identity of the faces in the references, so "
                            "use a photo where the person's face is clearly visible")


def generate_command(config: GenerateConfig) -> list[Path]:
    """The headless twin of the UMO-UNO ComfyUI graph, for any backbone."""
    from .backbones.flow import generate_image
    from .backbones.lora_formats import merge_lora_weights

    backbone = get(config.backbone)
    photos = _check_generate_inputs(config)
    lora = backbone.load_lora(config.lora) if config.lora else None  # another backbone's LoRA: named here
    _warn_faceless_references(config, photos)
    steps = config.steps or backbone.sampling_defaults(config.transformer)[0]
    guidance = _guidance(config, backbone)
    dtype = torch.bfloat16 if torch.device(config.device).type == "cuda" else torch.float32
    # The prompt first: the text encoders are freed before the transformer takes the memory.
    text = _prompt_embedding(config, backbone, dtype, needs_negative_prompt(backbone, config.transformer, guidance))
    transformer = backbone.load_transformer(config.transformer, dtype).to(config.device)
    vae = backbone.load_vae(config.vae, dtype).to(config.device)
    if lora is not None:
        merge_lora_weights(transformer, lora, config.lora_strength)
    with torch.no_grad():
        references = [backbone.encode_images(vae, backbone.resize_reference(photo, len(photos))[None])
                      for photo in photos]
    config.out.mkdir(parents=True, exist_ok=True)
    written = []
    for seed in range(config.seed, config.seed + config.count):
        image = generate_image(backbone, transformer, vae, text, references, seed, config.size, config.size, steps,
                               guidance)
        path = config.out / f"umo_{seed:06d}.png"
        save_image(image, path)
        written.append(path)
        print(path)
    return written


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
        tell("warning", warning)

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
        tell("note", note)

    def images():  # loaded one at a time, as the scoring reaches them
        for path, label in zip(args.image, image_labels):
            image_notes: list[str] = []
            image = load_image(path, label, image_notes, args.max_pixels)
            for note in image_notes:
                tell("note", note)
            notes.extend(image_notes)
            yield image

    with progress(len(args.image), "scoring", "image", leave=False) as bar:
        scores = score_images(face_model, identities, images(), gt_embeddings, progress=lambda _: bar.update())
    criterion, warning = _ranking_criterion(args.criterion, scores)
    if warning:
        tell("warning", warning)
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
            save_image(drawn, args.annotate / annotated_name(place, index, len(args.image), path))
    return report


STOPPED = {  # what a command that is stopped keeps (console.command_status's line)
    "score": "nothing more is written; a report or annotated copy already written is whole",
    "evaluate": "the images scored so far, if any, are kept in --out's cache; the same command goes on from there",
    "generate": "the images listed above are whole; the one being made is not written",
}


def _run(args: argparse.Namespace) -> int:
    if args.command == "score":
        score_command(args)
    elif args.command == "evaluate":
        _writable_folder(args.out, f"--out '{args.out}'")
        evaluate_command(args)
    else:
        generate_command(GenerateConfig.from_args(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return command_status(lambda: _run(args), STOPPED[args.command])
