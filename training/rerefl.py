"""ReReFL: train a UMO-style LoRA on FLUX with UNO's references and the multi-identity reward.

    accelerate launch -m training.rerefl --data DATA --transformer FLUX/transformer --vae FLUX/vae \
        --faces antelopev2 --output runs/umo           # or plain `python -m training.rerefl ...`

Per step (umo-method.md section 3): L = lambda * L_diff - R, where L_diff is the flow-matching loss
on the batch and R the reward of a ReReFL rollout: sample without gradient from noise to a random
step in the last `--window` steps of the schedule, take one step with gradient, form the one-step
clean estimate, decode it with gradient and score it with MIMR (or SIR) against the references -
the same `identity_reward` the nodes use.

    python -m training.rerefl --data DATA --check-data [--faces antelopev2] [--transformer ...]

checks the data folder exactly as training does, without loading FLUX or text encoders: one line per
bad row and a summary; exit status 0 when every row is usable, 2 otherwise.
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
from accelerate.utils import gather_object
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from umo_core import UMOError, identity_metrics, identity_reward
from umo_core.face_model import FaceModel
from umo_core.face_pack import FacePack, find_face_pack
from umo_core.flux import (
    check_vae,
    decode_latents,
    load_flux_lora,
    load_transformer,
    load_vae,
    predict_velocity,
    sample,
    transformer_text_widths,
)
from umo_core.lora_formats import (
    BASE_MODEL_METADATA_KEY,
    FORMAT_METADATA_KEY,
    UNO_TARGET_MODULES,
    diffusers_to_uno,
    save_lora_file,
)
from umo_core.metrics import average_metrics
from umo_core.uno import clean_estimate, flux_sigmas
from umo_core.withanyone import (
    CONTRASTIVE_TEMPERATURE,
    ID_LOSS_MAX_SIGMA,
    ReferenceBank,
    contrastive_id_loss,
    gt_aligned_embeddings,
    gt_aligned_id_loss,
    negatives_for,
    paired_with_references,
    reference_bank,
)

from .batches import Batch, load_batch
from .buckets import BatchOrder, shape_key
from .data import check_dataset, load_dataset, manifest_file
from .evaluation import evaluate

DEFAULT_RANK = 512
ID_TERM_WEIGHTS = {"gt_id_loss": "gt_id_weight", "contrastive_loss": "contrastive_weight"}  # term -> its flag


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.rerefl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with manifest.jsonl (see README)")
    parser.add_argument("--check-data", action="store_true",
                        help="check --data (and --eval-data) as training would and exit: 0 when clean, 2 with "
                             "problems; needs no --transformer, --vae or --output (a given --transformer sets the "
                             "text-embedding widths to check)")
    parser.add_argument("--transformer", type=Path,
                        help="FLUX transformer: diffusers folder or single .safetensors file (flux1-dev.safetensors)")
    parser.add_argument("--vae", type=Path,
                        help="FLUX autoencoder: diffusers folder or single .safetensors file (ae.safetensors)")
    parser.add_argument("--faces", default="antelopev2", help="face pack name or folder")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rank", type=int, help=f"LoRA rank (default {DEFAULT_RANK}, or the --init-lora file's)")
    parser.add_argument("--init-lora", type=Path, help="start from this UNO-layout (UMO_UNO) or diffusers LoRA")
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--resolution", type=int, default=512,
                        help="targets train at about RESOLUTION^2 pixels in their aspect-ratio bucket")
    parser.add_argument("--batch-size", type=int, default=1, help="samples per process and step")
    parser.add_argument("--sampling-steps", type=int, default=25)
    parser.add_argument("--window", type=int, default=10, help="gradient step drawn from the last N sampling steps")
    parser.add_argument("--reward", choices=("mimr", "sir"), default="mimr")
    parser.add_argument("--diffusion-weight", type=float, default=1.0, help="lambda in L = lambda * L_diff - R")
    parser.add_argument("--gt-id-weight", type=float, default=0.0, help="WithAnyone's GT-aligned ID loss (0: off)")
    parser.add_argument("--contrastive-weight", type=float, default=0.0,
                        help="WithAnyone's contrastive ID loss against other identities in the data (0: off)")
    parser.add_argument("--contrastive-temperature", type=float, default=CONTRASTIVE_TEMPERATURE)
    parser.add_argument("--eval-every", type=int, default=250, help="evaluation images every N steps (0: never)")
    parser.add_argument("--eval-data", type=Path, help="folder with manifest.jsonl for evaluation (default: --data)")
    parser.add_argument("--eval-count", type=int, default=4, help="evaluate the first N rows of the evaluation data")
    parser.add_argument("--eval-guidance", type=float, default=4.0)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="bf16")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--on-bad-rows", choices=("error", "skip"), default="error")
    parser.add_argument("--provider", default="auto", help="onnxruntime provider for face detection")
    args = parser.parse_args(argv)
    missing = [f"--{name}" for name in ("transformer", "vae", "output") if getattr(args, name) is None]
    if missing and not args.check_data:
        parser.error(f"the following arguments are required: {', '.join(missing)} (or give --check-data)")
    return args


def check_args(args: argparse.Namespace) -> None:
    if args.resolution % 16 or args.resolution < 16:
        raise UMOError(f"--resolution {args.resolution} must be a positive multiple of 16")
    if args.contrastive_temperature <= 0:
        raise UMOError(f"--contrastive-temperature must be above 0 (WithAnyone uses {CONTRASTIVE_TEMPERATURE})")
    if not 1 <= args.window <= args.sampling_steps:
        raise UMOError(f"--window {args.window} must be between 1 and --sampling-steps ({args.sampling_steps})")
    for name in ("steps", "batch_size", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise UMOError(f"--{name.replace('_', '-')} must be at least 1")


def check_paths(args: argparse.Namespace) -> tuple[FacePack, tuple[int, int] | None]:
    """Every path given, from its existence and file headers, before the data check (which runs face detection on
    every photo: minutes on a big set). The face pack and the text widths the transformer takes (None without one)."""
    for folder in (args.data, args.eval_data):
        if folder:
            manifest_file(folder)
    text_widths = transformer_text_widths(args.transformer) if args.transformer else None
    if args.vae:
        check_vae(args.vae)
    pack = find_face_pack(args.faces)
    if args.output:
        check_output_folder(args.output)
        if args.resume and not (args.output / "checkpoint" / "state.json").is_file():
            raise UMOError(f"--resume: no checkpoint in '{args.output / 'checkpoint'}'")
    return pack, text_widths


def check_output_folder(output: Path) -> None:
    """--output is a folder that exists and can be written to, or one that can be made."""
    existing = next(folder for folder in (output, *output.parents) if folder.exists())
    if not existing.is_dir():
        raise UMOError(f"--output '{output}': '{existing}' is a file, not a folder; give a folder for the run")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UMOError(f"--output '{output}': '{existing}' is not writable; give a folder you can write to")


def check_data(args: argparse.Namespace) -> int:
    """--check-data: the data check of training, without FLUX or text encoders; prints one line per bad row and
    a summary per folder. 0 when every row is usable, 2 otherwise."""
    pack, text_widths = check_paths(args)
    # Detection (which decides the check) is the same ONNX detector for either embedding backend.
    face_model = FaceModel(pack, provider=args.provider, backend="onnx")
    for note in face_model.notes:  # which pack files were chosen, where there were several
        print(f"note: {note}", file=sys.stderr)
    clean = True
    for what, folder in (("data", args.data), ("evaluation data", args.eval_data)):
        if folder is None:
            continue
        samples, problems = check_dataset(folder, face_model, text_widths)
        for line in problems:
            print(line)
        rows = len(samples) + len(problems)
        if problems or not samples:
            clean = False
            print(f"{what} '{folder}': {rows} rows, {len(problems)} with problems, {len(samples)} usable "
                  "(training stops at these problems; --on-bad-rows skip leaves those rows out)")
        else:
            print(f"{what} '{folder}': {rows} rows, all usable")
    return 0 if clean else 2


def lora_config(args: argparse.Namespace) -> tuple[LoraConfig, dict[str, torch.Tensor] | None]:
    """The adapter to train and, with --init-lora, the weights it starts from (its rank is the file's)."""
    initial, rank = None, args.rank or DEFAULT_RANK
    if args.init_lora:
        initial = load_flux_lora(args.init_lora)
        ranks = {tensor.shape[0] for key, tensor in initial.items() if ".lora_A." in key}
        if len(ranks) != 1:
            raise UMOError(f"--init-lora '{args.init_lora}' has modules of different ranks {sorted(ranks)}; "
                           "the trainer needs one rank")
        rank = ranks.pop()
        if args.rank and args.rank != rank:
            raise UMOError(f"--rank {args.rank} differs from the rank {rank} of --init-lora '{args.init_lora}'; "
                           "leave --rank out to continue at the file's rank")
    # alpha = rank: the delta is B @ A, as in UNO's layout and the files this trainer writes.
    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=UNO_TARGET_MODULES), initial


