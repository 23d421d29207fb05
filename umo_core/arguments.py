"""The range checks every command's settings share.

Each command builds one frozen settings object from its command line and checks every value there, with these
helpers, before any file or model is opened; a bad value is one `UMOError` naming its flag. (Help texts with
their defaults: umo_core/console.py.)
"""

from __future__ import annotations

import math

import torch

from .errors import UMOError

MAX_SEED = 2**32 - 1  # NumPy's seeds end there (the trainer seeds NumPy too)


def _shown(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def at_least(flag: str, value: float, minimum: float, hint: str = "") -> None:
    """`value` is a number >= `minimum` (NaN and infinity are refused); `hint` says what to give instead."""
    if not (math.isfinite(value) and value >= minimum):
        raise UMOError(f"{flag} {_shown(value)} must be at least {_shown(minimum)}{hint}")


def above(flag: str, value: float, bound: float, hint: str = "", infinity: bool = False) -> None:
    """`value` is a number > `bound` (NaN is refused, infinity too unless `infinity`: "no limit")."""
    if not (value > bound and (infinity or math.isfinite(value))):
        raise UMOError(f"{flag} {_shown(value)} must be above {_shown(bound)}{hint}")


def in_range(flag: str, value: float, low: float, high: float, meaning: str, *, low_open: bool = False,
             high_open: bool = False) -> None:
    """`value` is between `low` and `high` (excluded where open; NaN is refused); `meaning` says what the value is."""
    over_low = value > low if low_open else value >= low
    under_high = value < high if high_open else value <= high
    if not (over_low and under_high):
        bounds = f"{'above' if low_open else 'at least'} {low:g} and {'below' if high_open else 'at most'} {high:g}"
        raise UMOError(f"{flag} {value:g} is out of range: give a value {bounds} ({meaning})")


def finite(flag: str, value: float) -> None:
    if not math.isfinite(value):
        raise UMOError(f"{flag} {_shown(value)} must be a finite number")


def check_seed(flag: str, seed: int, count: int = 1) -> None:
    """`seed` and the `count` - 1 seeds after it are seeds every RNG takes."""
    if not 0 <= seed <= MAX_SEED - (count - 1):
        raise UMOError(f"{flag} {seed} must be between 0 and {MAX_SEED - (count - 1)}")


def check_device(flag: str, name: str) -> None:
    """`name` is a torch device this machine has: cpu, cuda (cuda:N) with a GPU torch can see, or mps."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UMOError(f"{flag} '{name}' is not a device; give cpu or cuda (cuda:N for the Nth GPU)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise UMOError(f"{flag} {name}: torch sees no CUDA GPU here (torch {torch.__version__}, built for CUDA "
                           f"{torch.version.cuda or 'none'}); give {flag} cpu, or install torch for your GPU")
        if device.index is not None and device.index >= count:
            raise UMOError(f"{flag} {name}: torch sees {count} GPU(s), cuda:0 to cuda:{count - 1}; give one of them")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UMOError(f"{flag} mps: Apple's Metal is not available here; give {flag} cpu")
    elif device.type != "cpu":
        raise UMOError(f"{flag} '{name}' is not supported; give cpu or cuda")
