"""The text encoder folders of diffusers downloads, checked before any weight is read and loaded offline; every
backbone's text encoders go through here, so a damaged download is the same clear error for each: a config that is
not JSON, weights missing (model.safetensors, or the shards a sharded download's index names) or cut short, a
tokenizer that does not load."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..errors import UMOError

WEIGHT_INDEX = "model.safetensors.index.json"  # a sharded download: the index names the shard files


def load_pretrained(folder: Path, loader, **options):
    """loader.from_pretrained(folder); what check_weights cannot see (a tokenizer's files, weights that do not fit the
    config) is a UMOError naming the folder."""
    try:
        return loader.from_pretrained(folder, **options)
    except (OSError, ValueError, SafetensorError) as error:
        raise UMOError(f"text encoders: '{folder}' could not be loaded ({error}); fetch that folder again") from None


def json_object(path: Path) -> dict:
    """The JSON object in the file `path` of a download."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UMOError(f"text encoders: '{path}' is not readable JSON ({error}); fetch that file again") from None
    if not isinstance(value, dict):
        raise UMOError(f"text encoders: '{path}' is not a JSON object; fetch that file again")
    return value


def check_weights(encoder: Path) -> None:
    """A UMOError naming the file unless the text encoder folder's weights are all there with whole headers."""
    for weights in _weight_files(encoder):
        try:
            with safe_open(weights, "pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise UMOError(f"text encoders: '{weights}' is not a readable .safetensors file ({error}); the "
                           "download was cut short or damaged: fetch that file again") from None


def _weight_files(encoder: Path) -> list[Path]:
    """The .safetensors files of a text encoder folder: model.safetensors, or the shards its index names."""
    if (encoder / "model.safetensors").is_file():
        return [encoder / "model.safetensors"]
    if (encoder / WEIGHT_INDEX).is_file():
        weight_map = json_object(encoder / WEIGHT_INDEX).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UMOError(f"text encoders: '{encoder / WEIGHT_INDEX}' has no weight_map; fetch that file again")
        shards = [encoder / name for name in sorted(set(weight_map.values()))]
        absent = [shard.name for shard in shards if not shard.is_file()]
        if absent:
            raise UMOError(f"text encoders: '{encoder}' lacks {', '.join(absent)} (named by {WEIGHT_INDEX}); "
                           "the download is incomplete: fetch those files")
        return shards
    raise UMOError(f"text encoders: '{encoder}' has no weights (model.safetensors or {WEIGHT_INDEX} with its "
                   "shards); the download is incomplete: fetch them")
