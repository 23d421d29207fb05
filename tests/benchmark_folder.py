"""A small `evaluate` benchmark folder built from the face-assets' LFW faces (tests/group_photos.py composites).
Shared by tests/test_evaluate.py and bench/evaluate_throughput.py.

Two cases, two "methods": `faithful` shows each case's people from other photos than the references (once a
mirrored copy, once with a stranger beside them), `pasted` shows the reference faces themselves (copy-paste),
with one person a second time (mirrored), or with one person missing. Each case has a ground-truth photo of
its people.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps

from tests.group_photos import group_photo, lfw_face


def _face(name: str) -> Image.Image:
    """An LFW face by name; "~Name_n" is its mirror image (another view of the same person)."""
    return ImageOps.mirror(lfw_face(name[1:])) if name.startswith("~") else lfw_face(name)


# case -> (references, ground truth, {method: {image name: faces left to right}})
CASES = {
    "duo": (["Angela_Bassett_1", "Akhmed_Zakayev_1"], ["Angela_Bassett_2", "Akhmed_Zakayev_2"], {
        "faithful": {"a.png": ["Angela_Bassett_3", "Akhmed_Zakayev_3"],
                     "b.png": ["Akhmed_Zakayev_4", "~Angela_Bassett_4"],
                     "c.png": ["Angela_Bassett_5", "Ann_Veneman_1", "Akhmed_Zakayev_3"]},
        "pasted": {"a.png": ["Angela_Bassett_1", "Akhmed_Zakayev_1"],
                   "b.png": ["Angela_Bassett_1", "Akhmed_Zakayev_1", "~Angela_Bassett_1"],
                   "c.png": ["Akhmed_Zakayev_1"]},
    }),
    "trio": (["Anders_Fogh_Rasmussen_1", "Amber_Tamblyn_1", "Abel_Pacheco_1"],
             ["Anders_Fogh_Rasmussen_2", "Amber_Tamblyn_2", "Abel_Pacheco_2"], {
        "faithful": {"a.png": ["Anders_Fogh_Rasmussen_3", "~Amber_Tamblyn_2", "~Abel_Pacheco_2"],
                     "b.png": ["~Abel_Pacheco_2", "Anders_Fogh_Rasmussen_4", "~Amber_Tamblyn_2"]},
        "pasted": {"a.png": ["Anders_Fogh_Rasmussen_1", "Amber_Tamblyn_1", "Abel_Pacheco_1"],
                   "b.png": ["Anders_Fogh_Rasmussen_1", "Amber_Tamblyn_1"]},
    }),
}


def build_benchmark(folder: Path, copies: int = 1) -> Path:
    """Write the benchmark into `folder` (made if missing); `copies` > 1 repeats each case under new names
    (duo_2, ...) for a larger folder. Returns `folder`."""
    for copy in range(1, copies + 1):
        for case, (references, ground_truth, methods) in CASES.items():
            root = folder / (case if copy == 1 else f"{case}_{copy}")
            (root / "refs").mkdir(parents=True, exist_ok=True)
            for number, name in enumerate(references, 1):
                group_photo([_face(name)]).save(root / "refs" / f"{number}_{name}.png")
            group_photo([_face(name) for name in ground_truth]).save(root / "gt.png")
            for method, images in methods.items():
                (root / method).mkdir(exist_ok=True)
                for image, faces in images.items():
                    group_photo([_face(name) for name in faces]).save(root / method / image)
    return folder
