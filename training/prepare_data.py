"""Build a UMO training set from a photo collection (README "Building a training set").

    python -m training.prepare_data --photos PHOTOS --out DATA --faces antelopev2 [--people PEOPLE]
    torchrun --nproc_per_node 4 -m training.prepare_data ...   # the embedding pass on 4 processes
    python -m training.prepare_data ... --shard 3/8              # part 3 of 8 of the embedding pass only

Every photo under PHOTOS is detected and embedded once (cached on disk by content and face pack);
its faces are matched to the people of PEOPLE (one sub-folder of photos per person) or, without
--people, grouped into identities by clustering. Each photo whose people are all identified becomes
a row of DATA/manifest.jsonl with one reference crop per person, cut from that person's best *other*
photo. DATA/report.md says what was used and why the rest was not; DATA/sheets/ shows each
identity's faces. Then: python -m training.encode_prompts --data DATA --text-encoders FLUX.1-dev.
"""

from __future__ import annotations

import signal
import sys

if __name__ == "__main__":
    # Before the imports below, which load torch and onnxruntime for seconds: a Ctrl-C meanwhile is one line, not a
    # traceback from inside an import. (console.command_status takes over in main; it cannot be imported yet.)
    # ruff: noqa: E402 (the imports below come after this block on purpose)
    def _stopped_while_starting(number: int, _frame) -> None:
        print("stopped by Ctrl-C while starting: nothing was read or written", file=sys.stderr)
        raise SystemExit(128 + number)

    signal.signal(signal.SIGINT, _stopped_while_starting)

import argparse
import datetime
import math
import os
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from umo_core import UMOError, load_face_model
from umo_core.arguments import at_least, in_range
from umo_core.console import HelpFormatter, command_status, exit_program, ignore_stop_signals, tell
from umo_core.faces.embedding import BACKENDS
from umo_core.faces.face_pack import FACE_PACK_ENV, PROVIDER_CHOICES, default_face_pack
from umo_core.files import check_folder_lock, folder_lock
from umo_core.images import MAX_PIXELS, MAX_PIXELS_ENV, pixel_limit

from .dataset_builder import filters as quality
from .dataset_builder.cache import FaceCache, pack_key
from .dataset_builder.embedding_pass import PassResult, embed_photos
from .dataset_builder.faces import PhotoFaces
from .dataset_builder.identities import (
    DEFAULT_CLUSTER_THRESHOLD,
    DEFAULT_MATCH_THRESHOLD,
    FaceId,
    cluster_faces,
    match_people,
    own_faces,
)
from .dataset_builder.photos import PhotoFile, list_photos, sidecar_prompt
from .dataset_builder.references import DEFAULT_MARGIN, MAX_REFERENCE_MARGIN
from .dataset_builder.report import Decisions, build_report, write_report
from .dataset_builder.rows import (
    DEFAULT_PROMPT_TEMPLATE,
    MIXED_SPLIT,
    UNREADABLE,
    select_rows,
    split_by_identity,
)
from .dataset_builder.writer import check_cache_folder, check_output_folder, write_data_folders

PEOPLE_PREFIX = "people:"  # names of --people photos: people:<person>/<file>, apart from the collection's
COMMAND = "training.prepare_data"  # as the lock names the run
DISTRIBUTED_TIMEOUT = datetime.timedelta(days=7)  # ranks wait for the slowest shard's embedding pass


