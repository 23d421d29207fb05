"""`python -m umo_core evaluate`: the identity metrics of a benchmark's generated images, per image and per method.

The benchmark folder holds one folder per case (README "evaluate" has an example):

    BENCH/<case>/refs/        the reference photos, one per person: R1, R2, ... in file-name order
    BENCH/<case>/gt.<ext>     optional: a ground-truth photo of the same people (Sim(GT) and CP)
    BENCH/<case>/<method>/    one folder per method: its generated images of this case

Each image is scored by the scoring module against its case's references (embedded once per case), in
batches; its result goes to a cache (one JSON file per image under OUT/cache) keyed by the sha256 of the
image, of the references and ground truth, and of the face pack's model files, so a run that was
interrupted (or one after another shard) scores only what is not there yet. The tables and plots are
written at the end, each file whole or not at all.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import io
import json
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .arguments import at_least
from .console import HelpFormatter, progress, stop_signal, tell
from .errors import UMOError
from .faces.embedding import BACKENDS
from .faces.face_model import FaceModel, Identities
from .faces.face_pack import (
    FACE_PACK_ENV,
    PROVIDER_CHOICES,
    FacePack,
    default_face_pack,
    find_face_pack,
    resolve_providers,
)
from .faces.metrics import average_metrics
from .faces.scoring import ImageScore, ground_truth_embeddings, score_images
from .files import atomic_path, content_hash, is_symlink_loop
from .images import IMAGE_SUFFIXES, MAX_PIXELS, MAX_PIXELS_ENV, check_image_header, load_image, pixel_limit

REFERENCES_FOLDER = "refs"
GROUND_TRUTH_STEM = "gt"
CACHE_FOLDER = "cache"
RECORD_VERSION = 1  # part of every cache key: bump it when a record's content or its computation changes
DEFAULT_BATCH = 8
LOAD_THREADS = 2  # image files decoded ahead of the face model

# The summary's columns: metric key, header, decimals. The per-image values are averaged over the images
# where they are defined (metrics.average_metrics); `duplicates` and `face_count_accuracy` are shares of images.
SUMMARY_COLUMNS = (
    ("id_sim", "ID-Sim", 1),
    ("id_conf", "ID-Conf", 1),
    ("id_sim_matched", "Sim(Ref)", 1),
    ("sim_gt", "Sim(GT)", 3),
    ("cp", "CP", 3),
    ("coverage", "coverage", 3),
    ("duplicates", "duplicates", 3),
    ("face_count_accuracy", "face count", 3),
)
ALL_PEOPLE = "all"  # the `people` of a summary row over every number of people
TABLE_FILES = ("results.json", "images.csv", "summary.csv", "summary.md")
PLOT_FILES = ("sim_gt_vs_copy_paste.png", "coverage_duplicates_by_people.png")


@dataclass(frozen=True, eq=False)  # compared and hashed as itself: a case is read once
class Case:
    name: str
    references: tuple[Path, ...]
    ground_truth: Path | None
    methods: dict[str, tuple[Path, ...]]  # method -> its images, by file name


@dataclass(frozen=True)
class Job:
    """One generated image of one case and method."""

    case: Case
    method: str
    image: Path

    @property
    def name(self) -> str:
        return f"{self.case.name}/{self.method}/{self.image.name}"

    @property
    def label(self) -> str:
        """How messages name the image."""
        return f"case '{self.case.name}' method '{self.method}' image '{self.image}'"


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The `evaluate` sub-command's options (cli.py registers it)."""
    parser = commands.add_parser("evaluate", help="identity metrics of a benchmark folder, per image and per method",
                                 description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("benchmark", type=Path, help="the benchmark folder: one sub-folder per case")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder for the tables, plots and the cache (outside the benchmark folder)")
    parser.add_argument("--faces", default=default_face_pack(), metavar="PACK",
                        help=f"face pack name or folder, as for score (${FACE_PACK_ENV} where set)")
    parser.add_argument("--shard", help="i/n: score only the i-th of n equal parts of the images (1 <= i <= n) "
                        "into OUT's cache; then run with --merge once every shard is done")
    parser.add_argument("--merge", action="store_true",
                        help="write the tables from the cache only (after the shards); an image without a "
                             "result there is an error")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="images per face-model call")
    parser.add_argument("--provider", default="auto", help=f"onnxruntime provider: {', '.join(PROVIDER_CHOICES)}")
    parser.add_argument("--backend", choices=BACKENDS, default="onnx", help="face embedder backend")
    parser.add_argument("--max-pixels", type=int, help=f"refuse image files with more pixels than this (default "
                        f"${MAX_PIXELS_ENV} or {MAX_PIXELS}; 0 = no limit)")


