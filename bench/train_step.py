"""One ReReFL training step: seconds, peak memory, and the share spent in the reward.

    python bench/train_step.py --config tiny                 # CPU, tiny random-weight models
    python bench/train_step.py --config full --device cuda   # FLUX.1-dev architecture, ~512 px, rank 512
    python bench/train_step.py --backbone flux2 --config tiny                        # CPU, tiny FLUX.2
    python bench/train_step.py --backbone flux2 --config klein-4b --device cuda --resolution 1024
                                                             # klein-4b / klein-9b / dev: the real architectures

The step is the trainer's own code: `training.step.rerefl_step` and `apply_gradients`, under the trainer's
Accelerator (bf16 on CUDA), with its LoRA (`attach_lora`: fp32 weights, gradient checkpointing), on a batch
that `training.batches.load_batch` reads from a one-row data folder checked by the trainer's data check:
the six-person group photo as target (in its 3:2 bucket), two real reference photos, a random text
embedding of the transformer's widths. The schedule is the trainer's default (25 steps, gradient step drawn
from the last 10), so the rollout length varies from step to step: the mean over the timed steps is shown.

Random weights decode no faces, so by default the step is given the target's six faces (in the bucket's
pixels) instead of detecting on its estimate: `rerefl_step`'s `faces` argument, a seam for this bench
only. `--detect-faces` lets the step detect as in training (with random weights it finds no face and the
reward costs almost nothing). "reward" is `training.step.batch_reward` (decode with gradient, face network,
MIMR), forward and backward, timed alone on an estimate of the step's shape.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "face-assets"
PHOTOS = ASSETS / "images" / "photos"
TARGET, REFERENCES = "t1_six_people.jpg", ("Rob_Lowe_0001.jpg", "Nathalie_Baye_0002.jpg")
FLUX2_CONFIGS = ROOT / "umo_core" / "backbones" / "flux2" / "configs"
# Per backbone: transformer (keyword arguments, or the shipped config file of a real architecture), autoencoder
# widths, resolution, LoRA rank, text tokens.
CONFIGS = {
    "flux1": {
        "tiny": dict(transformer=dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                      joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)),
                     vae=(8, 8, 8, 8), resolution=128, rank=4, text_tokens=8),
        "full": dict(transformer=dict(num_layers=19, num_single_layers=38, attention_head_dim=128,
                                      num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                                      axes_dims_rope=(16, 56, 56)),
                     vae=(128, 256, 512, 512), resolution=512, rank=512, text_tokens=512),
    },
    "flux2": {
        "tiny": dict(transformer=dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                      joint_attention_dim=24, timestep_guidance_channels=32,
                                      axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False),
                     vae=(32, 32, 32, 32), resolution=128, rank=4, text_tokens=8),
        **{name: dict(transformer=json.loads((FLUX2_CONFIGS / f"flux2-{name}-transformer.json").read_text()),
                      vae=(128, 256, 512, 512), resolution=512, rank=128, text_tokens=512)
           for name in ("klein-4b", "klein-9b", "dev")},
    },
}


def random_models(backbone: str, config: dict, device: torch.device, dtype: torch.dtype):
    """The backbone's transformer and autoencoder architectures at `config`'s sizes, random weights."""
    from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel

    torch.manual_seed(0)
    with device:  # initialised where they run: a full transformer's billions of weights, fast on a GPU
        if backbone == "flux1":
            transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, guidance_embeds=True,
                                                 **config["transformer"])
        else:
            transformer = Flux2Transformer2DModel.from_config(config["transformer"])
    return transformer.to(dtype), random_vae(backbone, config["vae"], device, dtype)


def random_vae(backbone: str, block_channels: tuple[int, ...], device: torch.device, dtype: torch.dtype):
    """The backbone's autoencoder architecture with `block_channels` (the full ones: (128, 256, 512, 512)), random
    weights, frozen."""
    from diffusers import AutoencoderKL, AutoencoderKLFlux2

    with device:
        if backbone == "flux1":
            vae = AutoencoderKL(latent_channels=16, block_out_channels=block_channels,
                                down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
                                norm_num_groups=min(32, block_channels[0]), use_quant_conv=False,
                                use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
        else:
            vae = AutoencoderKLFlux2(block_out_channels=block_channels)
    return vae.to(dtype).requires_grad_(False)


def data_folder(folder: Path, backbone: str, text_widths: tuple[int, ...], text_tokens: int) -> Path:
    """A one-row training data folder, as the trainer reads it."""
    from safetensors.torch import save_file

    from umo_core.backbones.text_embedding import TextEmbedding, embedding_file_metadata, embedding_file_tensors

    (folder / "img").mkdir(parents=True)
    for name in (TARGET, *REFERENCES):
        shutil.copyfile(PHOTOS / name, folder / "img" / name)
    generator = torch.Generator().manual_seed(0)
    pooled = torch.randn(1, text_widths[1], generator=generator) if len(text_widths) > 1 else None
    text = TextEmbedding(torch.randn(1, text_tokens, text_widths[0], generator=generator), pooled)
    save_file(embedding_file_tensors(text, 0), folder / "text.safetensors", metadata=embedding_file_metadata(backbone))
    row = {"prompt": "six people", "target": f"img/{TARGET}", "references": [f"img/{n}" for n in REFERENCES],
           "text_embedding": "text.safetensors"}
    (folder / "manifest.jsonl").write_text(json.dumps(row) + "\n")
    return folder


def seconds(work, device: torch.device) -> tuple[float, float]:
    """Wall-clock and CPU seconds of work() (CPU seconds: all of this process's threads, which on a loaded
    machine vary less than the wall clock)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - start_cpu