@dataclass(frozen=True)
class PrepareSettings:
    """The run's settings, built once from the command line and checked (settings_from) before any file is read."""

    photos: Path
    people: Path | None
    out: Path
    faces: str
    provider: str
    backend: str
    min_people: int
    max_people: int
    match_threshold: float
    cluster_threshold: float
    same_photo_references: bool
    reference_margin: float
    min_face_size: float
    min_score: float
    min_sharpness: float
    border_margin: float
    duplicate_bits: int
    prompt_template: str
    eval_fraction: float
    eval_out: Path
    seed: int
    cache: Path
    shard: tuple[int, int] | None
    batch_size: int
    workers: int
    max_pixels: int

    @property
    def filters(self) -> quality.QualityFilters:
        return quality.QualityFilters(self.min_face_size, self.min_score, self.min_sharpness, self.border_margin,
                                      self.duplicate_bits)

    def report(self) -> dict:
        """The settings as report.json records them."""
        return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(self).items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.prepare_data", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--photos", type=Path, required=True, help="folder (tree) of photos: jpg, png, webp, ...")
    parser.add_argument("--people", type=Path, help="one sub-folder per person, named after them, with their photos")
    parser.add_argument("--out", type=Path, required=True, help="the data folder to write")
    parser.add_argument("--faces", default=default_face_pack(),
                        help=f"face pack name or folder (${FACE_PACK_ENV} where set)")
    parser.add_argument("--provider", default="auto", help=f"onnxruntime provider: {', '.join(PROVIDER_CHOICES)}")
    parser.add_argument("--backend", choices=BACKENDS, default="onnx", help="face embedder backend")
    parser.add_argument("--min-people", type=int, default=1, help="fewest people in a row's photo")
    parser.add_argument("--max-people", type=int, default=6, help="most people in a row's photo")
    parser.add_argument("--match-threshold", type=float, default=DEFAULT_MATCH_THRESHOLD,
                        help="--people: least cosine similarity for a face to be that person (0 to 1)")
    parser.add_argument("--cluster-threshold", type=float, default=DEFAULT_CLUSTER_THRESHOLD,
                        help="clustering: cosine distance (1 - similarity) where average-linkage groups stop merging "
                             "(0 to 1)")
    parser.add_argument("--same-photo-references", action="store_true",
                        help="a person with no other photo gets a reference cropped from the target (row marked)")
    parser.add_argument("--reference-margin", type=float, default=DEFAULT_MARGIN,
                        help=f"reference crops: margin on each side, as a fraction of the face box (0 to "
                             f"{MAX_REFERENCE_MARGIN:g})")
    parser.add_argument("--min-face-size", type=float, default=quality.DEFAULT_MIN_FACE_SIZE,
                        help="px (face box short side); smaller faces are background")
    parser.add_argument("--min-score", type=float, default=quality.DEFAULT_MIN_SCORE,
                        help="detector score (0 to 1); lower-scoring faces are ignored")
    parser.add_argument("--min-sharpness", type=float, default=quality.DEFAULT_MIN_SHARPNESS,
                        help="variance of the Laplacian of the aligned face; blurrier faces are rejected")
    parser.add_argument("--border-margin", type=float, default=quality.DEFAULT_BORDER_MARGIN,
                        help="faces closer to the border than this fraction of their size are cut (at most 1; "
                             "negative: keep them)")
    parser.add_argument("--duplicate-bits", type=int, default=quality.DEFAULT_DUPLICATE_BITS,
                        help=f"photos whose 64-bit difference hashes differ in at most this many bits (at most "
                             f"{quality.MAX_DUPLICATE_BITS}) and that show the same faces are near-duplicates; later "
                             "ones are left out (negative: keep them)")
    parser.add_argument("--prompt-template", default=DEFAULT_PROMPT_TEMPLATE,
                        help="prompt of photos without a sidecar .txt; {n}: number of people, {people}: in words")
    parser.add_argument("--eval-fraction", type=float, default=0.0,
                        help="hold out people (all their rows) for about this fraction of the rows (0 to below 1)")
    parser.add_argument("--eval-out", type=Path, help="the evaluation data folder (default OUT-eval)")
    parser.add_argument("--seed", type=int, default=0, help="which people are held out")
    parser.add_argument("--cache", type=Path, help="embedding cache folder (default OUT/.face-cache)")
    parser.add_argument("--shard", help="K/N: run part K (0..N-1) of the embedding pass only, for a job array")
    parser.add_argument("--batch-size", type=int, default=16, help="photos whose faces are embedded together")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="threads reading photos")
    parser.add_argument("--max-pixels", type=int, help=f"refuse photos with more pixels than this (default "
                        f"${MAX_PIXELS_ENV} or {MAX_PIXELS}; 0 = no limit)")
    return parser.parse_args(argv)


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UMOError(f"--shard '{text}' must be K/N, e.g. 0/4 for the first of four parts") from None
    if not 0 <= index < count:
        raise UMOError(f"--shard '{text}': K must be 0 to N-1")
    return index, count