def parse_shard(text: str) -> tuple[int, int]:
    """'2/4' -> (2, 4); anything else is an error naming --shard."""
    index, _, count = text.partition("/")
    try:
        index_number, count_number = int(index), int(count)
    except ValueError:
        index_number = count_number = 0
    if not 1 <= index_number <= count_number:
        raise UMOError(f"--shard '{text}' is not i/n with 1 <= i <= n; give e.g. --shard 1/4 ... --shard 4/4")
    return index_number, count_number


def shard_jobs(jobs: list[Job], index: int, count: int) -> list[Job]:
    """The `index`-th (1-based) of `count` contiguous parts: a case's images stay together, so each shard
    embeds few cases' references."""
    return jobs[(index - 1) * len(jobs) // count: index * len(jobs) // count]


def _visible(folder: Path) -> list[Path]:
    """The entries of `folder` but hidden ones (.DS_Store, .ipynb_checkpoints), by name."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    for entry in entries:
        if is_symlink_loop(entry):
            raise UMOError(f"'{entry}' is a symbolic link loop (its links lead back to themselves); remove it or "
                           "link the file or folder itself")
    return entries


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _images_of(folder: Path, what: str) -> tuple[Path, ...]:
    """The image files of a refs/ or method folder (`what` names it); a sub-folder or no image at all is an
    error. Other files (prompts, notes) are left alone."""
    entries = _visible(folder)
    for entry in entries:
        if entry.is_dir():
            raise UMOError(f"{what}: '{entry}' is a folder; put the image files directly in '{folder}'")
    images = tuple(p for p in entries if _is_image(p))
    if not images:
        raise UMOError(f"{what}: '{folder}' holds no image files ({', '.join(IMAGE_SUFFIXES)}); add them or "
                       "remove the folder")
    return images


def _read_case(folder: Path) -> Case:
    name = folder.name
    where = f"case '{name}'"
    references_folder = folder / REFERENCES_FOLDER
    if not references_folder.is_dir():
        raise UMOError(f"{where}: no {REFERENCES_FOLDER}/ folder in '{folder}'; put one photo per person in "
                       f"'{references_folder}'")
    references = _images_of(references_folder, f"{where} {REFERENCES_FOLDER}/")
    ground_truths, methods = [], {}
    for entry in _visible(folder):
        if entry.is_dir() and entry.name != REFERENCES_FOLDER:
            methods[entry.name] = _images_of(entry, f"{where} method '{entry.name}'")
        elif _is_image(entry):
            if entry.stem.lower() != GROUND_TRUTH_STEM:
                raise UMOError(f"{where}: image '{entry}' is outside {REFERENCES_FOLDER}/ and the method folders; "
                               f"move it into a method folder, or name the ground-truth photo "
                               f"{GROUND_TRUTH_STEM}{entry.suffix}")
            ground_truths.append(entry)
    if len(ground_truths) > 1:
        raise UMOError(f"{where}: {len(ground_truths)} ground-truth photos ({', '.join(map(str, ground_truths))}); "
                       "keep one")
    if not methods:
        raise UMOError(f"{where}: no method folder in '{folder}'; put each method's images of this case in "
                       f"'{folder / '<method>'}'")
    return Case(name, references, ground_truths[0] if ground_truths else None, methods)


def read_benchmark(folder: Path, max_pixels: int | None = None) -> list[Case]:
    """Every case of the benchmark folder, with each image file's header checked (not decoded): a bad layout or
    file is one error naming the case and the file, before any model is loaded."""
    if not folder.is_dir():
        raise UMOError(f"benchmark folder '{folder}' does not exist or is not a folder")
    cases = [_read_case(entry) for entry in _visible(folder) if entry.is_dir()]
    if not cases:
        raise UMOError(f"benchmark folder '{folder}' has no case folders; give each case a folder with "
                       f"{REFERENCES_FOLDER}/ and one folder per method (README: evaluate)")
    for case in cases:
        for number, path in enumerate(case.references, 1):
            check_image_header(path, f"case '{case.name}' reference {number} '{path}'", max_pixels)
        if case.ground_truth:
            check_image_header(case.ground_truth, f"case '{case.name}' ground truth '{case.ground_truth}'", max_pixels)
        for method, images in case.methods.items():
            for path in images:
                check_image_header(path, Job(case, method, path).label, max_pixels)
    return cases


def benchmark_jobs(cases: list[Case]) -> list[Job]:
    """Every image of the benchmark in one fixed order (case, method, file name): shards and tables follow it."""
    return [Job(case, method, image) for case in cases for method in sorted(case.methods)
            for image in case.methods[method]]


class ResultCache:
    """One JSON file per scored image: CACHE/<first two hex digits of the key>/<key>.json."""

    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def load(self, key: str) -> dict | None:
        """The record, or None when it is not there or unreadable (then the image is scored again)."""
        try:
            return json.loads(self.path(key).read_text())
        except (OSError, ValueError):
            return None

    def save(self, key: str, record: dict) -> None:
        with atomic_path(self.path(key)) as temporary:  # shards writing one cache never see half a record
            temporary.write_text(json.dumps(record))


def pack_digest(pack: FacePack, backend: str) -> str:
    """What the face model's numbers depend on: its model files' contents and the embedder backend."""
    return hashlib.sha256(json.dumps([content_hash(pack.detector), content_hash(pack.recogniser),
                                      backend]).encode()).hexdigest()


def cache_keys(jobs: list[Job], model_digest: str) -> dict[Job, str]:
    """Each image's cache key: sha256 of the record version, the face model, the case's references and ground
    truth, and the image (files read by content, on a few threads)."""
    files = sorted({path for job in jobs for path in
                    (*job.case.references, *([job.case.ground_truth] if job.case.ground_truth else []), job.image)})
    with ThreadPoolExecutor(LOAD_THREADS) as pool:
        digests = dict(zip(files, pool.map(content_hash, files)))
    keys = {}
    for job in jobs:
        parts = [RECORD_VERSION, model_digest, [digests[p] for p in job.case.references],
                 digests[job.case.ground_truth] if job.case.ground_truth else None, digests[job.image]]
        keys[job] = hashlib.sha256(json.dumps(parts).encode()).hexdigest()
    return keys


def score_record(score: ImageScore) -> dict:
    """What the cache keeps of an image's score: the `score` command's JSON entry without the path, and the
    same-person threshold it was made with."""
    return {**score.to_json(), "same_person_threshold": score.match.same_person_threshold}


def _prefetched(jobs: list[Job], load: Callable[[Job], np.ndarray], ahead: int) -> Iterator[np.ndarray]:
    """The decoded images of `jobs`, in order, `ahead` of them decoding on LOAD_THREADS threads while the
    face model works on the ones before."""
    with ThreadPoolExecutor(LOAD_THREADS) as pool:
        waiting: deque[Future] = deque()
        for job in jobs:
            waiting.append(pool.submit(load, job))
            if len(waiting) > ahead:
                yield waiting.popleft().result()
        while waiting:
            yield waiting.popleft().result()


def _load_job(job: Job, max_pixels: int | None) -> np.ndarray:
    notes: list[str] = []
    image = load_image(job.image, job.label, notes, max_pixels)
    for note in notes:
        tell("note", note)
    return image


def score_jobs(face_model: FaceModel, jobs: list[Job], keys: dict[Job, str], cache: ResultCache, batch: int,
               max_pixels: int | None, finished: Callable[[int], None]) -> None:
    """Score `jobs` (images without a cached result) case by case with the scoring loop, `score_images`, and
    put each result in the cache as soon as it is there: the references and ground truth embedded once per
    case, the images `batch` at a time (their faces in one recogniser call), read ahead on threads."""
    by_case: dict[str, list[Job]] = {}
    for job in jobs:
        by_case.setdefault(job.case.name, []).append(job)
    for case_jobs in by_case.values():
        case = case_jobs[0].case
        where = f"case '{case.name}'"
        labels = [f"{where} reference {i} '{p}'" for i, p in enumerate(case.references, 1)]
        notes: list[str] = []
        references = [load_image(p, label, notes, max_pixels) for p, label in zip(case.references, labels)]
        identities: Identities = face_model.identities(references, names=labels)
        notes += identities.notes
        gt_embeddings = None
        if case.ground_truth:
            gt_label = f"{where} ground truth '{case.ground_truth}'"
            gt_embeddings = ground_truth_embeddings(face_model,
                                                    load_image(case.ground_truth, gt_label, notes, max_pixels))
            if len(gt_embeddings) == 0:
                notes.append(f"{gt_label} shows no face, so sim_gt and cp are null for this case")
        for note in notes:
            tell("note", note)

        remaining = iter(case_jobs)  # score_images reports the scores in the order of the images

        def save(score: ImageScore, remaining: Iterator[Job] = remaining) -> None:
            cache.save(keys[next(remaining)], score_record(score))
            finished(1)

        images = _prefetched(case_jobs, lambda job: _load_job(job, max_pixels), 2 * batch)
        score_images(face_model, identities, images, gt_embeddings, progress=save, batch_size=batch)


def image_row(job: Job, record: dict, benchmark: Path) -> dict:
    """One row of the per-image table: where the image is, how many people and faces, and its metrics."""
    people, metrics = len(job.case.references), record["metrics"]
    return {"case": job.case.name, "method": job.method, "image": job.image.relative_to(benchmark).as_posix(),
            "people": people, "face_count_ok": metrics["faces"] == people, **metrics}


def summary_values(row: dict) -> dict:
    """An image's values of the summary's columns (None where undefined)."""
    values = {key: row.get(key) for key, _, _ in SUMMARY_COLUMNS}
    values["duplicates"] = None if row.get("duplicates") is None else float(bool(row["duplicates"]))
    values["face_count_accuracy"] = float(row["face_count_ok"])
    return values


def summarise(rows: list[dict]) -> list[dict]:
    """Per method (by name): one row over all its images (people 'all'), then one per number of people."""
    summary = []
    for method in sorted({row["method"] for row in rows}):
        mine = [row for row in rows if row["method"] == method]
        groups = [(ALL_PEOPLE, mine)] + [(people, [row for row in mine if row["people"] == people])
                                         for people in sorted({row["people"] for row in mine})]
        for people, group in groups:
            summary.append({"method": method, "people": people, "images": len(group),
                            **average_metrics([summary_values(row) for row in group])})
    return summary


def _number(value: float | None, decimals: int) -> str:
    return "" if value is None else f"{value:.{decimals}f}"


def summary_markdown(summary: list[dict]) -> str:
    """The summary as a Markdown table, with what the columns mean."""
    headers = ["method", "people", "images", *(header for _, header, _ in SUMMARY_COLUMNS)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * 3 + "---:|" * len(SUMMARY_COLUMNS)]
    for row in summary:
        cells = [row["method"], str(row["people"]), str(row["images"]),
                 *(_number(row[key], decimals) for key, _, decimals in SUMMARY_COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "ID-Sim, ID-Conf and Sim(Ref) (matched ID-Sim) x100; Sim(GT) a cosine; CP in [-1, 1] "
              "(1 = pasted the reference); coverage = present people / people; duplicates = share of images "
              "showing a person twice; face count = share of images with exactly one face per person. Means over "
              "the images where a value is defined; empty = defined for none."]
    return "\n".join(lines) + "\n"


def _csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if value is None else json.dumps(value) if isinstance(value, (list, dict))
                         else value for key, value in row.items()})
    return buffer.getvalue()


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def plot(summary: list[dict], rows: list[dict], out: Path) -> list[Path]:
    """The plots (PNG): Sim(GT) against copy-paste per method, as WithAnyone's MultiID-Bench draws it (only
    when some case has a ground truth), and coverage and duplicates by number of people."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib only here: score never loads it
    from matplotlib.figure import Figure

    overall = [row for row in summary if row["people"] == ALL_PEOPLE]
    colours = {row["method"]: f"C{i % 10}" for i, row in enumerate(overall)}
    written = []
    with_gt = [row for row in overall if row["sim_gt"] is not None and row["cp"] is not None]
    if with_gt:
        figure = Figure(figsize=(5.5, 4.5), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        for row in with_gt:
            images = [r for r in rows if r["method"] == row["method"] and r["sim_gt"] is not None
                      and r["cp"] is not None]
            axes.scatter([r["cp"] for r in images], [r["sim_gt"] for r in images], s=12, alpha=0.3,
                         color=colours[row["method"]])
            axes.scatter([row["cp"]], [row["sim_gt"]], s=90, color=colours[row["method"]], edgecolor="black",
                         label=f"{row['method']} (mean of {len(images)})", zorder=3)
        axes.set_xlabel("copy-paste CP (-1 = like the ground truth, 1 = the reference pasted)")
        axes.set_ylabel("Sim(GT): cosine to the ground-truth face")
        axes.set_title("Identity vs copy-paste (upper left is better)")
        axes.set_xlim(-1.05, 1.05)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        written.append(_save_figure(figure, out / PLOT_FILES[0]))
    else:  # no case has a ground truth (any more): an earlier run's plot would not belong to these tables
        (out / PLOT_FILES[0]).unlink(missing_ok=True)

    figure = Figure(figsize=(9, 4), layout="constrained")
    FigureCanvasAgg(figure)
    by_people = [row for row in summary if row["people"] != ALL_PEOPLE]
    people_counts = sorted({row["people"] for row in by_people})
    for place, (key, title) in enumerate((("coverage", "coverage (present / people), higher is better"),
                                          ("duplicates", "images with a person twice, lower is better")), 1):
        axes = figure.add_subplot(1, 2, place)
        for method, colour in colours.items():
            points = [(row["people"], row[key]) for row in by_people if row["method"] == method
                      and row[key] is not None]
            if points:
                axes.plot(*zip(*points), marker="o", color=colour, label=method)
        axes.set_xticks(people_counts)
        axes.set_xlabel("people in the case")
        axes.set_ylabel("mean over the images" if key == "coverage" else "share of the images")
        axes.set_ylim(-0.03, 1.03)
        axes.set_title(title, fontsize="medium")
        axes.grid(alpha=0.3)
    if figure.axes[0].lines:
        figure.axes[0].legend(fontsize="small")
    written.append(_save_figure(figure, out / PLOT_FILES[1]))
    return written


def _save_figure(figure, path: Path) -> Path:
    with atomic_path(path, suffix=".tmp.png") as temporary:
        figure.savefig(temporary, dpi=100)
    return path


def write_outputs(out: Path, rows: list[dict], records: list[dict], summary: list[dict],
                  settings: dict) -> list[Path]:
    """results.json, images.csv, summary.csv, summary.md and the plots, each written whole or not at all;
    returns the plots drawn."""
    where = ("case", "method", "image", "people", "face_count_ok")
    results = {**settings, "summary": summary,
               "images": [{**{key: row[key] for key in where},
                           **{key: value for key, value in record.items() if key != "same_person_threshold"}}
                          for row, record in zip(rows, records)]}
    _write_text(out / "results.json", json.dumps(results, indent=2))
    _write_text(out / "images.csv", _csv_text(rows))
    _write_text(out / "summary.csv", _csv_text(summary))
    _write_text(out / "summary.md", summary_markdown(summary))
    return plot(summary, rows, out)


def _check_out(out: Path, benchmark: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UMOError(f"--out '{out}' is a file; give a folder for the tables (it is made if missing)")
    resolved, bench = out.resolve(), benchmark.resolve()
    if resolved == bench or bench in resolved.parents:
        raise UMOError(f"--out '{out}' is inside the benchmark folder '{benchmark}' (it would become a case); "
                       "choose a folder outside it")


def evaluate_command(args: argparse.Namespace) -> dict | None:
    """Score what the cache lacks, then write the tables (unless --shard). Returns the results written."""
    if args.shard and args.merge:
        raise UMOError("--merge writes the tables from every shard's results; give it without --shard")
    shard = parse_shard(args.shard) if args.shard else None
    at_least("--batch", args.batch, 1, " (images per face-model call)")
    pixel_limit(args.max_pixels)  # a bad --max-pixels or $UMO_MAX_PIXELS is named before the folder is read
    if not args.shard and importlib.util.find_spec("matplotlib") is None:
        raise UMOError("evaluate draws its plots with matplotlib, which is not installed; "
                       "pip install matplotlib (or umo-identity[eval])")
    if not args.merge:
        resolve_providers(args.provider)  # an unknown or missing provider is named before the files are read
    _check_out(args.out, args.benchmark)
    cases = read_benchmark(args.benchmark, args.max_pixels)
    jobs = benchmark_jobs(cases)
    mine = shard_jobs(jobs, *shard) if shard else jobs
    pack = find_face_pack(args.faces)
    keys = cache_keys(mine, pack_digest(pack, args.backend))
    cache = ResultCache(args.out / CACHE_FOLDER)
    pending = [job for job in mine if cache.load(keys[job]) is None]  # a damaged record is scored again
    if args.merge and pending:
        raise UMOError(f"--merge: {len(pending)} of {len(jobs)} images have no result in '{cache.folder}' (the "
                       f"first: case '{pending[0].case.name}', method '{pending[0].method}', image "
                       f"'{pending[0].image}'); run the shards that hold them, or evaluate without --merge")
    what = f"shard {shard[0]}/{shard[1]}: " if shard else ""
    print(f"{what}{len(mine)} image(s) of {len(cases)} case(s), {len(mine) - len(pending)} already scored "
          f"in '{cache.folder}'")
    if pending:
        face_model = FaceModel(pack, args.provider, args.backend)
        for note in face_model.notes:
            tell("note", note)
        bar = progress(len(mine), "evaluate", "image")
        bar.update(len(mine) - len(pending))
        scored = 0

        def finished(count: int) -> None:
            nonlocal scored
            scored += count
            bar.update(count)

        try:
            score_jobs(face_model, pending, keys, cache, args.batch, args.max_pixels, finished)
        except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM (console.Stopped): the shell's status for it
            bar.close()
            tell("note", f"interrupted: the {len(mine) - len(pending) + scored} scored image(s) are kept in "
                 f"'{cache.folder}'; the same command goes on from there")
            raise SystemExit(128 + stop_signal(stop)) from None
        bar.close()
    if shard:
        print(f"shard {shard[0]}/{shard[1]} done; once every shard is, write the tables with --merge")
        return None

    records = [cache.load(keys[job]) for job in jobs]
    unreadable = [job for job, record in zip(jobs, records) if record is None]
    if unreadable:  # removed or damaged since the check above: another process, or the disk
        raise UMOError(f"the cached result of '{unreadable[0].name}' in '{cache.folder}' cannot be read; "
                       "run evaluate again to score it anew")
    rows = [image_row(job, record, args.benchmark) for job, record in zip(jobs, records)]
    summary = summarise(rows)
    settings = {"benchmark": str(args.benchmark), "face_pack": str(pack.directory), "backend": args.backend,
                "same_person_threshold": records[0]["same_person_threshold"],
                "cases": len(cases), "image_count": len(jobs)}
    plots = write_outputs(args.out, rows, records, summary, settings)
    print(summary_markdown(summary), end="")
    print(f"tables and plots in '{args.out}': {', '.join([*TABLE_FILES, *(path.name for path in plots)])}")
    return {**settings, "summary": summary, "images": rows}
