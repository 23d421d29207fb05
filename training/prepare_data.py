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

import argparse
import datetime
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from umo_core import UMOError, load_face_model
from umo_core.faces.embedding import BACKENDS
from umo_core.faces.face_pack import PROVIDER_CHOICES

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
)
from .dataset_builder.photos import PhotoFile, list_photos
from .dataset_builder.references import DEFAULT_MARGIN
from .dataset_builder.report import Decisions, build_report, write_report
from .dataset_builder.rows import (
    DEFAULT_PROMPT_TEMPLATE,
    MIXED_SPLIT,
    UNREADABLE,
    select_rows,
    split_by_identity,
)
from .dataset_builder.writer import check_output_folder, write_data_folders

PEOPLE_PREFIX = "people:"  # names of --people photos: people:<person>/<file>, apart from the collection's
DISTRIBUTED_TIMEOUT = datetime.timedelta(days=7)  # ranks wait for the slowest shard's embedding pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.prepare_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, required=True, help="folder (tree) of photos: jpg, png, webp, ...")
    parser.add_argument("--people", type=Path, help="one sub-folder per person, named after them, with their photos")
    parser.add_argument("--out", type=Path, required=True, help="the data folder to write")
    parser.add_argument("--faces", default=os.environ.get("UMO_FACE_PACK", "antelopev2"),
                        help="face pack name or folder (default $UMO_FACE_PACK, else antelopev2)")
    parser.add_argument("--provider", default="auto", help=f"onnxruntime provider: {', '.join(PROVIDER_CHOICES)}")
    parser.add_argument("--backend", choices=BACKENDS, default="onnx", help="face embedder backend")
    parser.add_argument("--min-people", type=int, default=1)
    parser.add_argument("--max-people", type=int, default=6)
    parser.add_argument("--match-threshold", type=float, default=DEFAULT_MATCH_THRESHOLD,
                        help="--people: least cosine similarity for a face to be that person")
    parser.add_argument("--cluster-threshold", type=float, default=DEFAULT_CLUSTER_THRESHOLD,
                        help="clustering: cosine distance (1 - similarity) where average-linkage groups stop merging")
    parser.add_argument("--same-photo-references", action="store_true",
                        help="a person with no other photo gets a reference cropped from the target (row marked)")
    parser.add_argument("--reference-margin", type=float, default=DEFAULT_MARGIN,
                        help="reference crops: margin on each side, as a fraction of the face box")
    parser.add_argument("--min-face-size", type=float, default=quality.DEFAULT_MIN_FACE_SIZE,
                        help="px (face box short side); smaller faces are background")
    parser.add_argument("--min-score", type=float, default=quality.DEFAULT_MIN_SCORE,
                        help="detector score; lower-scoring faces are ignored")
    parser.add_argument("--min-sharpness", type=float, default=quality.DEFAULT_MIN_SHARPNESS,
                        help="variance of the Laplacian of the aligned face; blurrier faces are rejected")
    parser.add_argument("--border-margin", type=float, default=quality.DEFAULT_BORDER_MARGIN,
                        help="faces closer to the border than this fraction of their size are cut (negative: keep)")
    parser.add_argument("--duplicate-bits", type=int, default=quality.DEFAULT_DUPLICATE_BITS,
                        help="photos whose 64-bit difference hashes differ in at most this many bits are "
                             "near-duplicates; later ones are left out (negative: keep them)")
    parser.add_argument("--prompt-template", default=DEFAULT_PROMPT_TEMPLATE,
                        help="prompt of photos without a sidecar .txt; {n}: number of people, {people}: in words")
    parser.add_argument("--eval-fraction", type=float, default=0.0,
                        help="hold out people (all their rows) for about this fraction of the rows")
    parser.add_argument("--eval-out", type=Path, help="the evaluation data folder (default OUT-eval)")
    parser.add_argument("--seed", type=int, default=0, help="which people are held out")
    parser.add_argument("--cache", type=Path, help="embedding cache folder (default OUT/.face-cache)")
    parser.add_argument("--shard", help="K/N: run part K (0..N-1) of the embedding pass only, for a job array")
    parser.add_argument("--batch-size", type=int, default=16, help="photos whose faces are embedded together")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="threads reading photos")
    args = parser.parse_args(argv)
    args.cache = args.cache or args.out / ".face-cache"
    args.eval_out = args.eval_out or args.out.with_name(args.out.name + "-eval")
    return args


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UMOError(f"--shard '{text}' must be K/N, e.g. 0/4 for the first of four parts") from None
    if not 0 <= index < count:
        raise UMOError(f"--shard '{text}': K must be 0 to N-1")
    return index, count


