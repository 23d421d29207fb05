"""Detect + embed throughput: umo_core's batched path versus a loop of insightface's FaceAnalysis.get.

Both run the same face pack on the same real photos in one process, one after the other,
so the figures compare like with like. Prints images/s and faces/s for 1, 4 and 16 images.

    python bench/face_throughput.py [--pack DIR] [--provider cpu|cuda] [--backend onnx|torch] [--repeats 3]

Without --pack it builds a pack from ../shared/face-assets (det_500m + mobilefacenet_128d).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from insightface.app import FaceAnalysis

from umo_core import load_face_model
from umo_core.images import load_image

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "face-assets"


def fixture_pack(detector: str) -> Path:
    folder = Path(tempfile.mkdtemp()) / "bench_pack"
    folder.mkdir()
    for name in (detector, "mobilefacenet_128d.onnx"):
        shutil.copyfile(ASSETS / "models" / name, folder / name)
    return folder


def real_photos() -> list[np.ndarray]:
    photos = sorted((ASSETS / "images" / "photos").glob("*.jpg"))
    return [load_image(p) for p in photos if p.name != "no_face_view.jpg"]


def best_time(run, repeats: int) -> float:
    run()  # warm-up: session initialisation, first-call allocations
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", type=Path)
    parser.add_argument("--detector", default="det_500m.onnx", help="fixture detector when --pack is not given")
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--backend", default="onnx", choices=("onnx", "torch"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    pack = args.pack or fixture_pack(args.detector)
    ours = load_face_model(pack, provider=args.provider, backend=args.backend)
    theirs = FaceAnalysis(name=str(pack), providers=ours.providers, allowed_modules=["detection", "recognition"])
    theirs.prepare(ctx_id=0 if "CUDAExecutionProvider" in ours.providers else -1)

    photos = real_photos()
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"providers {ours.providers}, backend {args.backend}, pack {pack.name}")
    print(f"{'images':>6} {'faces':>5} | {'insightface img/s':>17} {'faces/s':>8} | {'umo_core img/s':>14} "
          f"{'faces/s':>8} | speed-up")
    for count in (1, 4, 16):
        batch = [photos[i % len(photos)] for i in range(count)]
        bgr = [np.ascontiguousarray(image[:, :, ::-1]) for image in batch]
        faces = sum(len(a.faces) for a in ours.analyse(batch))
        reference = sum(len(theirs.get(image)) for image in bgr)
        if faces != reference:
            print(f"note: umo_core found {faces} faces, insightface {reference}")
        t_theirs = best_time(lambda bgr=bgr: [theirs.get(image) for image in bgr], args.repeats)
        t_ours = best_time(lambda batch=batch: ours.analyse(batch), args.repeats)
        print(f"{count:>6} {faces:>5} | {count / t_theirs:>17.2f} {reference / t_theirs:>8.1f} | "
              f"{count / t_ours:>14.2f} {faces / t_ours:>8.1f} | {t_theirs / t_ours:.2f}x")


if __name__ == "__main__":
    main()
