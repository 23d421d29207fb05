"""Cost of one identity-guidance step versus a plain VAE decode, at 768 and 1024 px.

The FLUX autoencoder at its real architecture (diffusers AutoencoderKL with FLUX's ae config,
random weights) and the fixture face networks (SCRFD-500MF, MobileFaceNet). Random weights draw
no faces, so the six face boxes of the group photo (scaled to the image) are given; each mode
runs in its own process so its peak memory (RSS, or CUDA peak on a GPU) is its own.

    python bench/guidance.py [--sizes 768 1024] [--device cpu|cuda] [--dtype float32|bfloat16]

Modes: `decode` = one full decode without gradient (what every generation does at the end);
`guided` = one guidance step as the node runs it (preview decode + windowed decodes with
gradient + reward + backward); `full` = the naive alternative, a full decode with gradient.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "face-assets"
FLUX_AE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               layers_per_block=2, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False)


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_mode(mode: str, size: int, device: str, dtype: torch.dtype) -> dict:
    from diffusers import AutoencoderKL

    from umo_core import load_face_model
    from umo_core.detection import Faces
    from umo_core.guidance import reward_gradient
    from umo_core.images import load_image
    from umo_core.reward import identity_reward

    torch.manual_seed(0)
    vae = AutoencoderKL(**FLUX_AE).to(device, dtype).eval().requires_grad_(False)
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

    latent = torch.randn(1, 16, size // 8, size // 8, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = peak_bytes(device)
    start = time.perf_counter()
    if mode == "decode":
        with torch.no_grad():
            decode(latent)
    elif mode == "guided":
        with torch.no_grad():
            decode(latent)  # the preview the node decodes to find faces
        reward_gradient(latent, decode, identities, face_model, faces=faces)
    else:
        pixels_latent = latent.clone().requires_grad_(True)
        reward = identity_reward(decode(pixels_latent), identities, face_model, faces=[faces]).values.sum()
        reward.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"mode": mode, "size": size, "seconds": seconds, "peak_gib": (peak_bytes(device) - baseline) / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[768, 1024])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--modes", nargs="+", default=["decode", "guided", "full"])
    parser.add_argument("--child", nargs=2, metavar=("MODE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.child:
        print(json.dumps(run_mode(args.child[0], int(args.child[1]), args.device, dtype)))
        return
    print(f"# {platform.node()} {platform.machine()}, torch {torch.__version__}, device {args.device}, {args.dtype}")
    print(f"{'size':>5} {'mode':>7} {'seconds':>8} {'peak GiB':>9} {'vs decode':>10}")
    for size in args.sizes:
        base = None
        for mode in args.modes:
            out = subprocess.run([sys.executable, __file__, "--device", args.device, "--dtype", args.dtype,
                                  "--child", mode, str(size)], capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            base = base or result["seconds"]
            print(f"{size:>5} {mode:>7} {result['seconds']:>8.2f} {result['peak_gib']:>9.2f} "
                  f"{result['seconds'] / base:>9.2f}x")


if __name__ == "__main__":
    main()
