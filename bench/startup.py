"""Cold start of `score` against a bare `import torch, onnxruntime`, interleaved in one run.

Each repetition starts fresh processes, both under `python -X importtime`:
  bare:  python -c "import torch, onnxruntime"
  score: python -m umo_core score --faces antelopev2 --ref A --ref B --image X Y Z
(the README's main command; antelopev2 is the stand-in of tests/official_packs.py found through
$INSIGHTFACE_HOME: the real fixture detector and recogniser beside the landmark and gender/age graphs).
Prints wall seconds, CPU seconds and import seconds per run, the medians, the load average, and which
of the slow optional imports (onnx, ml_dtypes, torchvision, torch._dynamo) the score run loaded.

    python bench/startup.py [--repeats 5] [--before OLD_CHECKOUT]

--before runs score from another checkout of the project too (a before/after), with the bare two-file
pack of the same detector and recogniser: code from before issue #12 takes a landmark model of the
official layout for the recogniser.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.conftest import PHOTOS, make_pack  # noqa: E402
from tests.official_packs import make_official_pack  # noqa: E402

SLOW_IMPORTS = ("onnx", "ml_dtypes", "torchvision", "torch._dynamo")


def score_command(faces: str) -> list[str]:
    return [sys.executable, "-X", "importtime", "-m", "umo_core", "score", "--faces", faces,
            "--ref", str(PHOTOS / "Rob_Lowe_0001.jpg"), "--ref", str(PHOTOS / "Nathalie_Baye_0002.jpg"),
            "--image", *(str(PHOTOS / n) for n in ("t1_six_people.jpg", "Rob_Lowe_0002.jpg", "no_face_view.jpg"))]


def timed(command: list[str], cwd: Path, env: dict) -> tuple[float, float, float, set[str]]:
    """(wall s, CPU s, import s, slow modules imported) of one fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    # importtime lines: "import time: self | cumulative | name"; top-level modules have no indent.
    rows = [m.groups() for m in re.finditer(r"import time:\s+\d+ \|\s+(\d+) \| (\s*)(\S+)", result.stderr)]
    imports = sum(int(cumulative) for cumulative, indent, _ in rows if not indent) / 1e6
    loaded = {name for _, _, name in rows} & set(SLOW_IMPORTS)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, imports, loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before", type=Path, help="another checkout to run the same score command from")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp())
    make_official_pack(home / "models", "antelopev2")
    env = {**os.environ, "INSIGHTFACE_HOME": str(home)}
    env.pop("COMFYUI_PATH", None)
    runs = {"bare import": ([sys.executable, "-X", "importtime", "-c", "import torch, onnxruntime"], ROOT),
            "score": (score_command("antelopev2"), ROOT)}
    if args.before:
        runs["score (before, bare pack)"] = (score_command(str(make_pack(home / "bare"))), args.before)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    results: dict[str, list[tuple]] = {name: [] for name in runs}
    for repeat in range(args.repeats):
        load = os.getloadavg()[0]
        line = []
        for name, (command, cwd) in runs.items():
            results[name].append(timed(command, cwd, env))
            line.append(f"{name} {results[name][-1][0]:.2f} s")
        print(f"repeat {repeat + 1} (load {load:.1f}): " + ", ".join(line))
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print("| run | wall s (median, min) | CPU s (median) | imports s (median) | slow imports loaded |")
    print("|---|---:|---:|---:|---|")
    for name, rows in results.items():
        walls, cpus, imports = ([row[i] for row in rows] for i in range(3))
        loaded = ", ".join(sorted(set().union(*(row[3] for row in rows)))) or "none"
        print(f"| {name} | {statistics.median(walls):.2f}, {min(walls):.2f} | {statistics.median(cpus):.2f} | "
              f"{statistics.median(imports):.2f} | {loaded} |")
    gap = statistics.median(r[0] for r in results["score"]) - statistics.median(r[0] for r in results["bare import"])
    print(f"score - bare import (medians): {gap:.2f} s")


if __name__ == "__main__":
    main()
