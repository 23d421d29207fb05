"""Model files, read offline and checked before any weight is: diffusers folders (config.json) and single
.safetensors files (their header). Each backbone's loading module names what it expects."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import UMOError


def diffusers_config(path: Path, class_name: str, what: str, expected: str) -> dict:
    """The config.json of a diffusers model folder, checked to be one of `class_name`."""
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise UMOError(f"{what} folder '{path}' has no config.json; give {expected}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UMOError(f"{what} folder '{path}': config.json is not readable JSON ({error}); give {expected}") from None
    if not isinstance(config, dict) or config.get("_class_name", class_name) != class_name:
        found = config.get("_class_name") if isinstance(config, dict) else None
        raise UMOError(f"{what} folder '{path}' holds a {found or 'model of an unknown kind'}, not a {class_name}; "
                       f"give {expected}")
    return config


def from_diffusers_folder(model_class, path: Path, dtype: torch.dtype, what: str, expected: str):
    diffusers_config(path, model_class.__name__, what, expected)
    return model_class.from_pretrained(path, torch_dtype=dtype, local_files_only=True)


@contextmanager
def open_single_file(path: Path, what: str, expected: str, required: tuple[str, ...],
                      prefix: str = "") -> Iterator[tuple[object, dict[str, str]]]:
    """The open .safetensors file `path` and its tensor names -> keys, after checking the names in `required` are
    there (those under `prefix` only, without it, when the file has such keys); reads the header only."""
    if not path.is_file():
        raise UMOError(f"{what} '{path}' does not exist; give {expected}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            if prefix and any(key.startswith(prefix) for key in keys):
                keys = [key for key in keys if key.startswith(prefix)]
            names = {key.removeprefix(prefix): key for key in keys}
            missing = [name for name in required if name not in names]
            if missing:
                lora = " (it looks like a LoRA)" if any("lora" in key.lower() for key in keys) else ""
                raise UMOError(f"'{path}' is not a {what}{lora}: it has no tensor '{missing[0]}'; give {expected}")
            yield handle, names
    except (SafetensorError, OSError, ValueError) as error:
        raise UMOError(f"{what} '{path}' is not a readable .safetensors file ({error}); give {expected}") from None


def read_single_file(path: Path, dtype: torch.dtype, what: str, expected: str, required: tuple[str, ...],
                      prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of the .safetensors file `path` (see open_single_file), in `dtype`."""
    with open_single_file(path, what, expected, required, prefix) as (handle, names):
        return {name: handle.get_tensor(key).to(dtype) for name, key in names.items()}


def count_blocks(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    """How many numbered blocks `prefix`0., `prefix`1., ... the state dict has."""
    return len({key.removeprefix(prefix).split(".")[0] for key in state_dict if key.startswith(prefix)})


def model_from_state_dict(model_class, config: dict, state_dict: dict[str, torch.Tensor], what: str,
                          fix: str) -> torch.nn.Module:
    """`model_class` built from `config` with `state_dict`'s weights (in diffusers' names), in eval mode; weights
    missing, unknown or of other shapes are an error `what (weights ...); fix`."""
    with torch.device("meta"):  # no memory for weights that are replaced right away
        model = model_class.from_config(config)
    expected = model.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    misshapen = sorted(key for key in expected.keys() & state_dict.keys()
                       if state_dict[key].shape != expected[key].shape)
    problems = "; ".join(f"{label} {names[:3]}" for label, names in
                         (("missing", missing), ("unknown", unexpected), ("of other shapes", misshapen)) if names)
    if problems:
        raise UMOError(f"{what} (weights {problems}, in diffusers' names); {fix}")
    model.load_state_dict(state_dict, assign=True)
    return model.eval()
