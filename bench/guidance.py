"""Cost of one identity-guidance step versus a plain VAE decode (768 and 1024 px), and the MIMR cost of reusing faces.

The FLUX autoencoder at its real architecture (diffusers AutoencoderKL as FLUX.1's ae.safetensors has it,
bench/train_step.py's, random weights) and the fixture face networks (SCRFD-500MF, MobileFaceNet). Random weights draw
no faces, so the six face boxes of the group photo (scaled to the image) are given; each mode
runs in its own process so its peak memory (RSS, or CUDA peak on a GPU) is its own.

    python bench/guidance.py [--sizes 768 1024] [--device cpu|cuda] [--dtype float32|bfloat16] [--mimr]
    python bench/guidance.py --duplicates

Modes: `decode` = one full decode without gradient (what every generation does at the end);
`guided` = a guidance step that detects (preview decode + windowed decodes with gradient + reward +
backward); `reused` = a guidance step on the faces of an earlier step (no preview: the windows only);
`full` = the naive alternative, a full decode with gradient; `transformer` = one FLUX.1 transformer
evaluation (a sampling step's velocity; `--transformer full` FLUX.1-dev or `tiny`, random weights), so
that with `guided` and `reused` the guidance's share of a 25-step sampling is printed.

`--mimr`: the guided images' MIMR with faces reused (detection every 3 steps) against detecting at
every step, on the test cases of tests/test_guidance.py (the blurred head-shot and the blurred group
photo as their own latent, `MIMR_STEPS` guided steps of strength 0.002).

`--duplicates` (alone): guidance's reward with a term against duplicates (a second confident match of a
present reference) at several weights, on those cases and one with a duplicate (issue #18).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from umo_core.backbones import get
from umo_core.faces.guidance import REDETECT_EVERY

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "face-assets"
FLUX1 = get("flux1")


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def transformer_step(size: int, device: str, dtype: torch.dtype, architecture: str) -> Callable[[], object]:
    """One FLUX.1 transformer evaluation (the velocity of a sampling step, 512 text tokens, no references)
    at `architecture` 'full' (FLUX.1-dev) or 'tiny' (bench/train_step.py's), random weights."""
    from train_step import CONFIGS, random_models

    from umo_core.backbones.text_embedding import TextEmbedding

    config = CONFIGS["flux1"][architecture]
    transformer = random_models("flux1", config, torch.device(device), dtype)[0].eval().requires_grad_(False)
    widths = (config["transformer"]["joint_attention_dim"], config["transformer"]["pooled_projection_dim"])
    text = TextEmbedding(torch.randn(1, 512, widths[0], device=device), torch.randn(1, widths[1], device=device))
    latent = torch.randn(1, FLUX1.latent_channels, size // FLUX1.latent_scale, size // FLUX1.latent_scale,
                         device=device)

    @torch.no_grad()
    def step():
        return FLUX1.predict_velocity(transformer, latent, 0.5, text, [], guidance=3.5)

    return step


def guidance_work(mode: str, size: int, device: str, dtype: torch.dtype) -> Callable[[], object]:
    """The work of a decode / guidance mode: the FLUX autoencoder (random weights), the fixture face networks."""
    from train_step import CONFIGS, random_vae

    from umo_core import load_face_model
    from umo_core.faces.detection import Faces
    from umo_core.faces.guidance import reward_gradient
    from umo_core.faces.reward import identity_reward
    from umo_core.images import load_image

    torch.manual_seed(0)
    vae = random_vae("flux1", CONFIGS["flux1"]["full"]["vae"], torch.device(device), dtype).eval()
    pack = Path(tempfile.mkdtemp()) / "pack"
    pack.mkdir()
    for name in ("det_500m.onnx", "mobilefacenet_128d.onnx"):
        shutil.copyfile(ASSETS / "models" / name, pack / name)
    face_model = load_face_model(pack, provider="cuda" if device == "cuda" else "cpu", backend="torch", device=device)
    photos = ASSETS / "images" / "photos"
    identities = face_model.identities([photos / "Rob_Lowe_0001.jpg", photos / "Nathalie_Baye_0002.jpg"])
    group = face_model.detect(photos / "t1_six_people.jpg")[0]
    ratio = size / max(load_image(photos / "t1_six_people.jpg").shape[:2])
    faces = Faces(group.boxes * ratio, group.keypoints * ratio, group.scores)

    def decode(latent):
        return ((vae.decode(latent.to(dtype)).sample.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)

    latent = torch.randn(1, FLUX1.latent_channels, size // FLUX1.latent_scale, size // FLUX1.latent_scale,
                         device=device)

    def work():
        if mode == "decode":
            with torch.no_grad():
                decode(latent)
        elif mode in ("guided", "reused"):
            if mode == "guided":
                with torch.no_grad():
                    decode(latent)  # the preview the node decodes to find faces (random weights show none)
            reward_gradient(latent, decode, identities, face_model, faces=faces)
        else:
            pixels_latent = latent.clone().requires_grad_(True)
            identity_reward(decode(pixels_latent), identities, face_model, faces=[faces]).values.sum().backward()

    return work


def run_mode(mode: str, size: int, device: str, dtype: torch.dtype, architecture: str) -> dict:
    if mode == "transformer":
        work = transformer_step(size, device, dtype, architecture)
    else:
        work = guidance_work(mode, size, device, dtype)
    if device == "cuda":
        work()  # warm-up: kernel selection and allocations (on the CPU one run is minutes: not repeated)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = peak_bytes(device)
    start = time.perf_counter()
    work()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"mode": mode, "size": size, "seconds": seconds, "peak_gib": (peak_bytes(device) - baseline) / 2**30}


MIMR_STEPS = 6
DUPLICATE_STEPS = 12  # --duplicates: guided steps per run
DUPLICATE_WEIGHTS = (0.0, 1.0, 4.0)  # --duplicates: weights of the duplicate term (0: plain MIMR)


def _guidance_cases() -> tuple:
    """(face model, identities, cases {name: blurred image as a latent [1,3,H,W]}, decode, metrics of a latent):
    the test cases of tests/test_guidance.py (the latent is the image itself), and two with a duplicate for the
    references Rob Lowe and Nathalie Baye: Rob Lowe's other photo next to its mirror image (two confident Robs),
    and the same with a stranger (Teresa Williams) beside them."""
    import numpy as np
    from PIL import Image, ImageFilter, ImageOps

    from umo_core import identity_metrics, load_face_model

    pack = Path(tempfile.mkdtemp()) / "pack"
    pack.mkdir()
    for name in ("det_500m.onnx", "mobilefacenet_128d.onnx"):
        shutil.copyfile(ASSETS / "models" / name, pack / name)
    face_model = load_face_model(pack, provider="cpu", backend="torch")
    photos = ASSETS / "images" / "photos"
    identities = face_model.identities([photos / "Rob_Lowe_0001.jpg", photos / "Nathalie_Baye_0002.jpg"])
    rob = Image.open(photos / "Rob_Lowe_0002.jpg").convert("RGB")
    stranger = Image.open(photos / "Teresa_Williams_0001_1k.jpg").convert("RGB").resize(rob.size)
    side_by_side = {"two Robs": [rob, ImageOps.mirror(rob)], "Robs+other": [rob, ImageOps.mirror(rob), stranger]}
    cases = {"head-shot": (rob, 2.5), "group": (Image.open(photos / "t1_six_people.jpg").resize((640, 443)), 1.5)}
    for name, tiles in side_by_side.items():
        row = Image.new("RGB", (len(tiles) * rob.width, rob.height))
        for i, tile in enumerate(tiles):
            row.paste(tile, (i * rob.width, 0))
        cases[name] = (row, 1.5)
    latents = {}
    for name, (photo, blur) in cases.items():
        pixels = np.asarray(photo.convert("RGB").filter(ImageFilter.GaussianBlur(blur)), np.float32) / 255
        latents[name] = torch.from_numpy(pixels).permute(2, 0, 1)[None]

    def decode(latent):  # the latent is the image itself
        return latent.permute(0, 2, 3, 1).clamp(0, 1)

    def metrics(latent) -> dict:
        analysed = face_model.analyse(decode(latent))[0]
        return identity_metrics(identities.embeddings, analysed.embeddings,
                                face_model.same_person_threshold)["metrics"]

    return face_model, identities, latents, decode, metrics


def mimr_of_reuse() -> None:
    """MIMR after MIMR_STEPS guided steps, faces detected at every step versus every 3 steps."""
    from umo_core.faces.guidance import FaceReuse, guide

    face_model, identities, latents, decode, metrics = _guidance_cases()
    print(f"{'case':>10} {'before':>7} {'every step':>10} {'every 3':>8} {'difference':>10}")
    for name in ("head-shot", "group"):
        start, results = latents[name], []
        for every in (1, 3):
            latent, reuse = start, FaceReuse(every)
            for _ in range(MIMR_STEPS):
                latent, _ = guide(latent, decode, identities, face_model, 0.002, reuse=reuse)
            results.append(metrics(latent)["mimr"])
        before = metrics(start)["mimr"]
        print(f"{name:>10} {before:>7.4f} {results[0]:>10.4f} {results[1]:>8.4f} {results[1] - results[0]:>+10.4f}")


def duplicates_of_guidance() -> None:
    """Issue #18: does a term that penalises a second confident match of a matched reference help guidance?
    Per case and weight w of the term R = MIMR - w/(M*N) * sum over duplicate faces of (cosine - threshold), the
    step (of DUPLICATE_STEPS, strength 0.002, detecting at every step) after which the image is complete (every
    reference present, none repeated), and after the last step: duplicates, coverage and MIMR (without the term).
    """
    from umo_core.faces import matching
    from umo_core.faces.guidance import guide
    from umo_core.faces.matching import IdentityMatch, mimr

    face_model, identities, latents, decode, metrics = _guidance_cases()
    threshold = face_model.same_person_threshold

    def reward(weight: float):
        def with_duplicate_term(similarity: torch.Tensor, assignment: list[int | None]) -> torch.Tensor:
            repeated = IdentityMatch(None, None, similarity, assignment, threshold).duplicates  # {face: reference}
            penalty = sum((similarity[k, j] - threshold for j, k in repeated.items()), similarity.new_zeros(()))
            return mimr(similarity, assignment) - weight * penalty / similarity.numel()
        return with_duplicate_term

    print(f"{'case':>10} {'w':>4} {'complete after':>14} {'duplicates':>10} {'coverage':>8} {'mimr':>7}  "
          "duplicates per step")
    for name, start in latents.items():
        before = metrics(start)
        print(f"{name:>10} {'-':>4} {'-':>14} {before['duplicates']:>10} {before['coverage']:>8.2f} "
              f"{before['mimr'] or 0:>7.4f}  (before guidance)")
        for weight in DUPLICATE_WEIGHTS:
            matching.REWARDS["bench"] = reward(weight)  # the guidance's reward, by its name
            latent, complete_after, per_step = start, None, []
            for step in range(1, DUPLICATE_STEPS + 1):
                latent, _ = guide(latent, decode, identities, face_model, 0.002, kind="bench")
                after = metrics(latent)
                per_step.append(after["duplicates"])
                if complete_after is None and after["duplicates"] == 0 and after["coverage"] == 1:
                    complete_after = step
            print(f"{name:>10} {weight:>4g} {complete_after or 'never':>14} {after['duplicates']:>10} "
                  f"{after['coverage']:>8.2f} {after['mimr'] or 0:>7.4f}  {per_step}")
    del matching.REWARDS["bench"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[768, 1024])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--modes", nargs="+", default=["decode", "guided", "reused", "full"],
                        choices=("decode", "guided", "reused", "full", "transformer"))
    parser.add_argument("--transformer", default="full", choices=("full", "tiny"),
                        help="architecture of the transformer mode: FLUX.1-dev, or bench/train_step.py's tiny one")
    parser.add_argument("--mimr", action="store_true", help="also compare the MIMR of reused and per-step faces")
    parser.add_argument("--duplicates", action="store_true",
                        help="only: guidance with and without a duplicate-penalising term on the test cases")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.duplicates:
        duplicates_of_guidance()
        return
    if args.child:
        print(json.dumps(run_mode(args.child[0], int(args.child[1]), args.device, dtype, args.transformer)))
        return
    print(f"# {platform.node()} {platform.machine()}, torch {torch.__version__}, device {args.device}, {args.dtype}, "
          f"transformer {args.transformer}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'size':>5} {'mode':>11} {'seconds':>8} {'peak GiB':>9} {'vs decode':>10}")
    for size in args.sizes:
        results = {}
        for mode in args.modes:
            out = subprocess.run([sys.executable, __file__, "--device", args.device, "--dtype", args.dtype,
                                  "--transformer", args.transformer, "--child", mode, str(size)],
                                 capture_output=True, text=True, check=True)
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            base = next(iter(results.values()))["seconds"]
            print(f"{size:>5} {mode:>11} {results[mode]['seconds']:>8.2f} {results[mode]['peak_gib']:>9.2f} "
                  f"{results[mode]['seconds'] / base:>9.2f}x")
        if {"guided", "reused", "transformer"} <= results.keys():
            seconds = {mode: results[mode]["seconds"] for mode in results}
            print(f"{size:>5} guidance over the last {GUIDED_STEPS} of {SAMPLING_STEPS} steps, detecting every "
                  f"{REDETECT_EVERY}: +{100 * sampling_overhead(seconds):.0f} % of the sampling time")
    if args.mimr:
        mimr_of_reuse()


GUIDED_STEPS, SAMPLING_STEPS = 10, 25  # the node's default window (start 0.6) of a 25-step sampling


def sampling_overhead(seconds: dict[str, float]) -> float:
    """Guidance's extra time over a 25-step sampling (one transformer evaluation per step, FLUX.1-dev's
    distilled guidance): the guided steps that detect cost `guided`, the others `reused`."""
    detecting = -(-GUIDED_STEPS // REDETECT_EVERY)
    extra = detecting * seconds["guided"] + (GUIDED_STEPS - detecting) * seconds["reused"]
    return extra / (SAMPLING_STEPS * seconds["transformer"])


if __name__ == "__main__":
    main()
