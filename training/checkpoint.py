"""The trainer's checkpoint, OUTPUT/checkpoint: what a resume needs to continue exactly where it stopped.

    lora.safetensors   the LoRA's weights (peft keys)          optimizer.pt   AdamW's state
    state.json         step, data order position, processes    rng_<rank>.pt  every RNG of process <rank>

The LoRA and the optimizer are the same on every process and written once; each process writes its
own RNG states. A checkpoint is written into a temporary folder and swapped in whole, so a crash
never leaves a half-written one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from umo_core.errors import UMOError

from .buckets import BatchOrder

CHECKPOINT_FOLDER = "checkpoint"
STATE_FILE = "state.json"


@dataclass
class TrainingState:
    """What a resume restores: the LoRA, the optimizer, the data position and this process's generator."""

    model: torch.nn.Module  # the transformer with its peft adapter, unwrapped
    optimizer: torch.optim.Optimizer
    order: BatchOrder
    generator: torch.Generator  # the step's draws (see training.step.rerefl_step)


def has_checkpoint(output: Path) -> bool:
    return (output / CHECKPOINT_FOLDER / STATE_FILE).is_file()


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
    torch.save(rng_states(state.generator), temporary / f"rng_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_file(lora_weights(state.model), temporary / "lora.safetensors")
        torch.save(state.optimizer.state_dict(), temporary / "optimizer.pt")
        (temporary / STATE_FILE).write_text(json.dumps(
            {"step": step, "order": state.order.state_dict(), "processes": accelerator.num_processes}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        swap_in(temporary, folder)
    accelerator.wait_for_everyone()


def resume(output: Path, accelerator: Accelerator, state: TrainingState) -> int:
    """Restore `state` from the checkpoint in `output`; the step it was written after."""
    folder = output / CHECKPOINT_FOLDER
    saved = json.loads((folder / STATE_FILE).read_text())
    if saved["processes"] != accelerator.num_processes:
        raise UMOError(f"--resume: the checkpoint was written by {saved['processes']} processes; "
                       f"resume with the same number (now {accelerator.num_processes})")
    set_peft_model_state_dict(state.model, load_file(folder / "lora.safetensors"))
    state.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    # The Python and NumPy states are not plain tensors: this file is the process's own, never downloaded.
    restore_rng_states(torch.load(folder / f"rng_{accelerator.process_index}.pt", weights_only=False),
                       state.generator)
    state.order.load_state_dict(saved["order"])
    return saved["step"]


def trim_log(path: Path, step: int) -> None:
    """Drop the records after `step` (written after the checkpoint a resume continues from)."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))
