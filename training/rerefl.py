r"""ReReFL: train a UMO-style LoRA on FLUX.1 (UNO's references) or FLUX.2 with the multi-identity reward.

    accelerate launch -m training.rerefl --data DATA --transformer FLUX/transformer --vae FLUX/vae \
        --faces antelopev2 --output runs/umo           # or plain `python -m training.rerefl ...`
    python -m training.rerefl --backbone flux2 --transformer flux-2-klein-base-4b.safetensors \
        --vae flux2-vae.safetensors --data DATA --output runs/klein

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

import json
import os
import signal
import sys
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from peft import LoraConfig
from peft.utils import set_peft_model_state_dict
from tqdm import tqdm

from umo_core import UMOError
from umo_core.backbones import get
from umo_core.backbones.flow import needs_negative_prompt
from umo_core.backbones.lora_formats import save_lora_file
from umo_core.backbones.text_embedding import check_negative
from umo_core.console import STOP_SIGNALS, command_status, exit_program, raise_stopped, signal_reason
from umo_core.faces.face_model import FaceModel
from umo_core.faces.face_pack import FacePack, find_face_pack
from umo_core.faces.metrics import average_metrics, match_metrics
from umo_core.faces.withanyone import ReferenceBank, reference_bank
from umo_core.files import atomic_path, check_folder_lock, folder_lock

from .base_weights import check_int8_support, quantize_linear_layers
from .batches import Batch, load_batch
from .buckets import BatchOrder, shape_key
from .checkpoint import (
    CHECKPOINT_FOLDER,
    SavedCheckpoint,
    TrainingState,
    check_processes,
    lora_weights,
    read_checkpoint,
    resume,
    save_checkpoint,
    seed_global_rngs,
    trim_log,
)
from .config import DEFAULT_RANK, TrainConfig, config_json, parse_config
from .data import Sample, check_dataset, load_dataset, manifest_file
from .evaluation import EVAL_LOG_FILE, evaluate
from .step import StepResult, StepSettings, apply_gradients, rerefl_step

COMMAND = "training.rerefl"  # as the lock names the run
LOG_FILE = "log.jsonl"  # one JSON record per step
CONFIG_FILE = "training_config.json"  # the run's TrainConfig, beside the LoRA


def check_paths(config: TrainConfig) -> tuple[FacePack, tuple[int, int] | None, SavedCheckpoint | None]:
    """Every path given, from its existence and file headers, before the data check (which runs face detection on
    every photo: minutes on a big set). The face pack, the text widths the transformer takes (None without one)
    and, with --resume, the checkpoint to continue from."""
    for folder in (config.data, config.eval_data):
        if folder:
            manifest_file(folder)
    if config.init_lora and not config.init_lora.is_file():
        raise UMOError(f"--init-lora '{config.init_lora}' is not a file; give the path of a UNO-layout (UMO_UNO) "
                       "or diffusers FLUX LoRA .safetensors")
    backbone = get(config.backbone)
    text_widths = backbone.transformer_text_widths(config.transformer) if config.transformer else None
    if config.base_dtype == "int8" and not config.check_data:
        check_int8_support()
    if config.vae:
        backbone.check_vae(config.vae)
    pack = find_face_pack(config.faces)
    saved = None
    if config.output:
        check_output_folder(config.output)
        if not config.check_data:  # which writes nothing there
            check_folder_lock(config.output, "--output")
        if config.resume:
            saved = read_checkpoint(config.output)
            if saved.step >= config.steps:
                raise UMOError(f"--resume: the checkpoint in '{config.output / CHECKPOINT_FOLDER}' is at step "
                               f"{saved.step}, so --steps {config.steps} leaves nothing to train; give --steps "
                               f"above {saved.step}")
    return pack, text_widths, saved


def check_output_folder(output: Path) -> None:
    """--output is a folder that exists and can be written to, or one that can be made."""
    existing = next(folder for folder in (output, *output.parents) if folder.exists())
    if not existing.is_dir():
        raise UMOError(f"--output '{output}': '{existing}' is a file, not a folder; give a folder for the run")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UMOError(f"--output '{output}': '{existing}' is not writable; give a folder you can write to")


def check_data(config: TrainConfig) -> int:
    """--check-data: the data check of training, without FLUX or text encoders; prints one line per bad row and
    a summary per folder. 0 when every row is usable, 2 otherwise."""
    pack, text_widths, _ = check_paths(config)
    # Detection (which decides the check) is the same ONNX detector for either embedding backend.
    face_model = FaceModel(pack, provider=config.provider, backend="onnx")
    for note in face_model.notes:  # which pack files were chosen, where there were several
        print(f"note: {note}", file=sys.stderr)
    clean = True
    for what, folder in (("data", config.data), ("evaluation data", config.eval_data)):
        if folder is None:
            continue
        samples, problems = check_dataset(folder, face_model, text_widths, get(config.backbone))
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


def lora_config(config: TrainConfig,
                saved: SavedCheckpoint | None) -> tuple[LoraConfig, dict[str, torch.Tensor] | None]:
    """The adapter to train and, with --init-lora, the weights it starts from. Its rank is --rank's, --init-lora's
    file's or the resumed checkpoint's (which must agree), else DEFAULT_RANK."""
    initial, ranks = None, []  # (where a rank comes from, that rank)
    if config.rank:
        ranks.append((f"--rank {config.rank}", config.rank))
    if config.init_lora:
        initial = get(config.backbone).load_lora(config.init_lora)
        found = {tensor.shape[0] for key, tensor in initial.items() if ".lora_A." in key}
        if len(found) != 1:
            raise UMOError(f"--init-lora '{config.init_lora}' has modules of different ranks {sorted(found)}; "
                           "the trainer needs one rank")
        rank = found.pop()
        ranks.append((f"the rank {rank} of --init-lora '{config.init_lora}'", rank))
    if saved:
        ranks.append((f"the rank {saved.rank} of the checkpoint in '{config.output / CHECKPOINT_FOLDER}'",
                      saved.rank))
    if not ranks:
        return lora_adapter(DEFAULT_RANK, get(config.backbone).lora_target_modules), initial
    (first, rank), *others = ranks
    for other, other_rank in others:
        if other_rank != rank:
            hint = ("leave --rank out to continue at the file's rank" if config.rank else
                    "leave --init-lora out with --resume: the checkpoint holds the LoRA")
            raise UMOError(f"{first} differs from {other}; {hint}")
    return lora_adapter(rank, get(config.backbone).lora_target_modules), initial


@dataclass
class TrainingData:
    """The checked samples and what the loop derives from them once."""

    samples: list[Sample]
    keys: list[tuple]  # per sample, its shape key (buckets.shape_key): batches take one key
    evaluation_samples: list[Sample]
    evaluation_buckets: list[tuple[int, int]]  # per evaluation sample, its bucket
    bank: ReferenceBank | None  # every reference face of the data, for the contrastive term's negatives


class StopRequest:
    """Ctrl-C and SIGTERM (a scheduler's preemption) finish the current step, then checkpoint and stop with the
    shell's status for the signal (130, 143): a scheduler must not take the stopped run for a finished one.
    (Outside the step loop they stop at once: console.command_status.)"""

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        for number in STOP_SIGNALS:
            signal.signal(number, self.request)

    def request(self, number: int, _frame) -> None:
        self.signal = signal.Signals(number)
        for other in STOP_SIGNALS:  # a second Ctrl-C or SIGTERM stops at once
            signal.signal(other, raise_stopped)

    def agreed(self, accelerator: Accelerator) -> bool:
        """Every process stops at the same step, when any of them was asked to."""
        asked = float(self.signal is not None)
        return accelerator.reduce(torch.tensor(asked, device=accelerator.device), "sum").item() > 0

    def exit_status(self) -> int:
        """128 + the signal's number (SIGTERM where another process was asked)."""
        return 128 + (self.signal or signal.SIGTERM)

    def reason(self) -> str:
        return "another process's signal" if self.signal is None else signal_reason(self.signal)


def load_training_data(config: TrainConfig, face_model: FaceModel, text_widths: tuple[int, int] | None,
                       accelerator: Accelerator) -> TrainingData:
    """The data check of --data (and --eval-data), before any model is loaded: bad rows are reported first."""
    backbone = get(config.backbone)
    samples, skipped = load_dataset(config.data, face_model, config.on_bad_rows, text_widths, backbone)
    for line in skipped:
        accelerator.print(f"skipped {line}")
    evaluation_samples = samples
    if config.eval_data and config.eval_every:
        evaluation_samples, skipped = load_dataset(config.eval_data, face_model, config.on_bad_rows, text_widths,
                                                   backbone)
        for line in skipped:
            accelerator.print(f"skipped evaluation {line}")
    evaluation_samples = evaluation_samples[:config.eval_count]
    if config.eval_every and needs_negative_prompt(backbone, config.transformer, config.eval_guidance):
        for sample in evaluation_samples:
            check_negative(sample.text_embedding, f"evaluation text embedding '{sample.text_embedding}'",
                           f"run python -m training.encode_prompts --backbone {backbone.name} on the data folder "
                           "again (it encodes the files that lack it), or give --eval-guidance 1")
    keys = [shape_key(backbone, s.target, s.references, s.text_embedding, config.resolution) for s in samples]
    evaluation_buckets = [shape_key(backbone, s.target, s.references, s.text_embedding, config.resolution)[0]
                          for s in evaluation_samples]
    bank = None
    if config.step.contrastive_weight:
        bank = reference_bank([s.identities.embeddings for s in samples], [s.names for s in samples])
    return TrainingData(samples, keys, evaluation_samples, evaluation_buckets, bank)


def lora_adapter(rank: int, target_modules: str) -> LoraConfig:
    """The LoRA the trainer trains: UNO's modules, alpha = rank (the delta is B @ A, as in UNO's layout and the
    files this trainer writes)."""
    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=target_modules)


