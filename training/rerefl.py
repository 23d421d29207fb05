"""ReReFL: train a UMO-style LoRA on FLUX with UNO's references and the multi-identity reward.

    accelerate launch -m training.rerefl --data DATA --transformer FLUX/transformer --vae FLUX/vae \
        --faces antelopev2 --output runs/umo           # or plain `python -m training.rerefl ...`

Per step (umo-method.md section 3): L = lambda * L_diff - R, where L_diff is the flow-matching loss
on the sample and R the reward of a ReReFL rollout: sample without gradient from noise to a random
step in the last `--window` steps of the schedule, take one step with gradient, form the one-step
clean estimate, decode it with gradient and score it with MIMR (or SIR) against the references -
the same `identity_reward` the nodes use.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from umo_core import UMOError, identity_reward, load_face_model
from umo_core.flux import TextEmbedding, decode_latents, encode_images, load_transformer, predict_velocity, sample
from umo_core.images import float_image, load_image
from umo_core.lora_formats import (
    BASE_MODEL_METADATA_KEY,
    FORMAT_METADATA_KEY,
    UNO_TARGET_MODULES,
    diffusers_to_uno,
    save_lora_file,
)
from umo_core.references import reference_long_side, resize_reference
from umo_core.uno import flux_sigmas

from .data import Sample, load_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.rerefl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with manifest.jsonl (see README)")
    parser.add_argument("--transformer", type=Path, required=True, help="diffusers FLUX transformer folder")
    parser.add_argument("--vae", type=Path, required=True, help="diffusers FLUX autoencoder folder")
    parser.add_argument("--faces", default="antelopev2", help="face pack name or folder")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=512)
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--resolution", type=int, default=512, help="target long side in pixels (multiple of 16)")
    parser.add_argument("--sampling-steps", type=int, default=25)
    parser.add_argument("--window", type=int, default=10, help="gradient step drawn from the last N sampling steps")
    parser.add_argument("--reward", choices=("mimr", "sir"), default="mimr")
    parser.add_argument("--diffusion-weight", type=float, default=1.0, help="lambda in L = lambda * L_diff - R")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="bf16")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--on-bad-rows", choices=("error", "skip"), default="error")
    parser.add_argument("--provider", default="auto", help="onnxruntime provider for face detection")
    return parser.parse_args(argv)


def load_target(path: Path, long_side: int) -> torch.Tensor:
    """The target image at the training resolution, centre-cropped to multiples of 16: [1,H,W,3]."""
    return resize_reference(float_image(load_image(path)), long_side)[None]


def save_atomically(folder: Path, write) -> None:
    """Write into a temporary sibling folder, then swap it in: a crash never leaves a half checkpoint."""
    temporary = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    write(temporary)
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(temporary, folder)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except UMOError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def train(args: argparse.Namespace) -> None:
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    # Seeds everything drawn outside our own generator (the LoRA's initialisation among them).
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = accelerator.device
    dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32

    # Models: the frozen FLUX transformer with a trainable LoRA, the frozen VAE and face networks.
    from diffusers import AutoencoderKL

    face_model = load_face_model(args.faces, provider=args.provider, backend="torch", device=device)
    samples, skipped = load_dataset(args.data, face_model, args.on_bad_rows)
    for line in skipped:
        accelerator.print(f"skipped {line}")
    transformer = load_transformer(args.transformer, dtype).to(device).requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(args.vae, torch_dtype=dtype, local_files_only=True).to(device)
    vae.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                       target_modules=UNO_TARGET_MODULES))
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    lora_parameters = [p for p in transformer.parameters() if p.requires_grad]
    for parameter in lora_parameters:
        parameter.data = parameter.data.float()  # LoRA weights train in fp32
    optimizer = torch.optim.AdamW(lora_parameters, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    model = accelerator.unwrap_model(transformer)

    # State that a resume restores exactly.
    generator = torch.Generator().manual_seed(args.seed + accelerator.process_index)
    state = {"step": 0, "position": 0, "order": []}
    checkpoint = args.output / "checkpoint"
    if args.resume:
        if not (checkpoint / "state.json").is_file():
            raise UMOError(f"--resume: no checkpoint in '{checkpoint}'")
        set_peft_model_state_dict(model, load_file(checkpoint / "lora.safetensors"))
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
        rng = torch.load(checkpoint / "rng.pt", weights_only=False)
        generator.set_state(rng["generator"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        state = json.loads((checkpoint / "state.json").read_text())

    def write_checkpoint(folder: Path) -> None:
        save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}, folder / "lora.safetensors")
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        torch.save({"generator": generator.get_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                    "torch": torch.get_rng_state()}, folder / "rng.pt")
        (folder / "state.json").write_text(json.dumps(state))

    def next_sample() -> Sample:
        if state["position"] >= len(state["order"]):  # a new epoch: a new seeded order
            state["order"] = torch.randperm(len(samples), generator=generator).tolist()
            state["position"] = 0
        chosen = samples[state["order"][state["position"]]]
        state["position"] += 1
        return chosen

    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    args.output.mkdir(parents=True, exist_ok=True)
    log = (args.output / "log.jsonl").open("a")
    sigmas = None
    progress = tqdm(range(state["step"], args.steps), initial=state["step"], total=args.steps,
                    disable=not accelerator.is_main_process)
    try:
        for _ in progress:
            chosen = next_sample()
            with torch.no_grad():
                target = encode_images(vae, load_target(chosen.target, args.resolution).to(device))
                reference_images = [float_image(load_image(p)) for p in chosen.references]
                side = reference_long_side(len(reference_images))
                references = [encode_images(vae, resize_reference(r, side)[None].to(device)) for r in reference_images]
                identities = face_model.identities(reference_images)
                embedding = load_file(chosen.text_embedding)
                text = TextEmbedding(embedding["prompt_embeds"][None].to(device),
                                     embedding["pooled_prompt_embeds"][None].to(device))
            if sigmas is None or len(sigmas) != args.sampling_steps + 1:
                sigmas = flux_sigmas(args.sampling_steps, (target.shape[2] // 2) * (target.shape[3] // 2))

            with accelerator.accumulate(transformer):
                # 1. The flow-matching loss on the training sample (guidance fixed at 1).
                t = torch.rand((), generator=generator)
                noise = torch.randn(target.shape, generator=generator).to(device)
                noisy = (1 - t) * target + t * noise
                velocity = predict_velocity(transformer, noisy, t, text, references, guidance=1.0)
                diffusion_loss = torch.nn.functional.mse_loss(velocity, noise - target)

                # 2. ReReFL: roll out without gradient to a step in the window, one step with gradient.
                step = int(torch.randint(args.sampling_steps - args.window, args.sampling_steps, (),
                                         generator=generator))
                start = torch.randn(target.shape, generator=generator).to(device)
                latent = sample(model, start, text, references, args.sampling_steps, guidance=1.0, stop_at=step)
                velocity = predict_velocity(transformer, latent, sigmas[step], text, references, guidance=1.0)
                estimate = latent - sigmas[step] * velocity
                images = decode_latents(vae, estimate)
                reward = identity_reward(images, identities, face_model, kind=args.reward).values.mean()

                loss = args.diffusion_weight * diffusion_loss - reward
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(lora_parameters, args.grad_clip)
                optimizer.step()
                optimizer.zero_grad()

            state["step"] += 1
            record = {"step": state["step"], "loss": loss.item(), "diffusion_loss": diffusion_loss.item(),
                      "reward": reward.item(), "reward_step": step, "row": chosen.row}
            if accelerator.is_main_process:
                log.write(json.dumps(record) + "\n")
                log.flush()
            progress.set_postfix(loss=f"{record['loss']:.4f}", reward=f"{record['reward']:.3f}")
            if accelerator.is_main_process and (state["step"] % args.checkpoint_every == 0 or stop["now"]):
                save_atomically(checkpoint, write_checkpoint)
            if stop["now"]:
                return
    except KeyboardInterrupt:
        if accelerator.is_main_process:
            save_atomically(checkpoint, write_checkpoint)
        raise
    finally:
        log.close()

    if accelerator.is_main_process:
        save_atomically(checkpoint, write_checkpoint)
        lora = {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_lora_file(args.output / "lora_diffusers.safetensors", lora)
        save_lora_file(args.output / "lora_uno.safetensors", diffusers_to_uno(lora),
                       {FORMAT_METADATA_KEY: "uno", BASE_MODEL_METADATA_KEY: "flux1-dev"})
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        (args.output / "training_config.json").write_text(json.dumps(config, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
