"""Detect + embed throughput: umo_core's batched path versus a loop of insightface's FaceAnalysis.get.

Both sides run the same face pack on the same real photos, each in its own worker process, taking turns
(insightface, then umo_core, again and again): a change in the machine's load hits both alike. A side
hands the turn over only once its process is idle again, so that neither side's threads run during the
other's turn or count in its CPU seconds: insightface's workers (onnxruntime's spinning threads) go on
using about 100 ms of CPU in the 100 ms after each `get` returns, which a fixed 50 ms pause let run into
our turn. The figures are medians over the repetitions: images/s and faces/s for 1, 4 and 16 images, CPU
milliseconds per image (of the call itself), and the load average before and after (the machine may be
shared).

    python bench/face_throughput.py [--pack DIR] [--provider cpu|cuda] [--backend onnx|torch] [--repeats 9]

Without --pack it builds a pack from ../shared/face-assets (det_500m + mobilefacenet_128d).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from umo_core.faces.embedding import BACKENDS

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "face-assets"
COUNTS = (1, 4, 16)
SIDES = ("insightface", "umo_core")


def fixture_pack(detector: str) -> Path:
    folder = Path(tempfile.mkdtemp()) / "bench_pack"
    folder.mkdir()
    for name in (detector, "mobilefacenet_128d.onnx"):
        shutil.copyfile(ASSETS / "models" / name, folder / name)
    return folder


def real_photos() -> list[np.ndarray]:
    from umo_core.images import load_image

    photos = sorted((ASSETS / "images" / "photos").glob("*.jpg"))
    return [load_image(p) for p in photos if p.name != "no_face_view.jpg"]


def wait_until_idle(window: float = 0.02, busy: float = 0.001, limit: float = 0.5) -> None:
    """Return once this process uses under `busy` CPU seconds in a `window` (its worker threads have stopped),
    or after `limit` seconds: a process that never goes idle costs gpu.sh's time limit no more than that per turn."""
    deadline = time.perf_counter() + limit
    while time.perf_counter() < deadline:
        cpu = time.process_time()
        time.sleep(window)
        if time.process_time() - cpu < busy:
            return


def worker(side: str, pack: Path, provider: str, backend: str, connection) -> None:
    """One side in its own process: sends its set-up line, then answers each image count with
    (faces found, wall seconds, CPU seconds of this process) of one run over that many photos, once
    the process is idle again."""
    import onnxruntime
    import torch
    from insightface.app import FaceAnalysis

    from umo_core import load_face_model

    ours = load_face_model(pack, provider=provider, backend=backend)
    photos = real_photos()
    if side == "insightface":
        theirs = FaceAnalysis(name=str(pack), providers=ours.providers, allowed_modules=["detection", "recognition"])
        theirs.prepare(ctx_id=0 if "CUDAExecutionProvider" in ours.providers else -1)
        del ours

        def run(batch):
            return sum(len(theirs.get(np.ascontiguousarray(image[:, :, ::-1]))) for image in batch)
    else:
        def run(batch):
            return sum(len(analysed.faces) for analysed in ours.analyse(batch))
    connection.send(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
    while (count := connection.recv()) is not None:
        batch = [photos[i % len(photos)] for i in range(count)]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        faces = run(batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        result = (faces, time.perf_counter() - wall, time.process_time() - cpu)
        wait_until_idle()
        connection.send(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", type=Path)
    parser.add_argument("--detector", default="det_500m.onnx", help="fixture detector when --pack is not given")
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--backend", default="onnx", choices=BACKENDS)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()

    pack = args.pack or fixture_pack(args.detector)
    context = multiprocessing.get_context("spawn")
    connections, processes = {}, []
    for side in SIDES:
        ours_end, worker_end = context.Pipe()
        process = context.Process(target=worker, args=(side, pack, args.provider, args.backend, worker_end))
        process.start()
        connections[side], processes = ours_end, [*processes, process]
    versions = {side: connection.recv() for side, connection in connections.items()}

    def turn(side: str, count: int) -> tuple[int, float, float]:
        connections[side].send(count)
        return connections[side].recv()

    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{versions['umo_core']}, provider {args.provider}, backend {args.backend}, pack {pack.name}, "
          f"{args.repeats} alternating repetitions per size (medians), one process per side, "
          "each turn handed over once its process is idle")
    print(f"# load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'images':>6} {'faces':>5} | {'insightface img/s':>17} {'faces/s':>8} {'CPU ms/img':>10} | "
          f"{'umo_core img/s':>14} {'faces/s':>8} {'CPU ms/img':>10} | speed-up (wall, CPU)")
    for count in COUNTS:
        faces = {side: turn(side, count)[0] for side in SIDES}  # warm-up: first-call allocations, shape plans
        if faces["umo_core"] != faces["insightface"]:
            print(f"note: umo_core found {faces['umo_core']} faces, insightface {faces['insightface']}")
        runs = {side: [] for side in SIDES}
        for _ in range(args.repeats):
            for side in SIDES:
                runs[side].append(turn(side, count)[1:])
        medians = {side: (statistics.median(w for w, _ in runs[side]), statistics.median(c for _, c in runs[side]))
                   for side in SIDES}
        (wall_theirs, cpu_theirs), (wall_ours, cpu_ours) = medians["insightface"], medians["umo_core"]
        print(f"{count:>6} {faces['umo_core']:>5} | {count / wall_theirs:>17.2f} "
              f"{faces['insightface'] / wall_theirs:>8.1f} {1000 * cpu_theirs / count:>10.1f} | "
              f"{count / wall_ours:>14.2f} {faces['umo_core'] / wall_ours:>8.1f} {1000 * cpu_ours / count:>10.1f} | "
              f"{wall_theirs / wall_ours:.2f}x, {cpu_theirs / cpu_ours:.2f}x")
    print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for connection, process in zip(connections.values(), processes):
        connection.send(None)
        process.join()


if __name__ == "__main__":
    main()