def attach_lora(transformer, adapter: LoraConfig, gradient_checkpointing: bool) -> list[torch.nn.Parameter]:
    """The trainable LoRA on the frozen transformer; its parameters, in fp32 (LoRA weights train in fp32)."""
    transformer.requires_grad_(False)
    with warnings.catch_warnings():
        # peft warns, once per int8 layer (--base-dtype int8), that it cannot merge the LoRA into the int8 weights;
        # the trainer never merges (its files hold the LoRA alone).
        warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
        transformer.add_adapter(adapter)
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    parameters = [p for p in transformer.parameters() if p.requires_grad]
    for parameter in parameters:
        parameter.data = parameter.data.float()
    return parameters


def load_models(config: TrainConfig, adapter: LoraConfig, initial_lora: dict[str, torch.Tensor] | None,
                device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module, list[torch.nn.Parameter]]:
    """The frozen FLUX transformer with the trainable LoRA (from --init-lora where given), the frozen VAE,
    and the LoRA's parameters."""
    dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32
    backbone = get(config.backbone)
    transformer = backbone.load_transformer(config.transformer, dtype)
    if config.base_dtype == "int8":  # on the CPU, before the move: the device never holds the unquantized weights
        quantize_linear_layers(transformer)
    transformer = transformer.to(device)
    vae = backbone.load_vae(config.vae, dtype).to(device)
    vae.requires_grad_(False)
    lora_parameters = attach_lora(transformer, adapter, config.gradient_checkpointing)
    if initial_lora is not None:  # into the fp32 weights: the file's values unrounded
        unexpected = set_peft_model_state_dict(transformer, initial_lora).unexpected_keys
        if unexpected:
            raise UMOError(f"--init-lora '{config.init_lora}' has layers this transformer lacks "
                           f"({unexpected[:3]}...); is it a LoRA for another depth or variant?")
    return transformer, vae, lora_parameters


