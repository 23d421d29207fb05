"""FLUX's two text encoders (CLIP-L and T5-XXL) from a local diffusers FLUX folder, and prompt embeddings.

`encode_prompts` gives what diffusers' `FluxPipeline.encode_prompt` gives: CLIP's pooled output of the
prompt padded to the tokenizer's 77 tokens, and T5's last hidden state of the prompt padded to 512
tokens. FLUX was trained without an attention mask on the padding, so the padding tokens are part of
the embedding; the encoders are called exactly as the pipeline calls them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open

from ...errors import UMOError
from ..text_embedding import TextEmbedding

if TYPE_CHECKING:
    from transformers import CLIPTextModel, PreTrainedTokenizerBase, T5EncoderModel

# The files of a diffusers FLUX download (FLUX.1-dev, FLUX.1-schnell) that the encoders are read from.
REQUIRED_FILES = ("text_encoder/config.json", "tokenizer/tokenizer_config.json",
                  "text_encoder_2/config.json", "tokenizer_2/tokenizer_config.json")
ENCODER_FOLDERS = ("text_encoder", "text_encoder_2")
WEIGHT_INDEX = "model.safetensors.index.json"  # a sharded download (T5-XXL): the index names the shard files
T5_MAX_LENGTH = 512  # FLUX.1-dev's max_sequence_length, diffusers' default


@dataclass
class TextEncoders:
    clip: CLIPTextModel
    clip_tokenizer: PreTrainedTokenizerBase
    t5: T5EncoderModel
    t5_tokenizer: PreTrainedTokenizerBase


def load_text_encoders(folder: str | Path, dtype: torch.dtype = torch.bfloat16,
                       device: str | torch.device = "cpu") -> TextEncoders:
    """CLIP-L (`text_encoder/`, `tokenizer/`) and T5-XXL (`text_encoder_2/`, `tokenizer_2/`) of a local
    diffusers FLUX folder, without any hub access."""
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    folder = Path(folder)
    check_text_encoders(folder)
    # The tokenizers first: a damaged tokenizer file is named before any weights are read.
    clip_tokenizer = _load(folder / "tokenizer", AutoTokenizer, local_files_only=True)
    t5_tokenizer = _load(folder / "tokenizer_2", AutoTokenizer, local_files_only=True)
    clip = _load(folder / "text_encoder", CLIPTextModel, dtype=dtype, local_files_only=True)
    t5 = _load(folder / "text_encoder_2", T5EncoderModel, dtype=dtype, local_files_only=True)
    return TextEncoders(clip.to(device), clip_tokenizer, t5.to(device), t5_tokenizer)


def _load(folder: Path, loader, **options):
    """loader.from_pretrained(folder); what check_text_encoders cannot see (a tokenizer's files, weights that do not
    fit the config) is a UMOError naming the folder."""
    try:
        return loader.from_pretrained(folder, **options)
    except (OSError, ValueError, SafetensorError) as error:
        raise UMOError(f"text encoders: '{folder}' could not be loaded ({error}); fetch that folder again") from None

def check_text_encoders(folder: Path) -> None:
    """A UMOError naming the file unless `folder` holds FLUX's text encoder files, their configs are JSON objects
    and their weights' headers are whole; reads no weights."""
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise UMOError(f"text encoders: '{folder}' is not a diffusers FLUX folder, it lacks {', '.join(missing)}. "
                       "Give the top folder of a diffusers FLUX.1-dev download, the one that holds text_encoder/ "
                       "(CLIP-L), tokenizer/, text_encoder_2/ (T5-XXL) and tokenizer_2/")
    for name in REQUIRED_FILES:
        _json_object(folder / name, "file")
    for encoder in ENCODER_FOLDERS:
        for weights in _weight_files(folder / encoder):
            try:
                with safe_open(weights, "pt"):
                    pass
            except (SafetensorError, OSError) as error:
                raise UMOError(f"text encoders: '{weights}' is not a readable .safetensors file ({error}); the "
                               "download was cut short or damaged: fetch that file again") from None


def _json_object(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UMOError(f"text encoders: '{path}' is not readable JSON ({error}); fetch that {what} again") from None
    if not isinstance(value, dict):
        raise UMOError(f"text encoders: '{path}' is not a JSON object; fetch that {what} again")
    return value


def _weight_files(encoder: Path) -> list[Path]:
    """The .safetensors files of a text encoder folder: model.safetensors, or the shards its index names."""
    if (encoder / "model.safetensors").is_file():
        return [encoder / "model.safetensors"]
    if (encoder / WEIGHT_INDEX).is_file():
        weight_map = _json_object(encoder / WEIGHT_INDEX, "file").get("weight_map")
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


@torch.no_grad()
def encode_prompts(encoders: TextEncoders, prompts: list[str],
                   max_sequence_length: int = T5_MAX_LENGTH) -> TextEmbedding:
    """The prompts' FLUX embedding: prompt_embeds [B, max_sequence_length, 4096] (T5) and
    pooled_prompt_embeds [B, 768] (CLIP), on the encoders' device, in their dtype. Longer prompts are
    cut, as FLUX cuts them (CLIP at 77 tokens, T5 at max_sequence_length)."""
    clip_ids = encoders.clip_tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt",
                                       max_length=encoders.clip_tokenizer.model_max_length).input_ids
    t5_ids = encoders.t5_tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt",
                                   max_length=max_sequence_length).input_ids
    pooled = encoders.clip(clip_ids.to(encoders.clip.device)).pooler_output
    hidden = encoders.t5(t5_ids.to(encoders.t5.device)).last_hidden_state
    # In float16 T5 keeps its feed-forward output layers in float32; the pipeline casts the result back.
    return TextEmbedding(hidden.to(encoders.t5.dtype), pooled.to(encoders.clip.dtype))
