"""ReReFL: train a UMO-style LoRA on FLUX with UNO's references and the multi-identity reward.

    accelerate launch -m training.rerefl --data DATA --transformer FLUX/transformer --vae FLUX/vae \
        --faces antelopev2 --output runs/umo           # or plain `python -m training.rerefl ...`

Per step (training/step.py): L = lambda * L_diff - R, where L_diff is the flow-matching loss
on the batch and R the reward of a ReReFL rollout (the UMO paper, arXiv 2509.06818): sample without
gradient from noise to a random step in the last `--window` steps of the schedule, take one step with
gradient, form the one-step clean estimate, decode it with gradient and score it with MIMR (or SIR)
against the references - the same `identity_reward` the nodes use.

    python -m training.rerefl --data DATA --check-data [--faces antelopev2] [--transformer ...]

checks the data folder exactly as training does, without loading FLUX or text encoders: one line per
bad row and a summary; exit status 0 when every row is usable, 2 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from peft import LoraConfig
from peft.utils import set_peft_model_state_dict
from tqdm import tqdm

from umo_core import UMOError
from umo_core.backbones.flux1.loading import (
    check_vae,
    load_flux_lora,
    load_transformer,
    load_vae,
    transformer_text_widths,
)
from umo_core.backbones.lora_formats import (
    BASE_MODEL_METADATA_KEY,
    FORMAT_METADATA_KEY,
    UNO_TARGET_MODULES,
    diffusers_to_uno,
    save_lora_file,
)
from umo_core.faces.face_model import FaceModel
from umo_core.faces.face_pack import FacePack, find_face_pack
from umo_core.faces.matching import REWARDS
from umo_core.faces.metrics import average_metrics, match_metrics
from umo_core.faces.withanyone import ReferenceBank, reference_bank

from .batches import Batch, load_batch
from .buckets import BatchOrder, shape_key
from .checkpoint import (
    CHECKPOINT_FOLDER,
    TrainingState,
    has_checkpoint,
    lora_weights,
    resume,
    save_checkpoint,
    seed_global_rngs,
    trim_log,
)
from .data import Sample, check_dataset, load_dataset, manifest_file
from .evaluation import EVAL_LOG_FILE, evaluate
from .step import DEFAULT_SETTINGS, StepResult, StepSettings, apply_gradients, rerefl_step

DEFAULT_RANK = 512
LOG_FILE = "log.jsonl"  # one JSON record per step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.rerefl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    step = DEFAULT_SETTINGS  # the step's defaults: one home, training/step.py
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
    parser.add_argument("--sampling-steps", type=int, default=step.sampling_steps)
    parser.add_argument("--window", type=int, default=step.window,
                        help="gradient step drawn from the last N sampling steps")
    parser.add_argument("--reward", choices=list(REWARDS), default=step.reward)
    parser.add_argument("--diffusion-weight", type=float, default=step.diffusion_weight,
                        help="lambda in L = lambda * L_diff - R")
    parser.add_argument("--gt-id-weight", type=float, default=step.gt_id_weight,
                        help="WithAnyone's GT-aligned ID loss (0: off)")
    parser.add_argument("--contrastive-weight", type=float, default=step.contrastive_weight,
                        help="WithAnyone's contrastive ID loss against other identities in the data (0: off)")
    parser.add_argument("--contrastive-temperature", type=float, default=step.contrastive_temperature)
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
        raise UMOError("--contrastive-temperature must be above 0 "
                       f"(WithAnyone uses {DEFAULT_SETTINGS.contrastive_temperature})")
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
        if args.resume and not has_checkpoint(args.output):
            raise UMOError(f"--resume: no checkpoint in '{args.output / CHECKPOINT_FOLDER}'")
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
    return lora_adapter(rank), initial


@dataclass
class TrainingData:
    """The checked samples and what the loop derives from them once."""

    samples: list[Sample]
    keys: list[tuple]  # per sample, its shape key (buckets.shape_key): batches take one key
    evaluation_samples: list[Sample]
    evaluation_buckets: list[tuple[int, int]]  # per evaluation sample, its bucket
    bank: ReferenceBank | None  # every reference face of the data, for the contrastive term's negatives


class StopRequest:
    """Ctrl-C and SIGTERM (a scheduler's preemption) finish the current step, then checkpoint and stop."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self.request)
        signal.signal(signal.SIGINT, self.request)

    def request(self, *_) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once

    def agreed(self, accelerator: Accelerator) -> bool:
        """Every process stops at the same step, when any of them was asked to."""
        return accelerator.reduce(torch.tensor(float(self.requested), device=accelerator.device), "sum").item() > 0


def step_settings(args: argparse.Namespace) -> StepSettings:
    return StepSettings(sampling_steps=args.sampling_steps, window=args.window, reward=args.reward,
                        diffusion_weight=args.diffusion_weight, gt_id_weight=args.gt_id_weight,
                        contrastive_weight=args.contrastive_weight,
                        contrastive_temperature=args.contrastive_temperature)


def load_training_data(args: argparse.Namespace, face_model: FaceModel, text_widths: tuple[int, int] | None,
                       accelerator: Accelerator) -> TrainingData:
    """The data check of --data (and --eval-data), before any model is loaded: bad rows are reported first."""
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
    if args.contrastive_weight:
        bank = reference_bank([s.identities.embeddings for s in samples], [s.names for s in samples])
    return TrainingData(samples, keys, evaluation_samples, evaluation_buckets, bank)


def lora_adapter(rank: int) -> LoraConfig:
    """The LoRA the trainer trains: UNO's modules, alpha = rank (the delta is B @ A, as in UNO's layout and the
    files this trainer writes)."""
    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=UNO_TARGET_MODULES)


