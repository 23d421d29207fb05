"""training.prepare_data throughput: photos/s of the whole command next to a plain per-photo detect + embed loop.

For each count, a collection of group composites (one to three ArcFace-aligned LFW faces of the face-assets,
pasted at random sizes, the same builder as tests/group_photos.py) is written as JPEGs; then, in one
process, one after the other:
- plain: for each photo, load_image + FaceModel.analyse([photo]) (what a hand-written script would do);
- cold: python -m training.prepare_data on an empty cache (hashing, reading, detect + embed, clustering,
  reference crops, contact sheets, report);
- warm: the same command again, every photo in the cache (the build alone).

    python -m bench.prepare_data [--counts 100 1000] [--pack DIR] [--provider cpu] [--workers 2] [--batch-size 16]

Run it from the repository root (it imports the test's composite builder). Without --pack it builds a pack from
../shared/face-assets (det_500m + mobilefacenet_128d).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tests.conftest import LFW, make_pack
from tests.group_photos import group_photo, lfw_face
from training.prepare_data import main as prepare_data
from umo_core import load_face_model
from umo_core.images import load_image


def write_collection(folder: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    names = sorted(path.stem for path in LFW.glob("*.jpg"))
    folder.mkdir(parents=True)
    for index in range(count):
        chosen = rng.choice(names, size=int(rng.integers(1, 4)), replace=False)
        faces = [lfw_face(name, side=int(rng.integers(140, 280))) for name in chosen]
        group_photo(faces, gap=int(rng.integers(60, 160))).save(folder / f"{index:05d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--pack", type=Path)
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_prepare_data_"))
    pack = args.pack or make_pack(root / "pack")
    face_model = load_face_model(pack, provider=args.provider)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"providers {face_model.providers}, pack {pack.name}, workers {args.workers}, batch {args.batch_size}")
    print("| photos | faces | plain photos/s | prepare_data cold photos/s | cold s | warm s (cached) | rows |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for count in args.counts:
        photos = root / f"photos_{count}"
        write_collection(photos, count)
        paths = sorted(photos.glob("*.jpg"))
        start = time.perf_counter()
        faces = sum(len(face_model.analyse([load_image(path)])[0].faces) for path in paths)
        plain = time.perf_counter() - start
        command = ["--photos", str(photos), "--out", str(root / f"data_{count}"), "--faces", str(pack),
                   "--provider", args.provider, "--workers", str(args.workers), "--batch-size", str(args.batch_size)]
        timings = []
        for _ in ("cold", "warm"):
            start = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                assert prepare_data(command) == 0
            timings.append(time.perf_counter() - start)
        report = json.loads((root / f"data_{count}" / "report.json").read_text())
        assert report["embedding_cache"]["computed"] == 0  # the warm run found every photo in the cache
        print(f"| {count} | {faces} | {count / plain:.2f} | {count / timings[0]:.2f} | {timings[0]:.1f} | "
              f"{timings[1]:.1f} | {report['rows']['written']} |")


if __name__ == "__main__":
    main()