def main() -> None:
    from accelerate import Accelerator

    from training.base_weights import BASE_DTYPES, check_int8_support, quantize_linear_layers
    from training.batches import load_batch
    from training.buckets import shape_key
    from training.data import check_dataset
    from training.rerefl import attach_lora, lora_adapter
    from training.step import StepSettings, apply_gradients, batch_reward, rerefl_step
    from umo_core import load_face_model
    from umo_core.backbones import get
    from umo_core.errors import UMOError

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=CONFIGS, default="flux1")
    parser.add_argument("--config", default="tiny", help="flux1: tiny, full; flux2: tiny, klein-4b, klein-9b, dev")
    parser.add_argument("--resolution", type=int, help="target side (default: the config's)")
    parser.add_argument("--sampling-steps", type=int, default=StepSettings.sampling_steps,
                        help="rollout steps (the gradient step is drawn from the last 10 or fewer)")
    parser.add_argument("--base-dtype", choices=BASE_DTYPES, default="auto",
                        help="the frozen transformer: auto (bf16 on CUDA, else fp32) or int8 (torchao, as the "
                             "trainer's --base-dtype int8)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--detect-faces", action="store_true",
                        help="detect on the step's estimate, as training does (random weights: no faces)")
    args = parser.parse_args()
    if args.config not in CONFIGS[args.backbone]:
        parser.error(f"--config {args.config} is not one of {', '.join(CONFIGS[args.backbone])} for {args.backbone}")
    config, cuda = dict(CONFIGS[args.backbone][args.config]), args.device.startswith("cuda")
    config["resolution"] = args.resolution or config["resolution"]
    accelerator = Accelerator(mixed_precision="bf16" if cuda else "no", cpu=not cuda)
    device, dtype = accelerator.device, torch.bfloat16 if cuda else torch.float32

    backbone = get(args.backbone)
    transformer, vae = random_models(args.backbone, config, device, dtype)
    if args.base_dtype == "int8":
        check_int8_support()
        quantize_linear_layers(transformer)
    lora = attach_lora(transformer, lora_adapter(config["rank"], backbone.lora_target_modules),
                       gradient_checkpointing=True)
    optimizer = torch.optim.AdamW(lora, lr=5e-6, weight_decay=0.01)  # the trainer's defaults
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    model = accelerator.unwrap_model(transformer)

    work = Path(tempfile.mkdtemp(prefix="train_step_"))
    (work / "pack").mkdir()
    for name in ("det_500m.onnx", "mobilefacenet_128d.onnx"):
        shutil.copyfile(ASSETS / "models" / name, work / "pack" / name)
    face_model = load_face_model(work / "pack", provider="cuda" if cuda else "cpu", backend="torch", device=device)
    text_widths = tuple(config["transformer"][key] for key in ("joint_attention_dim", "pooled_projection_dim")
                        if key in config["transformer"])
    data = data_folder(work / "data", args.backbone, text_widths, config["text_tokens"])
    samples, problems = check_dataset(data, face_model, text_widths, backbone)
    if problems:
        raise UMOError(f"the bench's data folder failed the data check: {problems}")
    sample = samples[0]
    bucket = shape_key(backbone, sample.target, sample.references, sample.text_embedding, config["resolution"])[0]
    batch = load_batch(backbone, samples, bucket, vae, device)
    faces = None if args.detect_faces else [truth.faces for truth in batch.ground_truth]
    settings = StepSettings(sampling_steps=args.sampling_steps, window=min(StepSettings.window, args.sampling_steps))
    generator = torch.Generator().manual_seed(0)
    reward_steps = []

    def training_step() -> None:
        result = rerefl_step(backbone, transformer, vae, face_model, batch, settings, generator,
                             rollout_transformer=model, faces=faces)
        apply_gradients(accelerator, result.loss, lora, optimizer, grad_clip=1.0)
        reward_steps.append(result.reward_step)

    def reward_alone() -> None:
        estimate = torch.randn(batch.target.shape, device=device, requires_grad=True)
        reward, _ = batch_reward(backbone, vae, face_model, batch, estimate, settings.reward, faces)
        reward.backward()

    training_step()  # warm-up
    reward_alone()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    steps = [seconds(training_step, device) for _ in range(args.repeats)]
    peak = f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else \
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    rewards = [seconds(reward_alone, device) for _ in range(args.repeats)]
    (step, step_cpu), (reward, reward_cpu) = (map(statistics.mean, zip(*timings)) for timings in (steps, rewards))
    walls = [wall for wall, _ in steps]
    shutil.rmtree(work, ignore_errors=True)
    print(f"# {platform.node()} {platform.machine()}, torch {torch.__version__}, {args.backbone} {args.config} "
          f"config on {device}, load average {os.getloadavg()[0]:.2f}")
    print(f"bucket {bucket[0]}x{bucket[1]}, rank {config['rank']}, base {args.base_dtype}, "
          f"{len(samples[0].references)} references, "
          f"{'faces detected on the estimate' if args.detect_faces else f'{len(faces[0])} given faces'}, "
          f"gradient steps drawn {reward_steps[1:]} of {settings.sampling_steps}")
    print(f"step {step:.2f} s (mean of {args.repeats}; {min(walls):.2f}-{max(walls):.2f}), reward {reward:.2f} s "
          f"({reward / step:.0%} of the step), {peak}")
    print(f"CPU time: step {step_cpu:.2f} s, reward {reward_cpu:.2f} s ({reward_cpu / step_cpu:.0%})")


if __name__ == "__main__":
    main()
