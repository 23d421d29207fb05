"""One ReReFL training step: seconds, peak memory, and the share spent in the reward.

    python bench/train_step.py --config tiny            # CPU, tiny random-weight models
    python bench/train_step.py --config full --device cuda   # FLUX.1-dev architecture, 512x512, rank 512

The step is the trainer's: flow-matching loss, a no-grad rollout to the window, one step with
gradient, VAE decode with gradient and the identity reward, backward, AdamW. "reward" is the
decode + face detection/embedding + MIMR part of the forward and backward, measured by timing the
step with and without it. Random weights: the two references are real photos, faces in the
decoded estimate are not needed for the cost (the face network runs on the fixture group's boxes).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "face-assets"
CONFIGS = {
    "tiny": dict(transformer=dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                  joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)),
                 vae=(8, 8, 8, 8), size=128, rank=4, text=(8, 32, 16)),
    "full": dict(transformer=dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                                  joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56)),
                 vae=(128, 256, 512, 512), size=512, rank=512, text=(512, 4096, 768)),
}


def main() -> None:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from peft import LoraConfig

    from umo_core import identity_reward, load_face_model
    from umo_core.detection import Faces
    from umo_core.flux import TextEmbedding, decode_latents, predict_velocity, sample
    from umo_core.lora_formats import UNO_TARGET_MODULES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=CONFIGS, default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config, device = CONFIGS[args.config], torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, guidance_embeds=True, **config["transformer"])
    transformer = transformer.to(device, dtype).requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=config["rank"], lora_alpha=config["rank"], init_lora_weights="gaussian",
                                       target_modules=UNO_TARGET_MODULES))
    transformer.enable_gradient_checkpointing()
    lora = [p for p in transformer.parameters() if p.requires_grad]
    for parameter in lora:
        parameter.data = parameter.data.float()
    optimizer = torch.optim.AdamW(lora, lr=5e-6, weight_decay=0.01)
    vae = AutoencoderKL(latent_channels=16, block_out_channels=config["vae"],
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, norm_num_groups=min(32, config["vae"][0]), use_quant_conv=False,
                        use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
    vae = vae.to(device, dtype).requires_grad_(False)
    pack = Path(tempfile.mkdtemp()) / "pack"
    pack.mkdir()
    for name in ("det_500m.onnx", "mobilefacenet_128d.onnx"):
        shutil.copyfile(ASSETS / "models" / name, pack / name)
    face_model = load_face_model(pack, provider="cuda" if device.type == "cuda" else "cpu", backend="torch",
                                 device=device)
    photos = ASSETS / "images" / "photos"
    identities = face_model.identities([photos / "Rob_Lowe_0001.jpg", photos / "Nathalie_Baye_0002.jpg"])
    group = face_model.detect(photos / "t1_six_people.jpg")[0]
    ratio = config["size"] / 1280
    faces = [Faces(group.boxes * ratio, group.keypoints * ratio, group.scores)]

    tokens, text_dim, pooled_dim = config["text"]
    text = TextEmbedding(torch.randn(1, tokens, text_dim, device=device), torch.randn(1, pooled_dim, device=device))
    latent_side = config["size"] // 8
    references = [torch.randn(1, 16, 40, 40, device=device) for _ in range(2)]  # two references at 320 px
    target = torch.randn(1, 16, latent_side, latent_side, device=device)

    def step(with_reward: bool) -> None:
        t = torch.rand(())
        noise = torch.randn_like(target)
        velocity = predict_velocity(transformer, (1 - t) * target + t * noise, t, text, references)
        loss = torch.nn.functional.mse_loss(velocity, noise - target)
        latent = sample(transformer, torch.randn_like(target), text, references, steps=25, guidance=1.0, stop_at=20)
        velocity = predict_velocity(transformer, latent, 0.2, text, references)
        estimate = latent - 0.2 * velocity
        if with_reward:
            images = decode_latents(vae, estimate)
            loss = loss - identity_reward(images, identities, face_model, faces=faces).values.sum()
        else:
            loss = loss + estimate.float().mean() * 0  # same graph up to the estimate
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def timed(with_reward: bool) -> float:
        step(with_reward)
        best = float("inf")
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(with_reward)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return best

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    full, without = timed(True), timed(False)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    print(f"# {platform.node()} {platform.machine()}, torch {torch.__version__}, {args.config} config on {device}")
    print(f"step {full:.2f} s, without reward {without:.2f} s, reward share {(full - without) / full:.0%}, "
          f"peak GPU memory {peak:.1f} GiB")


if __name__ == "__main__":
    main()