def withanyone_terms(args: argparse.Namespace, vae, face_model, batch: Batch, noisy: torch.Tensor,
                     velocity: torch.Tensor, t: torch.Tensor, bank: ReferenceBank | None) -> dict[str, torch.Tensor]:
    """WithAnyone's ID losses on the flow-matching branch's clean estimate.

    That estimate keeps the target photo's layout (it is denoised from the noised target), so the
    target's face keypoints locate its faces: nothing is detected on the estimate. Samples noisier
    than ID_LOSS_MAX_SIGMA take no part, as in WithAnyone.
    """
    kept = [i for i in range(len(t)) if t[i] <= ID_LOSS_MAX_SIGMA]
    if not kept:
        return {}
    images = decode_latents(vae, clean_estimate(noisy[kept], velocity[kept], t[kept]))
    truths = [batch.ground_truth[i] for i in kept]
    terms = {}
    if args.gt_id_weight:
        terms["gt_id_loss"] = gt_aligned_id_loss(images, truths, face_model)
    if args.contrastive_weight:
        losses = []
        for faces, i in zip(gt_aligned_embeddings(images, truths, face_model), kept):
            references = batch.identities[i].embeddings
            generated, positives = paired_with_references(faces, references)
            negatives = negatives_for(bank, references, batch.names[i])
            losses.append(contrastive_id_loss(generated, positives, negatives, args.contrastive_temperature))
        terms["contrastive_loss"] = torch.stack(losses).mean()
    return terms