def run_evaluation(config: TrainConfig, accelerator: Accelerator, step: int, model, vae,
                   face_model: FaceModel, data: TrainingData) -> None:
    """With --eval-every, the evaluation images and report of `step` (main process; the others wait)."""
    if config.eval_every and accelerator.is_main_process:
        backbone = get(config.backbone)
        negative = needs_negative_prompt(backbone, config.transformer, config.eval_guidance)
        batches = [load_batch(backbone, [s], bucket, vae, accelerator.device, negative)
                   for s, bucket in zip(data.evaluation_samples, data.evaluation_buckets)]
        summary = evaluate(backbone, step, model, vae, face_model, batches, config.output, config.seed,
                           config.step.sampling_steps, config.eval_guidance)
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


def export_lora(config: TrainConfig, model) -> None:
    """The trained LoRA in the backbone's layouts (peft, and UNO's or ComfyUI's) and the run's settings."""
    for name, (tensors, metadata) in get(config.backbone).lora_files(lora_weights(model)).items():
        save_lora_file(config.output / name, tensors, metadata)
    with atomic_path(config.output / CONFIG_FILE) as temporary:
        temporary.write_text(config_json(config), encoding="utf-8")


def train(config: TrainConfig) -> int:
    """The run; its exit status: 0 when it trained to --steps, 128 + the signal's number when stopped (after the
    checkpoint)."""
    # Paths and file headers first (seconds), then the data (minutes on a big set), then the models.
    pack, text_widths, saved = check_paths(config)
    adapter, initial_lora = lora_config(config, saved)
    # Without a GPU, say so: accelerate would otherwise run N unconnected copies under torchrun.
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
    # One run at a time writes --output: the main process holds its lock (every process looked in check_paths).
    with folder_lock(config.output, "--output", COMMAND) if accelerator.is_main_process else nullcontext():
        return run_training(config, accelerator, pack, text_widths, saved, adapter, initial_lora)