def attach_lora(transformer, adapter: LoraConfig, gradient_checkpointing: bool) -> list[torch.nn.Parameter]:
    """The trainable LoRA on the frozen transformer; its parameters, in fp32 (LoRA weights train in fp32)."""
    transformer.requires_grad_(False)
    transformer.add_adapter(adapter)
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    parameters = [p for p in transformer.parameters() if p.requires_grad]
    for parameter in parameters:
        parameter.data = parameter.data.float()
    return parameters


def load_models(args: argparse.Namespace, adapter: LoraConfig, initial_lora: dict[str, torch.Tensor] | None,
                device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module, list[torch.nn.Parameter]]:
    """The frozen FLUX transformer with the trainable LoRA (from --init-lora where given), the frozen VAE,
    and the LoRA's parameters."""
    dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
    transformer = load_transformer(args.transformer, dtype).to(device)
    vae = load_vae(args.vae, dtype).to(device)
    vae.requires_grad_(False)
    lora_parameters = attach_lora(transformer, adapter, args.gradient_checkpointing)
    if initial_lora is not None:  # into the fp32 weights: the file's values unrounded
        unexpected = set_peft_model_state_dict(transformer, initial_lora).unexpected_keys
        if unexpected:
            raise UMOError(f"--init-lora '{args.init_lora}' has layers this transformer lacks ({unexpected[:3]}...); "
                           "is it a LoRA for another FLUX depth?")
    return transformer, vae, lora_parameters


def run_evaluation(args: argparse.Namespace, accelerator: Accelerator, step: int, model, vae,
                   face_model: FaceModel, data: TrainingData) -> None:
    """With --eval-every, the evaluation images and report of `step` (main process; the others wait)."""
    if args.eval_every and accelerator.is_main_process:
        batches = [load_batch([s], bucket, vae, accelerator.device)
                   for s, bucket in zip(data.evaluation_samples, data.evaluation_buckets)]
        summary = evaluate(step, model, vae, face_model, batches, args.output, args.seed, args.sampling_steps,
                           args.eval_guidance)
        accelerator.print(f"evaluation at step {step}: " + ", ".join(
            f"{name} {value:.3f}" for name, value in summary.items() if name != "step" and value is not None))
    accelerator.wait_for_everyone()


