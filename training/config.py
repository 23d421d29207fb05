"""The trainer's settings: one frozen `TrainConfig`, built once from the command line and checked there.

Every value's range is checked when the config is made, before any file or model is opened; the trainer's
helpers take the config (and the step its `StepSettings`), and `training_config.json` beside the LoRA is
`config_json` of it. The field defaults are the command line's defaults, except that the sampling steps (and the
window they bound) and the evaluation's guidance default to the model's (`Backbone.sampling_defaults` of
--transformer: FLUX.2's variant decides them).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from umo_core.arguments import MAX_SEED, above, at_least, check_seed
from umo_core.backbones import DEFAULT as DEFAULT_BACKBONE
from umo_core.backbones import TRAINABLE, get
from umo_core.console import HelpFormatter
from umo_core.errors import UMOError
from umo_core.faces.face_pack import FACE_PACK_ENV, PROVIDER_CHOICES, default_face_pack
from umo_core.faces.matching import REWARDS

from .base_weights import BASE_DTYPES
from .step import DEFAULT_SETTINGS, StepSettings

DEFAULT_RANK = 512
MIXED_PRECISION = ("no", "bf16")
ON_BAD_ROWS = ("error", "skip")


@dataclass(frozen=True)
class TrainConfig:
    """One training run (or one --check-data); see `parse_config` for what each field means."""

    data: Path
    backbone: str = DEFAULT_BACKBONE  # a name in umo_core.backbones.TRAINABLE
    transformer: Path | None = None
    vae: Path | None = None
    output: Path | None = None
    check_data: bool = False
    faces: str = field(default_factory=default_face_pack)
    provider: str = "auto"
    steps: int = 1000
    rank: int | None = None  # None: DEFAULT_RANK, or the rank of --init-lora or of the checkpoint resumed
    init_lora: Path | None = None
    lr: float = 5e-6
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # inf: no clipping
    resolution: int = 512
    batch_size: int = 1
    step: StepSettings = DEFAULT_SETTINGS
    eval_every: int = 250  # 0: never
    eval_data: Path | None = None
    eval_count: int = 4
    eval_guidance: float = 4.0
    checkpoint_every: int = 100
    resume: bool = False
    seed: int = 0
    mixed_precision: str = "bf16"
    base_dtype: str = "auto"  # a name in base_weights.BASE_DTYPES: int8 stores the frozen base's Linear weights in int8
    gradient_checkpointing: bool = False
    on_bad_rows: str = "error"

    def __post_init__(self) -> None:
        at_least("--steps", self.steps, 1)
        if self.rank is not None:
            at_least("--rank", self.rank, 1, f"; leave --rank out for {DEFAULT_RANK} (or the rank of --init-lora's "
                                              "file or of the checkpoint resumed)")
        at_least("--lr", self.lr, 0, f" (AdamW's learning rate; default {default('lr')})")
        at_least("--weight-decay", self.weight_decay, 0, f" (default {default('weight_decay')})")
        above("--grad-clip", self.grad_clip, 0, " (the largest gradient norm kept; give inf to turn clipping off, "
                                                f"default {default('grad_clip')})", infinity=True)
        if self.resolution % 16 or self.resolution < 16:
            raise UMOError(f"--resolution {self.resolution} must be a positive multiple of 16")
        at_least("--batch-size", self.batch_size, 1)
        check_step_settings(self.step)
        at_least("--eval-every", self.eval_every, 0, " (0: no evaluation)")
        at_least("--eval-count", self.eval_count, 1, " (the first N rows are evaluated; --eval-every 0 turns "
                                                     "evaluation off)")
        at_least("--eval-guidance", self.eval_guidance, 0)
        at_least("--checkpoint-every", self.checkpoint_every, 1)
        check_seed("--seed", self.seed)
        for flag, value, choices in (("--backbone", self.backbone, TRAINABLE),
                                     ("--mixed-precision", self.mixed_precision, MIXED_PRECISION),
                                     ("--base-dtype", self.base_dtype, BASE_DTYPES),
                                     ("--on-bad-rows", self.on_bad_rows, ON_BAD_ROWS),
                                     ("--provider", self.provider.lower(), PROVIDER_CHOICES)):
            if value not in choices:
                raise UMOError(f"{flag} '{value}' is not one of {', '.join(choices)}")


def check_step_settings(step: StepSettings) -> None:
    """The step's values, named by the trainer's flags; --sampling-steps before the --window it bounds."""
    at_least("--sampling-steps", step.sampling_steps, 1)
    if not 1 <= step.window <= step.sampling_steps:
        raise UMOError(f"--window {step.window} must be between 1 and --sampling-steps ({step.sampling_steps})")
    if step.reward not in REWARDS:
        raise UMOError(f"--reward '{step.reward}' is not one of {', '.join(REWARDS)}")
    at_least("--diffusion-weight", step.diffusion_weight, 0)
    at_least("--gt-id-weight", step.gt_id_weight, 0, " (0: off)")
    at_least("--contrastive-weight", step.contrastive_weight, 0, " (0: off)")
    above("--contrastive-temperature", step.contrastive_temperature, 0,
          f" (WithAnyone uses {DEFAULT_SETTINGS.contrastive_temperature})")


def default(name: str):
    """A TrainConfig field's default: the command line's."""
    value = TrainConfig.__dataclass_fields__[name].default
    assert value is not MISSING, name
    return value


def config_json(config: TrainConfig) -> str:
    """The run's settings as written beside the LoRA (paths as text)."""
    return json.dumps(asdict(config), indent=2, default=str)