def settings_from(args: argparse.Namespace) -> PrepareSettings:
    """The command line as checked settings: every value's range, before any file or model is opened."""
    if not 1 <= args.min_people <= args.max_people:
        raise UMOError(f"--min-people {args.min_people} and --max-people {args.max_people}: need 1 <= min <= max")
    in_range("--match-threshold", args.match_threshold, 0, 1, "the least cosine similarity of a face to a person's "
             f"photos; default {DEFAULT_MATCH_THRESHOLD:g}", low_open=True, high_open=True)
    in_range("--cluster-threshold", args.cluster_threshold, 0, 1, "a cosine distance, 1 - the least average "
             f"similarity of one person's faces; above 1 different people merge; default "
             f"{DEFAULT_CLUSTER_THRESHOLD:g}", low_open=True, high_open=True)
    in_range("--reference-margin", args.reference_margin, 0, MAX_REFERENCE_MARGIN,
             f"margin around the face on each side, as a fraction of the face box; default {DEFAULT_MARGIN:g}")
    in_range("--min-face-size", args.min_face_size, 0, math.inf, "pixels of the face box's short side")
    in_range("--min-score", args.min_score, 0, 1, "the face detector's score")
    in_range("--min-sharpness", args.min_sharpness, 0, math.inf, "variance of the Laplacian of the face")
    in_range("--border-margin", args.border_margin, -math.inf, 1, "a fraction of the face size; negative: keep "
             "faces cut by the border")
    if args.duplicate_bits > quality.MAX_DUPLICATE_BITS:
        raise UMOError(f"--duplicate-bits {args.duplicate_bits} is out of range: give at most "
                       f"{quality.MAX_DUPLICATE_BITS} (unrelated photos differ in about half of the 64 bits) or a "
                       "negative number to keep near-duplicates")
    in_range("--eval-fraction", args.eval_fraction, 0, 1, "the share of rows held out", high_open=True)
    at_least("--batch-size", args.batch_size, 1)
    at_least("--workers", args.workers, 1)
    try:
        args.prompt_template.format(n=2, people="two people")
    except (KeyError, IndexError, ValueError) as error:
        raise UMOError(f"--prompt-template '{args.prompt_template}' is not usable ({error!r}); "
                       "use {n} and {people}, e.g. 'a photo of {people}'") from None
    max_pixels = pixel_limit(args.max_pixels)  # also a bad $UMO_MAX_PIXELS, named once
    return PrepareSettings(
        photos=args.photos, people=args.people, out=args.out, faces=args.faces, provider=args.provider,
        backend=args.backend, min_people=args.min_people, max_people=args.max_people,
        match_threshold=args.match_threshold, cluster_threshold=args.cluster_threshold,
        same_photo_references=args.same_photo_references, reference_margin=args.reference_margin,
        min_face_size=args.min_face_size, min_score=args.min_score, min_sharpness=args.min_sharpness,
        border_margin=args.border_margin, duplicate_bits=args.duplicate_bits, prompt_template=args.prompt_template,
        eval_fraction=args.eval_fraction, eval_out=args.eval_out or args.out.with_name(args.out.name + "-eval"),
        seed=args.seed, cache=args.cache or args.out / ".face-cache",
        shard=parse_shard(args.shard) if args.shard else None, batch_size=args.batch_size, workers=args.workers,
        max_pixels=max_pixels)