def log_step(accelerator: Accelerator, output: Path, step: int, batch: Batch, result: StepResult,
             settings: StepSettings) -> dict:
    """The step's record, over all processes, appended to OUTPUT/log.jsonl: the losses, the reward and the
    identity metrics of the decoded estimates."""
    # The reward's own matches: the matching is not done again. Coverage and duplicates show whether the
    # people stay in the picture; MIMR stays the gradient signal.
    metrics = [match_metrics(match, truth.embeddings)
               for match, truth in zip(result.rewards.matches, batch.ground_truth)]
    values = accelerator.reduce(torch.stack([result.loss, result.diffusion_loss, result.reward]).detach(),
                                "mean").tolist()
    record = {"step": step, "loss": values[0], "diffusion_loss": values[1], "reward": values[2],
              "reward_step": result.reward_step, "rows": gather_object(batch.rows),
              **average_metrics(gather_object(metrics))}
    # The mean over the processes where the term ran (it is off at noisy steps); null if none.
    record.update(average_metrics(gather_object([{name: result.id_terms[name].item() if name in result.id_terms
                                                  else None for name in settings.id_term_weights()}])))
    if accelerator.is_main_process:
        with (output / LOG_FILE).open("a") as log:
            log.write(json.dumps(record) + "\n")
    return record


def export_lora(args: argparse.Namespace, model) -> None:
    """The trained LoRA in the diffusers and the UNO layouts, and the run's settings."""
    lora = lora_weights(model)
    save_lora_file(args.output / "lora_diffusers.safetensors", lora)
    save_lora_file(args.output / "lora_uno.safetensors", diffusers_to_uno(lora),
                   {FORMAT_METADATA_KEY: "uno", BASE_MODEL_METADATA_KEY: "flux1-dev"})
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (args.output / "training_config.json").write_text(json.dumps(config, indent=2))


def train(args: argparse.Namespace) -> None:
    # Paths and file headers first (seconds), then the data (minutes on a big set), then the models.
    pack, text_widths = check_paths(args)
    adapter, initial_lora = lora_config(args)
    # Without a GPU, say so: accelerate would otherwise run N unconnected copies under torchrun.
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=not torch.cuda.is_available())
    seed_global_rngs(args.seed)
    face_model = FaceModel(pack, provider=args.provider, backend="torch", device=accelerator.device)
    for note in face_model.notes:
        accelerator.print(f"note: {note}")
    data = load_training_data(args, face_model, text_widths, accelerator)
    transformer, vae, lora_parameters = load_models(args, adapter, initial_lora, accelerator.device)
    optimizer = torch.optim.AdamW(lora_parameters, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    order = BatchOrder(data.keys, args.batch_size, args.seed, accelerator.process_index, accelerator.num_processes)
    state = TrainingState(accelerator.unwrap_model(transformer), optimizer, order,
                          torch.Generator().manual_seed(args.seed + accelerator.process_index))
    start = resume(args.output, accelerator, state) if args.resume else 0
    settings, stop = step_settings(args), StopRequest()
    args.output.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        trim_log(args.output / LOG_FILE, start)
        trim_log(args.output / EVAL_LOG_FILE, start)
    if start == 0:
        run_evaluation(args, accelerator, 0, state.model, vae, face_model, data)  # the untrained starting point
    progress = tqdm(total=args.steps, initial=start, disable=not accelerator.is_main_process)
    for step in range(start + 1, args.steps + 1):
        indices = order.next_batch()
        batch = load_batch([data.samples[i] for i in indices], data.keys[indices[0]][0], vae, accelerator.device)
        result = rerefl_step(transformer, vae, face_model, batch, settings, state.generator,
                             rollout_transformer=state.model, bank=data.bank)
        apply_gradients(accelerator, result.loss, lora_parameters, optimizer, args.grad_clip)
        record = log_step(accelerator, args.output, step, batch, result, settings)
        progress.update()
        progress.set_postfix(loss=f"{record['loss']:.4f}", reward=f"{record['reward']:.3f}",
                             coverage=f"{record['coverage']:.2f}", duplicates=f"{record['duplicates']:.2f}")
        if args.eval_every and step % args.eval_every == 0:
            run_evaluation(args, accelerator, step, state.model, vae, face_model, data)
        stop_now = stop.agreed(accelerator)
        if step % args.checkpoint_every == 0 or stop_now or step == args.steps:
            save_checkpoint(args.output, accelerator, state, step)
        if stop_now:
            accelerator.print(f"stopped at step {step}; continue with --resume")
            return
    progress.close()
    last = max(start, args.steps)
    if args.eval_every and last % args.eval_every:
        run_evaluation(args, accelerator, last, state.model, vae, face_model, data)
    if accelerator.is_main_process:
        export_lora(args, state.model)


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


if __name__ == "__main__":
    raise SystemExit(main())