def _parser() -> argparse.ArgumentParser:
    from . import rerefl  # its docstring is the command's description

    parser = argparse.ArgumentParser(prog="python -m training.rerefl", description=rerefl.__doc__,
                                     formatter_class=HelpFormatter)
    step = DEFAULT_SETTINGS  # the step's defaults: one home, training/step.py
    parser.add_argument("--data", type=Path, required=True, help="folder with manifest.jsonl (see README)")
    parser.add_argument("--check-data", action="store_true",
                        help="check --data (and --eval-data) as training would and exit: 0 when clean, 2 with "
                             "problems; needs no --transformer, --vae or --output (a given --transformer sets the "
                             "text-embedding widths to check)")
    parser.add_argument("--backbone", choices=TRAINABLE, default=default("backbone"),
                        help="flux1: FLUX.1 with UNO's references (UMO-UNO); flux2: FLUX.2 [klein] or [dev]")
    parser.add_argument("--transformer", type=Path,
                        help="the backbone's transformer: diffusers folder or single .safetensors file "
                             "(flux1-dev.safetensors; flux-2-klein-base-4b.safetensors ...)")
    parser.add_argument("--vae", type=Path,
                        help="the backbone's autoencoder: diffusers folder or single .safetensors file "
                             "(ae.safetensors; flux2-vae.safetensors)")
    parser.add_argument("--faces", default=default_face_pack(),
                        help=f"face pack name or folder (${FACE_PACK_ENV} where set)")
    parser.add_argument("--provider", default=default("provider"),
                        help=f"onnxruntime provider for face detection: {', '.join(PROVIDER_CHOICES)}")
    parser.add_argument("--output", type=Path, help="folder for the run: LoRA files, checkpoint, logs, evaluation")
    parser.add_argument("--steps", type=int, default=default("steps"), help="optimizer steps in all")
    parser.add_argument("--rank", type=int,
                        help=f"LoRA rank (default {DEFAULT_RANK}, or the rank of --init-lora's file or of the "
                             "checkpoint resumed)")
    parser.add_argument("--init-lora", type=Path, help="start from this UNO-layout (UMO_UNO) or diffusers LoRA")
    parser.add_argument("--lr", type=float, default=default("lr"), help="AdamW's learning rate")
    parser.add_argument("--weight-decay", type=float, default=default("weight_decay"), help="AdamW's weight decay")
    parser.add_argument("--grad-clip", type=float, default=default("grad_clip"),
                        help="the gradient norm is clipped to this (above 0; inf: no clipping)")
    parser.add_argument("--resolution", type=int, default=default("resolution"),
                        help="targets train at about RESOLUTION^2 pixels in their aspect-ratio bucket "
                             "(a multiple of 16)")
    parser.add_argument("--batch-size", type=int, default=default("batch_size"), help="samples per process and step")
    parser.add_argument("--sampling-steps", type=int,
                        help="steps of the rollout's (and the evaluation's) sampling schedule (default: the model's, "
                             "as its pipeline samples it: 25 for FLUX.1/UNO; FLUX.2 4 for distilled klein, 50 for "
                             "klein base and dev)")
    parser.add_argument("--window", type=int,
                        help=f"gradient step drawn from the last N sampling steps (default {step.window}, or "
                             "--sampling-steps where fewer)")
    parser.add_argument("--reward", choices=list(REWARDS), default=step.reward, help="the identity reward R")
    parser.add_argument("--diffusion-weight", type=float, default=step.diffusion_weight,
                        help="lambda in L = lambda * L_diff - R")
    parser.add_argument("--gt-id-weight", type=float, default=step.gt_id_weight,
                        help="WithAnyone's GT-aligned ID loss (0: off)")
    parser.add_argument("--contrastive-weight", type=float, default=step.contrastive_weight,
                        help="WithAnyone's contrastive ID loss against other identities in the data (0: off)")
    parser.add_argument("--contrastive-temperature", type=float, default=step.contrastive_temperature,
                        help="temperature of the contrastive ID loss (above 0)")
    parser.add_argument("--eval-every", type=int, default=default("eval_every"),
                        help="evaluation images every N steps (0: never)")
    parser.add_argument("--eval-data", type=Path, help="folder with manifest.jsonl for evaluation (default: --data)")
    parser.add_argument("--eval-count", type=int, default=default("eval_count"),
                        help="evaluate the first N rows of the evaluation data")
    parser.add_argument("--eval-guidance", type=float,
                        help="guidance of the evaluation images (default: the model's: 4 for FLUX.1 and FLUX.2 [dev], "
                             "whose transformers embed it; klein takes none: 1 distilled, 4 base, where it has no "
                             "effect)")
    parser.add_argument("--checkpoint-every", type=int, default=default("checkpoint_every"),
                        help="write OUTPUT/checkpoint every N steps (and at the end, and when stopped)")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint")
    parser.add_argument("--seed", type=int, default=default("seed"), help=f"seed of every random draw (0..{MAX_SEED})")
    parser.add_argument("--mixed-precision", choices=MIXED_PRECISION, default=default("mixed_precision"),
                        help="bf16: the models in bfloat16, the LoRA in float32; no: everything in float32")
    parser.add_argument("--base-dtype", choices=BASE_DTYPES, default=default("base_dtype"),
                        help="the frozen transformer's weights: auto: the --mixed-precision dtype; int8: its Linear "
                             "layers in int8 through torchao (about half of bf16's memory; the LoRA stays fp32; "
                             "pip install \"umo-identity[int8]\")")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in the backward pass (less memory, slower)")
    parser.add_argument("--on-bad-rows", choices=ON_BAD_ROWS, default=default("on_bad_rows"),
                        help="error: stop at rows the data check refuses; skip: leave them out")
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """The command line's config; a bad value is a UMOError naming its flag, a missing path argparse's usage error."""
    parser = _parser()
    args = parser.parse_args(argv)
    missing = [f"--{name}" for name in ("transformer", "vae", "output") if getattr(args, name) is None]
    if missing and not args.check_data:
        parser.error(f"the following arguments are required: {', '.join(missing)} (or give --check-data)")
    values = vars(args)
    # Every value is checked with the FLUX.1 defaults first; then the model's, read from the transformer's file.
    config = _config(values, DEFAULT_SETTINGS.sampling_steps, default("eval_guidance"))
    if config.transformer and None in (values["sampling_steps"], values["window"], values["eval_guidance"]):
        config = _config(values, *get(config.backbone).sampling_defaults(config.transformer))
    return config


def _config(values: dict, sampling_steps: int, eval_guidance: float) -> TrainConfig:
    """The config of the parsed values; --sampling-steps and --eval-guidance, where not given, from these (the
    model's steps and guidance), --window from its default or the sampling steps where fewer."""
    values = dict(values)
    step = {setting.name: values.pop(setting.name) for setting in fields(StepSettings)}
    if step["sampling_steps"] is None:
        step["sampling_steps"] = sampling_steps
    if step["window"] is None:
        step["window"] = min(DEFAULT_SETTINGS.window, step["sampling_steps"])
    if values["eval_guidance"] is None:
        values["eval_guidance"] = eval_guidance
    return TrainConfig(**values, step=StepSettings(**step))