def written_folders(settings: PrepareSettings) -> list[tuple[str, Path]]:
    """(flag, folder) of each data folder the run writes."""
    return [("--out", settings.out), *([("--eval-out", settings.eval_out)] if settings.eval_fraction else [])]


def check_paths(settings: PrepareSettings) -> None:
    """The folders the run writes: outside --photos, new, empty or the builder's own, and not being written by another
    run (no model loaded yet)."""
    photos = os.path.realpath(settings.photos)  # realpath, not resolve: a symlink loop is a name, not an error
    for flag, folder in (("--out", settings.out), ("--eval-out", settings.eval_out)):
        if Path(os.path.realpath(folder)).is_relative_to(photos):
            raise UMOError(f"{flag} '{folder}' is inside --photos '{settings.photos}'; write the data folder "
                           "elsewhere")
    check_cache_folder(settings.cache)
    for flag, folder in written_folders(settings):
        check_output_folder(folder, flag, settings.cache)
        if not settings.shard:  # a shard only fills the cache
            check_folder_lock(folder, flag)  # each folder before any lock is taken: none is made when one is held


@dataclass
class Inputs:
    photos: list[PhotoFile]  # the collection's
    people_photos: list[PhotoFile]
    people: dict[str, list[str]]  # person -> their photos' names
    skipped: list[str]  # files that are no photos
    prompts: dict[str, str | None]  # the collection's photo -> its sidecar prompt