def check_args(args: argparse.Namespace) -> None:
    if not 1 <= args.min_people <= args.max_people:
        raise UMOError(f"--min-people {args.min_people} and --max-people {args.max_people}: need 1 <= min <= max")
    if not 0 <= args.eval_fraction < 1:
        raise UMOError(f"--eval-fraction {args.eval_fraction} must be at least 0 and below 1")
    for name in ("batch_size", "workers"):
        if getattr(args, name) < 1:
            raise UMOError(f"--{name.replace('_', '-')} must be at least 1")
    try:
        args.prompt_template.format(n=2, people="two people")
    except (KeyError, IndexError, ValueError) as error:
        raise UMOError(f"--prompt-template '{args.prompt_template}' is not usable ({error!r}); "
                       "use {n} and {people}, e.g. 'a photo of {people}'") from None
    for flag, folder in (("--out", args.out), ("--eval-out", args.eval_out)):
        if folder.resolve().is_relative_to(args.photos.resolve()):
            raise UMOError(f"{flag} '{folder}' is inside --photos '{args.photos}'; write the data folder elsewhere")
    check_output_folder(args.out, "--out", args.cache)
    if args.eval_fraction:
        check_output_folder(args.eval_out, "--eval-out", args.cache)


def list_inputs(args: argparse.Namespace) -> tuple[list[PhotoFile], list[PhotoFile], dict[str, list[str]], list[str]]:
    """(the collection's photos, the --people photos, person -> their photo names, skipped files)."""
    listing = list_photos(args.photos, "--photos")
    people_photos, people, skipped = [], {}, list(listing.skipped)
    if args.people:
        if not args.people.is_dir():
            raise UMOError(f"--people '{args.people}' does not exist; give a folder with one sub-folder per person")
        folders = sorted(p for p in args.people.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise UMOError(f"--people '{args.people}' has no sub-folders; make one per person, named after them, "
                           "holding photos of that person")
        for folder in folders:
            own = list_photos(folder, "--people folder")
            names = [f"{PEOPLE_PREFIX}{folder.name}/{p.name}" for p in own.photos]
            people_photos += [PhotoFile(p.path, name) for p, name in zip(own.photos, names)]
            people[folder.name] = names
            skipped += [f"{PEOPLE_PREFIX}{folder.name}/{name}" for name in own.skipped]
    return listing.photos, people_photos, people, skipped


def quality_filters(args: argparse.Namespace) -> quality.QualityFilters:
    return quality.QualityFilters(args.min_face_size, args.min_score, args.min_sharpness, args.border_margin,
                                  args.duplicate_bits)


def distributed_rank() -> tuple[int, int] | None:
    """(rank, world size) under torchrun with more than one process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else None


def embed_in_parts(args: argparse.Namespace, photos: list[PhotoFile], face_model, cache: FaceCache,
                   ranks: tuple[int, int] | None, description: str, everyone: bool) -> PassResult | None:
    """All photos' faces. Under torchrun each process first analyses its part into the cache, then rank 0
    (every process with `everyone`) reads the whole set back; the others get None."""
    computed_in_parts = 0
    if ranks:
        part = embed_photos(photos, face_model, cache, args.batch_size, args.workers, ranks, description)
        computed = torch.tensor([part.computed])
        dist.all_reduce(computed)  # returns once every process's part is in the cache
        if ranks[0] != 0 and not everyone:
            return None
        computed_in_parts = int(computed)
    result = embed_photos(photos, face_model, cache, args.batch_size, args.workers, description=description)
    result.computed += computed_in_parts  # the parts' work, found in the cache by this pass
    result.cached -= computed_in_parts
    return result


def people_labels(people: dict[str, list[str]], result: PassResult, filters: quality.QualityFilters,
                  args: argparse.Namespace) -> tuple[dict[str, np.ndarray], dict[FaceId, str]]:
    """(person -> embeddings [K,D] of the largest face of each of their photos, those faces that are usable
    as references); a person without any face is an error."""
    embeddings, labels = {}, {}
    for person, names in people.items():
        chosen = []
        for name in (n for n in names if n in result.faces):
            faces = result.faces[name]
            problems = quality.face_problems(faces, filters)
            candidates = [j for j, problem in enumerate(problems) if problem not in quality.IGNORED]
            if candidates:
                largest = max(candidates, key=lambda j: faces.face_sides()[j])
                chosen.append(faces.embeddings[largest])
                if problems[largest] is None:
                    labels[(name, largest)] = person
        if not chosen:
            raise UMOError(f"--people '{args.people / person}': no face found in its {len(names)} photo(s); add a "
                           f"photo where {person}'s face is clearly visible (at least {args.min_face_size:g} px)")
        embeddings[person] = np.stack(chosen)
    return embeddings, labels


def identify(args: argparse.Namespace, targets: list[str], faces: dict[str, PhotoFaces],
             problems: dict[str, list[str | None]], people: tuple[dict, dict[FaceId, str]] | None) -> dict[FaceId, str]:
    """Every identified face: matched to the people (with their own photos' faces), or clustered."""
    usable = {name: [j for j, problem in enumerate(problems[name]) if problem is None] for name in targets}
    if people:
        embeddings, own_faces = people
        matched = match_people({name: (usable[name], faces[name].embeddings[usable[name]]) for name in targets},
                               embeddings, args.match_threshold)
        return {**matched, **own_faces}
    face_ids = [(name, j) for name in targets for j in usable[name]]
    stacked = np.stack([faces[name].embeddings[j] for name, j in face_ids]) if face_ids else np.zeros((0, 1))
    return cluster_faces(face_ids, stacked, args.cluster_threshold)


def build(args: argparse.Namespace, photos: list[PhotoFile], people_photos: list[PhotoFile], skipped: list[str],
          collection: PassResult, people: PassResult, people_identities: tuple[dict, dict[FaceId, str]] | None,
          filters: quality.QualityFilters) -> dict:
    """Identify, select, write the folder(s) and the report; returns the report."""
    faces = {**collection.faces, **people.faces}
    readable = [photo.name for photo in photos if photo.name in collection.faces]
    duplicates = quality.near_duplicates({name: faces[name] for name in readable}, args.duplicate_bits)
    targets = [name for name in readable if name not in duplicates]
    problems = {name: quality.face_problems(photo_faces, filters) for name, photo_faces in faces.items()}
    labels = identify(args, targets, faces, problems, people_identities)
    selection = select_rows(targets, faces, problems, labels, args.min_people, args.max_people,
                            args.same_photo_references, args.duplicate_bits)
    training, evaluation, mixed = split_by_identity(selection.rows, args.eval_fraction, args.seed)
    selection.rejected.update({row.target: MIXED_SPLIT for row in mixed})
    selection.rejected.update({name: quality.DUPLICATE for name in duplicates})
    selection.rejected.update({name: UNREADABLE for name in collection.unreadable})
    decided = Decisions(targets, duplicates, problems, labels, selection, training, evaluation)
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    report = build_report(settings, "people" if args.people else "clustering", args.cache, len(photos), skipped,
                          collection, people, decided)
    args.out.mkdir(parents=True, exist_ok=True)
    if not training or (args.eval_fraction and not evaluation):
        write_report(args.out, report)
        which = "training" if not training else "evaluation"
        reasons = ", ".join(f"{why}: {count}" for why, count in report["rows"]["rejected"].items()) or "no faces"
        raise UMOError(f"no photo of '{args.photos}' passed the filters for the {which} data ({reasons}); "
                       f"see {args.out / 'report.md'} and the options of python -m training.prepare_data --help")
    folders = [(args.out, training)]
    if evaluation:
        args.eval_out.mkdir(parents=True, exist_ok=True)
        folders.append((args.eval_out, evaluation))
    paths = {photo.name: photo.path for photo in photos + people_photos}
    write_data_folders(folders, paths, faces, labels, args.reference_margin, args.prompt_template)
    for folder, _ in folders:
        write_report(folder, report)
    return report


def run(args: argparse.Namespace, ranks: tuple[int, int] | None) -> int:
    check_args(args)
    shard = parse_shard(args.shard) if args.shard else None
    if shard and ranks:
        raise UMOError("--shard and torchrun both split the work; use one of them")
    photos, people_photos, people, skipped = list_inputs(args)
    face_model = load_face_model(args.faces, provider=args.provider, backend=args.backend)
    cache = FaceCache(args.cache, pack_key(face_model))
    filters = quality_filters(args)
    # The people's photos come first, on every process: a person without a face stops the run before the long pass.
    people_result = embed_in_parts(args, people_photos, face_model, cache, None if shard else ranks,
                                   "people photos", everyone=True) if people_photos else PassResult()
    people_identities = people_labels(people, people_result, filters, args) if people else None
    if shard:
        part = embed_photos(photos, face_model, cache, args.batch_size, args.workers, shard)
        print(f"shard {args.shard}: {part.computed} photos analysed, {part.cached} already cached, "
              f"{len(part.unreadable)} unreadable, in '{cache.folder}'. When every shard is done, run the "
              "same command without --shard to build the data folder")
        return 0
    result = embed_in_parts(args, photos, face_model, cache, ranks, "photos", everyone=False)
    if result is None:
        return 0
    report = build(args, photos, people_photos, skipped, result, people_result, people_identities, filters)
    rows = report["rows"]
    print(f"{rows['written']} training rows in '{args.out}'"
          + (f", {rows['evaluation']} evaluation rows in '{args.eval_out}'" if rows["evaluation"] else "")
          + f", {len(report['identities'])} identities; see {args.out / 'report.md'}. Next: python -m "
          f"training.encode_prompts --data {args.out} --text-encoders <diffusers FLUX folder>")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ranks = distributed_rank()
    if ranks:  # torchrun: the processes share out the embedding pass (gloo: CPU tensors only)
        dist.init_process_group("gloo", timeout=DISTRIBUTED_TIMEOUT)
    try:
        return run(args, ranks)
    except UMOError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: the photos analysed so far are kept in '{args.cache}'; run the same command again "
              "to carry on", file=sys.stderr)
        return 130
    finally:
        if ranks:
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