def swap_in(temporary: Path, folder: Path) -> None:
    """Replace `folder` by the complete `temporary`: a crash never leaves a half-written checkpoint."""
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(temporary, folder)
    shutil.rmtree(old, ignore_errors=True)


def trim_log(path: Path, step: int) -> None:
    """Drop the records after `step` (written after the checkpoint a resume continues from)."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        if args.check_data:
            return check_data(args)
        train(args)
    except UMOError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def train(args: argparse.Namespace) -> None:
    # Paths and file headers first (seconds), then the data (minutes on a big set), then the models.
    pack, text_widths = check_paths(args)
    adapter, initial_lora = lora_config(args)
    # Without a GPU, say so: accelerate would otherwise run N unconnected copies under torchrun.
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=not torch.cuda.is_available())
    # Seeds everything drawn outside our own generators (the LoRA's initialisation among them).
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = accelerator.device
    dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32

    # Data before the models: bad rows are reported before any model is loaded.
    face_model = FaceModel(pack, provider=args.provider, backend="torch", device=device)
    for note in face_model.notes:
        accelerator.print(f"note: {note}")
    samples, skipped = load_dataset(args.data, face_model, args.on_bad_rows, text_widths)
    for line in skipped:
        accelerator.print(f"skipped {line}")
    evaluation_samples = samples
    if args.eval_data and args.eval_every:
        evaluation_samples, skipped = load_dataset(args.eval_data, face_model, args.on_bad_rows, text_widths)
        for line in skipped:
            accelerator.print(f"skipped evaluation {line}")
    evaluation_samples = evaluation_samples[:args.eval_count]
    keys = [shape_key(s.target, s.references, s.text_embedding, args.resolution) for s in samples]
    evaluation_buckets = [shape_key(s.target, s.references, s.text_embedding, args.resolution)[0]
                          for s in evaluation_samples]
    bank = None
    if args.contrastive_weight:  # every reference face of the data, for the negatives
        bank = reference_bank([s.reference_embeddings for s in samples], [s.identities for s in samples])
    order = BatchOrder(keys, args.batch_size, args.seed, accelerator.process_index, accelerator.num_processes)

    # Models: the frozen FLUX transformer with a trainable LoRA, the frozen VAE and face networks.
    transformer = load_transformer(args.transformer, dtype).to(device).requires_grad_(False)
    vae = load_vae(args.vae, dtype).to(device)
    vae.requires_grad_(False)
    transformer.add_adapter(adapter)
    if initial_lora is not None:
        unexpected = set_peft_model_state_dict(transformer, initial_lora).unexpected_keys
        if unexpected:
            raise UMOError(f"--init-lora '{args.init_lora}' has layers this transformer lacks ({unexpected[:3]}...); "
                           "is it a LoRA for another FLUX depth?")
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    lora_parameters = [p for p in transformer.parameters() if p.requires_grad]
    for parameter in lora_parameters:
        parameter.data = parameter.data.float()  # LoRA weights train in fp32
    optimizer = torch.optim.AdamW(lora_parameters, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    model = accelerator.unwrap_model(transformer)

    # State that a resume restores exactly: weights, optimizer, data position and every RNG.
    generator = torch.Generator().manual_seed(args.seed + accelerator.process_index)
    step = 0
    checkpoint = args.output / "checkpoint"
    if args.resume:
        state = json.loads((checkpoint / "state.json").read_text())
        if state["processes"] != accelerator.num_processes:
            raise UMOError(f"--resume: the checkpoint was written by {state['processes']} processes; "
                           f"resume with the same number (now {accelerator.num_processes})")
        set_peft_model_state_dict(model, load_file(checkpoint / "lora.safetensors"))
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
        rng = torch.load(checkpoint / f"rng_{accelerator.process_index}.pt", weights_only=False)
        generator.set_state(rng["generator"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        order.load_state_dict(state["order"])
        step = state["step"]

    def save_checkpoint() -> None:
        temporary = checkpoint.with_name(checkpoint.name + ".tmp")
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        accelerator.wait_for_everyone()
        torch.save({"generator": generator.get_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                    "torch": torch.get_rng_state()}, temporary / f"rng_{accelerator.process_index}.pt")
        if accelerator.is_main_process:  # the LoRA and the optimizer are the same on every process
            lora = {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
            save_file(lora, temporary / "lora.safetensors")
            torch.save(optimizer.state_dict(), temporary / "optimizer.pt")
            (temporary / "state.json").write_text(json.dumps(
                {"step": step, "order": order.state_dict(), "processes": accelerator.num_processes}))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            swap_in(temporary, checkpoint)
        accelerator.wait_for_everyone()

    def run_evaluation() -> None:
        if args.eval_every and accelerator.is_main_process:
            batches = [load_batch([s], bucket, vae, face_model, device)
                       for s, bucket in zip(evaluation_samples, evaluation_buckets)]
            summary = evaluate(step, model, vae, face_model, batches, args.output, args.seed, args.sampling_steps,
                               args.eval_guidance)
            accelerator.print(f"evaluation at step {step}: " + ", ".join(
                f"{name} {value:.3f}" for name, value in summary.items() if name != "step" and value is not None))
        accelerator.wait_for_everyone()

    # Ctrl-C and SIGTERM (a scheduler's preemption) finish the current step, then checkpoint and stop.
    stop = {"now": False}

    def request_stop(*_) -> None:
        stop["now"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    args.output.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        trim_log(args.output / "log.jsonl", step)
        trim_log(args.output / "eval.jsonl", step)
    if step == 0:
        run_evaluation()  # the starting point, to compare the trained LoRA against
    progress = tqdm(total=args.steps, initial=step, disable=not accelerator.is_main_process)
    while step < args.steps:
        indices = order.next_batch()
        batch = load_batch([samples[i] for i in indices], keys[indices[0]][0], vae, face_model, device)
        sigmas = flux_sigmas(args.sampling_steps, (batch.target.shape[2] // 2) * (batch.target.shape[3] // 2))

        # 1. The flow-matching loss on the training batch (guidance fixed at 1).
        shape = batch.target.shape
        t = torch.rand((shape[0], 1, 1, 1), generator=generator).to(device)
        noise = torch.randn(shape, generator=generator).to(device)
        noisy = (1 - t) * batch.target + t * noise
        velocity = predict_velocity(transformer, noisy, t.flatten(), batch.text, batch.references, guidance=1.0)
        diffusion_loss = torch.nn.functional.mse_loss(velocity, noise - batch.target)
        id_terms = {}
        if args.gt_id_weight or args.contrastive_weight:
            id_terms = withanyone_terms(args, vae, face_model, batch, noisy, velocity, t, bank)

        # 2. ReReFL: roll out without gradient to a step in the window, one step with gradient.
        reward_step = int(torch.randint(args.sampling_steps - args.window, args.sampling_steps, (),
                                        generator=generator))
        start = torch.randn(shape, generator=generator).to(device)
        latent = sample(model, start, batch.text, batch.references, args.sampling_steps, guidance=1.0,
                        stop_at=reward_step)
        sigma = sigmas[reward_step]
        velocity = predict_velocity(transformer, latent, sigma, batch.text, batch.references, guidance=1.0)
        images = decode_latents(vae, clean_estimate(latent, velocity, sigma))
        results = [identity_reward(images[i:i + 1], batch.identities[i], face_model, kind=args.reward)
                   for i in range(shape[0])]
        reward = torch.cat([r.values for r in results]).mean()

        loss = args.diffusion_weight * diffusion_loss - reward
        for name, weight in ID_TERM_WEIGHTS.items():
            if name in id_terms:
                loss = loss + getattr(args, weight) * id_terms[name]
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(lora_parameters, args.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
        step += 1

        # The log: losses and the identity metrics of the decoded estimates, over all processes.
        metrics = [identity_metrics(batch.identities[i].embeddings, r.embeddings[0].detach().cpu(),
                                    batch.ground_truth[i].embeddings)["metrics"] for i, r in enumerate(results)]
        metrics = average_metrics(gather_object(metrics))
        values = accelerator.reduce(torch.stack([loss, diffusion_loss, reward]).detach(), "mean").tolist()
        record = {"step": step, "loss": values[0], "diffusion_loss": values[1], "reward": values[2],
                  "reward_step": reward_step, "rows": gather_object(batch.rows), **metrics}
        active = [name for name, weight in ID_TERM_WEIGHTS.items() if getattr(args, weight)]
        # The mean over the processes where the term ran (it is off at noisy steps); null if none.
        record.update(average_metrics(gather_object([{name: id_terms[name].item() if name in id_terms else None
                                                      for name in active}])))
        if accelerator.is_main_process:
            with (args.output / "log.jsonl").open("a") as log:
                log.write(json.dumps(record) + "\n")
        progress.update()
        progress.set_postfix(loss=f"{record['loss']:.4f}", reward=f"{record['reward']:.3f}")

        if args.eval_every and step % args.eval_every == 0:
            run_evaluation()
        # Every process stops at the same step, when any of them was asked to.
        stop_now = accelerator.reduce(torch.tensor(float(stop["now"]), device=device), "sum").item() > 0
        if step % args.checkpoint_every == 0 or stop_now or step == args.steps:
            save_checkpoint()
        if stop_now:
            accelerator.print(f"stopped at step {step}; continue with --resume")
            return
    progress.close()
    if args.eval_every and step % args.eval_every:
        run_evaluation()

    if accelerator.is_main_process:
        lora = {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_lora_file(args.output / "lora_diffusers.safetensors", lora)
        save_lora_file(args.output / "lora_uno.safetensors", diffusers_to_uno(lora),
                       {FORMAT_METADATA_KEY: "uno", BASE_MODEL_METADATA_KEY: "flux1-dev"})
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        (args.output / "training_config.json").write_text(json.dumps(config, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