def run_training(config: TrainConfig, accelerator: Accelerator, pack: FacePack, text_widths: tuple[int, int] | None,
                 saved: SavedCheckpoint | None, adapter: LoraConfig,
                 initial_lora: dict[str, torch.Tensor] | None) -> int:
    """train's run, with --output's lock held: the data, the models, the step loop, the LoRA files."""
    backbone = get(config.backbone)
    if saved:
        check_processes(saved, accelerator)
    seed_global_rngs(config.seed)
    face_model = FaceModel(pack, provider=config.provider, backend="torch", device=accelerator.device)
    for note in face_model.notes:
        accelerator.print(f"note: {note}")
    data = load_training_data(config, face_model, text_widths, accelerator)
    transformer, vae, lora_parameters = load_models(config, adapter, initial_lora, accelerator.device)
    optimizer = torch.optim.AdamW(lora_parameters, lr=config.lr, betas=(0.9, 0.999),
                                  weight_decay=config.weight_decay)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    order = BatchOrder(data.keys, config.batch_size, config.seed, accelerator.process_index,
                       accelerator.num_processes)
    state = TrainingState(accelerator.unwrap_model(transformer), optimizer, order,
                          torch.Generator().manual_seed(config.seed + accelerator.process_index))
    start = resume(config.output, accelerator, state) if saved else 0
    stop = StopRequest()
    config.output.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        trim_log(config.output / LOG_FILE, start)
        trim_log(config.output / EVAL_LOG_FILE, start)
    if start == 0:
        run_evaluation(config, accelerator, 0, state.model, vae, face_model, data)  # the untrained starting point
    progress = tqdm(total=config.steps, initial=start, disable=not accelerator.is_main_process)
    for step in range(start + 1, config.steps + 1):
        indices = order.next_batch()
        batch = load_batch(backbone, [data.samples[i] for i in indices], data.keys[indices[0]][0], vae,
                           accelerator.device)
        result = rerefl_step(backbone, transformer, vae, face_model, batch, config.step, state.generator,
                             rollout_transformer=state.model, bank=data.bank)
        apply_gradients(accelerator, result.loss, lora_parameters, optimizer, config.grad_clip)
        record = log_step(accelerator, config.output, step, batch, result, config.step)
        progress.update()
        progress.set_postfix(loss=f"{record['loss']:.4f}", reward=f"{record['reward']:.3f}",
                             coverage=f"{record['coverage']:.2f}", duplicates=f"{record['duplicates']:.2f}")
        if config.eval_every and step % config.eval_every == 0:
            run_evaluation(config, accelerator, step, state.model, vae, face_model, data)
        stop_now = stop.agreed(accelerator)
        if step % config.checkpoint_every == 0 or stop_now or step == config.steps:
            save_checkpoint(config.output, accelerator, state, step)
        if stop_now:
            progress.close()
            if accelerator.is_main_process:
                print(f"stopped at step {step} by {stop.reason()}: checkpoint written to "
                      f"'{config.output / CHECKPOINT_FOLDER}'; continue with --resume", file=sys.stderr)
            return stop.exit_status()
    progress.close()
    if config.eval_every and config.steps % config.eval_every:
        run_evaluation(config, accelerator, config.steps, state.model, vae, face_model, data)
    if accelerator.is_main_process:
        export_lora(config, state.model)
    return 0


def main(argv: list[str] | None = None) -> int:
    def work() -> int:
        config = parse_config(argv)
        return check_data(config) if config.check_data else train(config)

    # Before the step loop, or a second Ctrl-C within a step:
    return command_status(work, "no checkpoint of this step was written; the last checkpoint, if any, is kept "
                                "(continue with --resume)")


if __name__ == "__main__":
    exit_program(main())