def list_inputs(settings: PrepareSettings) -> Inputs:
    """The photos, people and prompts; what is skipped and why is told at once (before any model loads)."""
    listing = list_photos(settings.photos, "--photos")
    people_photos, people, skipped, warnings = [], {}, list(listing.skipped), list(listing.notes)
    if settings.people:
        if not settings.people.is_dir():
            raise UMOError(f"--people '{settings.people}' does not exist; give a folder with one sub-folder per "
                           "person")
        folders = sorted(p for p in settings.people.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise UMOError(f"--people '{settings.people}' has no sub-folders; make one per person, named after them, "
                           "holding photos of that person")
        for folder in folders:
            own = list_photos(folder, "--people folder")
            names = [f"{PEOPLE_PREFIX}{folder.name}/{p.name}" for p in own.photos]
            people_photos += [PhotoFile(p.path, name) for p, name in zip(own.photos, names)]
            people[folder.name] = names
            skipped += [f"{PEOPLE_PREFIX}{folder.name}/{name}" for name in own.skipped]
            warnings += own.notes
    prompts = {photo.name: sidecar_prompt(photo.path, warnings) for photo in listing.photos}
    for warning in warnings:
        tell("warning", warning)
    return Inputs(listing.photos, people_photos, people, skipped, prompts)


def distributed_rank() -> tuple[int, int] | None:
    """(rank, world size) under torchrun with more than one process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else None


def embed_in_parts(settings: PrepareSettings, photos: list[PhotoFile], face_model, cache: FaceCache,
                   ranks: tuple[int, int] | None, description: str, everyone: bool) -> PassResult | None:
    """All photos' faces. Under torchrun each process first analyses its part into the cache, then rank 0
    (every process with `everyone`) reads the whole set back; the others get None."""
    computed_in_parts = 0
    options = (settings.batch_size, settings.workers, settings.max_pixels)
    if ranks:
        part = embed_photos(photos, face_model, cache, *options, ranks, description)
        computed = torch.tensor([part.computed])
        dist.all_reduce(computed)  # returns once every process's part is in the cache
        if ranks[0] != 0 and not everyone:
            return None
        computed_in_parts = int(computed)
    result = embed_photos(photos, face_model, cache, *options, description=description)
    result.computed += computed_in_parts  # the parts' work, found in the cache by this pass
    result.cached -= computed_in_parts
    return result


def people_labels(settings: PrepareSettings, people: dict[str, list[str]],
                  result: PassResult) -> tuple[dict[str, np.ndarray], dict[FaceId, str], dict[str, str]]:
    """(person -> embeddings [K,D] of their face in each of their photos, those faces that are usable as
    references, people photos left out -> why). A person folder must agree with itself (own_faces); a person
    without any face is an error."""
    embeddings, labels, left_out = {}, {}, {}
    for person, names in people.items():
        problems = {name: quality.face_problems(result.faces[name], settings.filters)
                    for name in names if name in result.faces}
        candidates = {name: [j for j, problem in enumerate(found) if problem not in quality.IGNORED]
                      for name, found in problems.items()}
        chosen, rejected, warnings = own_faces(person, candidates, result.faces, settings.match_threshold)
        for warning in warnings:
            tell("warning", warning)
        left_out.update(rejected)
        if not chosen:
            raise UMOError(f"--people '{settings.people / person}': no face found in its {len(names)} photo(s); add "
                           f"a photo where {person}'s face is clearly visible (at least {settings.min_face_size:g} "
                           "px)")
        embeddings[person] = np.stack([result.faces[name].embeddings[j] for name, j in chosen.items()])
        labels.update({(name, j): person for name, j in chosen.items() if problems[name][j] is None})
    return embeddings, labels, left_out


def identify(settings: PrepareSettings, targets: list[str], faces: dict[str, PhotoFaces],
             problems: dict[str, list[str | None]], people: tuple[dict, dict[FaceId, str]] | None) -> dict[FaceId, str]:
    """Every identified face: matched to the people (with their own photos' faces), or clustered."""
    usable = {name: [j for j, problem in enumerate(problems[name]) if problem is None] for name in targets}
    if people:
        embeddings, own = people
        matched = match_people({name: (usable[name], faces[name].embeddings[usable[name]]) for name in targets},
                               embeddings, settings.match_threshold)
        return {**matched, **own}
    face_ids = [(name, j) for name in targets for j in usable[name]]
    stacked = np.stack([faces[name].embeddings[j] for name, j in face_ids]) if face_ids else np.zeros((0, 1))
    return cluster_faces(face_ids, stacked, settings.cluster_threshold)


def build(settings: PrepareSettings, inputs: Inputs, collection: PassResult, people: PassResult,
          people_identities: tuple[dict, dict[FaceId, str]] | None, people_left_out: dict[str, str]) -> dict:
    """Identify, select, write the folder(s) and the report; returns the report."""
    faces = {**collection.faces, **people.faces}
    readable = [photo.name for photo in inputs.photos if photo.name in collection.faces]
    duplicates = quality.near_duplicates({name: faces[name] for name in readable}, settings.duplicate_bits)
    targets = [name for name in readable if name not in duplicates]
    problems = {name: quality.face_problems(photo_faces, settings.filters) for name, photo_faces in faces.items()}
    labels = identify(settings, targets, faces, problems, people_identities)
    selection = select_rows(targets, faces, problems, labels, settings.min_people, settings.max_people,
                            settings.same_photo_references, settings.duplicate_bits)
    training, evaluation, mixed = split_by_identity(selection.rows, settings.eval_fraction, settings.seed)
    selection.rejected.update({row.target: MIXED_SPLIT for row in mixed})
    selection.rejected.update({name: quality.DUPLICATE for name in duplicates})
    selection.rejected.update({name: UNREADABLE for name in collection.unreadable})
    decided = Decisions(targets, duplicates, problems, labels, selection, training, evaluation)
    report = build_report(settings.report(), "people" if settings.people else "clustering", settings.cache,
                          len(inputs.photos), inputs.skipped, collection, people, people_left_out, decided)
    settings.out.mkdir(parents=True, exist_ok=True)
    if not training or (settings.eval_fraction and not evaluation):
        write_report(settings.out, report)
        which = "training" if not training else "evaluation"
        reasons = ", ".join(f"{why}: {count}" for why, count in report["rows"]["rejected"].items()) or "no faces"
        raise UMOError(f"no photo of '{settings.photos}' passed the filters for the {which} data ({reasons}); "
                       f"see {settings.out / 'report.md'} and the options of python -m training.prepare_data --help")
    folders = [(settings.out, training)]
    if evaluation:
        settings.eval_out.mkdir(parents=True, exist_ok=True)
        folders.append((settings.eval_out, evaluation))
    for folder, _ in folders:  # first: it marks the folders as this builder's, so a re-run after Ctrl-C may write
        write_report(folder, report)
    paths = {photo.name: photo.path for photo in inputs.photos + inputs.people_photos}
    write_data_folders(folders, paths, faces, labels, settings.reference_margin, inputs.prompts,
                       settings.prompt_template, settings.max_pixels)
    return report


def run(settings: PrepareSettings, ranks: tuple[int, int] | None) -> int:
    inputs = list_inputs(settings)
    face_model = load_face_model(settings.faces, provider=settings.provider, backend=settings.backend)
    cache = FaceCache(settings.cache, pack_key(face_model))
    # The people's photos come first, on every process: a person without a face stops the run before the long pass.
    people_result = embed_in_parts(settings, inputs.people_photos, face_model, cache, None if settings.shard else ranks,
                                   "people photos", everyone=True) if inputs.people_photos else PassResult()
    people_identities, people_left_out = None, {}
    if inputs.people:
        embeddings, own, people_left_out = people_labels(settings, inputs.people, people_result)
        people_identities = (embeddings, own)
    if settings.shard:
        part = embed_photos(inputs.photos, face_model, cache, settings.batch_size, settings.workers,
                            settings.max_pixels, settings.shard)
        print(f"shard {settings.shard[0]}/{settings.shard[1]}: {part.computed} photos analysed, {part.cached} already "
              f"cached, {len(part.unreadable)} unreadable, in '{cache.folder}'. When every shard is done, run the "
              "same command without --shard to build the data folder")
        return 0
    result = embed_in_parts(settings, inputs.photos, face_model, cache, ranks, "photos", everyone=False)
    if result is None:
        return 0
    report = build(settings, inputs, result, people_result, people_identities, people_left_out)
    ignore_stop_signals()  # the folders are whole: a Ctrl-C from here would only make the finished run look stopped
    rows = report["rows"]
    print(f"{rows['written']} training rows in '{settings.out}'"
          + (f", {rows['evaluation']} evaluation rows in '{settings.eval_out}'" if rows["evaluation"] else "")
          + f", {len(report['identities'])} identities; see {settings.out / 'report.md'}. Next: python -m "
          f"training.encode_prompts --data {settings.out} --text-encoders <diffusers FLUX folder>")
    return 0


def prepare(settings: PrepareSettings, ranks: tuple[int, int] | None) -> int:
    """The checked run, holding the lock of each folder it writes (rank 0's; not a shard, which fills the cache)."""
    check_paths(settings)
    if settings.shard and ranks:
        raise UMOError("--shard and torchrun both split the work; use one of them")
    if ranks:  # every process has looked at the locks (check_paths) before rank 0 takes them: all stop or none
        dist.barrier()
    with ExitStack() as locks:
        if not settings.shard and (not ranks or ranks[0] == 0):  # a shard only fills the cache
            for flag, folder in written_folders(settings):
                locks.enter_context(folder_lock(folder, flag, COMMAND))
        return run(settings, ranks)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def work() -> int:
        settings = settings_from(args)
        ranks = distributed_rank()
        if ranks:  # torchrun: the processes share out the embedding pass (gloo: CPU tensors only)
            dist.init_process_group("gloo", timeout=DISTRIBUTED_TIMEOUT)
        try:
            return prepare(settings, ranks)
        finally:
            if ranks:
                dist.destroy_process_group()

    return command_status(work, "the photos analysed so far are kept in the embedding cache (--cache); run the "
                                "same command again to carry on")


if __name__ == "__main__":
    exit_program(main())
