"""The trainer's checkpoint, OUTPUT/checkpoint: what a resume needs to continue exactly where it stopped.

    lora.safetensors   the LoRA's weights (peft keys)          optimizer.pt   AdamW's state
    state.json         step, data order position, processes    rng_<rank>.pt  every RNG of process <rank>

The LoRA and the optimizer are the same on every process and written once; each process writes its
own RNG states. A checkpoint is written into a temporary folder and swapped in whole, so a crash
never leaves a half-written one. `read_checkpoint` checks one from its files' headers before any model loads.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from umo_core.errors import UMOError
from umo_core.files import save_tensors

from .buckets import BatchOrder

CHECKPOINT_FOLDER = "checkpoint"
STATE_FILE = "state.json"
LORA_FILE = "lora.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


def rng_file(process: int) -> str:
    return f"rng_{process}.pt"


@dataclass(frozen=True)
class SavedCheckpoint:
    """What a checkpoint's headers say: the step it was written after, by how many processes, at which rank."""

    step: int
    processes: int
    rank: int


@dataclass
class TrainingState:
    """What a resume restores: the LoRA, the optimizer, the data position and this process's generator."""

    model: torch.nn.Module  # the transformer with its peft adapter, unwrapped
    optimizer: torch.optim.Optimizer
    order: BatchOrder
    generator: torch.Generator  # the step's draws (see training.step.rerefl_step)


def read_checkpoint(output: Path) -> SavedCheckpoint:
    """The checkpoint in `output`, checked for --resume from its state and its files' headers (seconds, before any
    model loads): a missing, truncated or foreign file is one UMOError naming it."""
    folder = output / CHECKPOINT_FOLDER
    if not (folder / STATE_FILE).is_file():
        raise UMOError(f"--resume: no checkpoint in '{folder}'; leave --resume out to start the run")

    def damaged(name: str, why: str) -> UMOError:
        return UMOError(f"--resume: '{folder / name}' {why}; the checkpoint is damaged: restore the folder from a "
                        "copy, or start again without --resume")

    try:
        saved = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise damaged(STATE_FILE, "is not the trainer's JSON") from None
    order = saved.get("order") if isinstance(saved, dict) else None
    numbers = [saved.get(name) if isinstance(saved, dict) else None for name in ("step", "processes")]
    if (not all(type(n) is int and n >= 0 for n in numbers) or numbers[1] == 0 or not isinstance(order, dict)
            or not all(type(order.get(name)) is int for name in ("epoch", "position"))):
        raise damaged(STATE_FILE, "lacks the step, the data order or the number of processes")
    step, processes = numbers
    for name in (LORA_FILE, OPTIMIZER_FILE, *(rng_file(process) for process in range(processes))):
        if not (folder / name).is_file():
            raise damaged(name, "is missing")
    try:
        with safe_open(folder / LORA_FILE, "pt") as lora:
            ranks = {lora.get_slice(key).get_shape()[0] for key in lora.keys() if ".lora_A." in key}
    except (SafetensorError, OSError) as error:
        raise damaged(LORA_FILE, f"cannot be read ({error})") from None
    if len(ranks) != 1:
        raise damaged(LORA_FILE, "holds no LoRA of one rank")
    for name in (OPTIMIZER_FILE, *(rng_file(process) for process in range(processes))):
        if not zipfile.is_zipfile(folder / name):  # what torch.save writes; a truncated one lacks its directory
            raise damaged(name, "is not a whole file of torch.save")
    return SavedCheckpoint(step, processes, ranks.pop())


def lora_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights by their peft keys, ready to be written to a .safetensors file."""
    return {key: value.contiguous() for key, value in get_peft_model_state_dict(model).items()}


def seed_global_rngs(seed: int) -> None:
    """Seeds the RNGs drawn from outside the trainer's own generator (the LoRA's initialisation among them);
    a checkpoint saves each of them."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states(generator: torch.Generator) -> dict:
    return {"generator": generator.get_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state()}


def restore_rng_states(states: dict, generator: torch.Generator) -> None:
    generator.set_state(states["generator"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


def swap_in(temporary: Path, folder: Path) -> None:
    """Replace `folder` by the complete `temporary`: a crash never leaves a half-written checkpoint."""
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(temporary, folder)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(output: Path, accelerator: Accelerator, state: TrainingState, step: int) -> None:
    """Every process calls it (it waits for all of them between the stages)."""
    folder = output / CHECKPOINT_FOLDER
    temporary = folder.with_name(folder.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_states(state.generator), temporary / rng_file(accelerator.process_index))
    if accelerator.is_main_process:
        save_tensors(temporary / LORA_FILE, lora_weights(state.model))
        torch.save(state.optimizer.state_dict(), temporary / OPTIMIZER_FILE)
        (temporary / STATE_FILE).write_text(json.dumps(
            {"step": step, "order": state.order.state_dict(), "processes": accelerator.num_processes}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        swap_in(temporary, folder)
    accelerator.wait_for_everyone()


def check_processes(saved: SavedCheckpoint, accelerator: Accelerator) -> None:
    if saved.processes != accelerator.num_processes:
        raise UMOError(f"--resume: the checkpoint was written by {saved.processes} processes; "
                       f"resume with the same number (now {accelerator.num_processes})")


def resume(output: Path, accelerator: Accelerator, state: TrainingState) -> int:
    """Restore `state` from the checkpoint in `output` (checked by `read_checkpoint` and `check_processes`);
    the step it was written after."""
    folder = output / CHECKPOINT_FOLDER
    saved = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    set_peft_model_state_dict(state.model, load_file(folder / LORA_FILE))
    state.optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, weights_only=True))
    # The Python and NumPy states are not plain tensors: this file is the process's own, never downloaded.
    restore_rng_states(torch.load(folder / rng_file(accelerator.process_index), weights_only=False),
                       state.generator)
    state.order.load_state_dict(saved["order"])
    return saved["step"]


def trim_log(path: Path, step: int) -> None:
    """Drop the records after `step` (written after the checkpoint a resume continues from)."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))
