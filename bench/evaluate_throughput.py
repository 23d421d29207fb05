"""`python -m umo_core evaluate` throughput next to a plain insightface loop over the same benchmark folder.

The folder is tests/benchmark_folder.py's benchmark repeated `--copies` times (10 images of 2 or 3 people per
copy, a ground truth per case). Each side runs in its own worker process, taking turns (the insightface loop,
then evaluate, again and again) and handing a turn over only once its process is idle (bench/face_throughput.py
explains why); a turn is the whole job, the face model loaded anew:
- insightface: FaceAnalysis (detection + recognition) of the same pack; per case each reference's largest face
  and the ground truth's faces, then per image `cv2.imread` + `FaceAnalysis.get` and the same metrics code
  (`umo_core.faces.metrics.identity_metrics`): what a hand-written benchmark script does, without writing tables;
- evaluate: the command on an empty --out folder (hashing, reading, scoring, cache, tables, plots).

    python -m bench.evaluate_throughput [--copies 8] [--repeats 5] [--pack DIR] [--provider cpu] [--batch 8]

Run it from the repository root (it imports the tests' benchmark builder). Without --pack it builds a pack from
../shared/face-assets (det_500m + mobilefacenet_128d). Prints medians: seconds, images/s, CPU seconds, speed-up.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

SIDES = ("insightface", "evaluate")


def insightface_loop(app, cases) -> int:
    """The plain loop over every case's images; returns the number of images scored."""
    import cv2
    import numpy as np
    import torch

    from umo_core.faces.face_model import same_person_threshold
    from umo_core.faces.metrics import identity_metrics

    def embeddings(faces, dim: int) -> torch.Tensor:
        return torch.from_numpy(np.stack([face.normed_embedding for face in faces])) if faces else torch.zeros(0, dim)

    def area(face) -> float:
        return (face.bbox[2] - face.bbox[0]) * (face.bbox[3] - face.bbox[1])

    count = 0
    for case in cases:
        references = embeddings([max(app.get(cv2.imread(str(path))), key=area) for path in case.references], 0)
        dim = references.shape[1]
        threshold = same_person_threshold(dim)[0]
        gt = embeddings(app.get(cv2.imread(str(case.ground_truth))), dim) if case.ground_truth else None
        for images in case.methods.values():
            for path in images:
                identity_metrics(references, embeddings(app.get(cv2.imread(str(path))), dim), threshold, gt)
                count += 1
    return count


def worker(side: str, benchmark: Path, pack: Path, provider: str, batch: int, connection) -> None:
    """One side in its own process: answers each turn with (images, wall seconds, CPU seconds of this process),
    once the process is idle again."""
    import warnings

    import onnxruntime
    import torch
    from insightface.app import FaceAnalysis

    warnings.filterwarnings("ignore", category=FutureWarning)  # insightface's use of scikit-image's estimate

    from bench.face_throughput import wait_until_idle
    from umo_core.cli import main as umo_main
    from umo_core.evaluate import read_benchmark
    from umo_core.faces.face_pack import resolve_providers

    cases = read_benchmark(benchmark)
    out = Path(tempfile.mkdtemp(prefix="bench_evaluate_out_"))
    providers = resolve_providers(provider)

    def run_insightface() -> int:
        app = FaceAnalysis(name=str(pack), providers=providers, allowed_modules=["detection", "recognition"])
        app.prepare(ctx_id=0 if "CUDAExecutionProvider" in providers else -1)
        return insightface_loop(app, cases)

    def run_evaluate() -> int:
        shutil.rmtree(out, ignore_errors=True)
        with contextlib.redirect_stdout(io.StringIO()):
            status = umo_main(["evaluate", str(benchmark), "--out", str(out), "--faces", str(pack),
                               "--provider", provider, "--batch", str(batch)])
        assert status == 0, "evaluate failed"
        return sum(len(images) for case in cases for images in case.methods.values())

    run = run_insightface if side == "insightface" else run_evaluate
    connection.send(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
    while connection.recv():
        wall, cpu = time.perf_counter(), time.process_time()
        # insightface prints each model it loads, evaluate its table and progress lines
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            images = run()
        result = (images, time.perf_counter() - wall, time.process_time() - cpu)
        wait_until_idle()
        connection.send(result)
    shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    from tests.benchmark_folder import build_benchmark
    from tests.conftest import make_pack

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=8, help="copies of the test benchmark's cases (10 images each)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pack", type=Path)
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--batch", type=int, default=8, help="evaluate's --batch")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_evaluate_"))
    benchmark = build_benchmark(root / "bench", copies=args.copies)
    pack = args.pack or make_pack(root / "pack")
    context = multiprocessing.get_context("spawn")
    connections, processes = {}, []
    for side in SIDES:
        ours_end, worker_end = context.Pipe()
        process = context.Process(target=worker, args=(side, benchmark, pack, args.provider, args.batch, worker_end))
        process.start()
        connections[side], processes = ours_end, [*processes, process]
    versions = {side: connection.recv() for side, connection in connections.items()}

    def turn(side: str) -> tuple[int, float, float]:
        connections[side].send(True)
        return connections[side].recv()

    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{versions['evaluate']}, provider {args.provider}, pack {pack.name}, --batch {args.batch}, "
          f"{args.copies} copies of the test benchmark, {args.repeats} alternating repetitions (medians)")
    print(f"# load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for side in SIDES:  # warm-up: first-call allocations, matplotlib's font cache
        turn(side)
    runs = {side: [] for side in SIDES}
    for _ in range(args.repeats):
        for side in SIDES:
            runs[side].append(turn(side))
    images = runs["evaluate"][0][0]
    medians = {side: (statistics.median(w for _, w, _ in runs[side]), statistics.median(c for _, _, c in runs[side]))
               for side in SIDES}
    (wall_theirs, cpu_theirs), (wall_ours, cpu_ours) = medians["insightface"], medians["evaluate"]
    print(f"{'images':>6} | {'insightface s':>13} {'img/s':>6} {'CPU s':>6} | {'evaluate s':>10} {'img/s':>6} "
          f"{'CPU s':>6} | speed-up (wall, CPU)")
    print(f"{images:>6} | {wall_theirs:>13.2f} {images / wall_theirs:>6.1f} {cpu_theirs:>6.2f} | {wall_ours:>10.2f} "
          f"{images / wall_ours:>6.1f} {cpu_ours:>6.2f} | {wall_theirs / wall_ours:.2f}x, {cpu_theirs / cpu_ours:.2f}x")
    print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for connection, process in zip(connections.values(), processes):
        connection.send(False)
        process.join()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
