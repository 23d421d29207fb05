"""FLUX's two text encoders (CLIP-L and T5-XXL) from a local diffusers FLUX folder, and prompt embeddings.

`encode_prompts` gives what diffusers' `FluxPipeline.encode_prompt` gives: CLIP's pooled output of the
prompt padded to the tokenizer's 77 tokens, and T5's last hidden state of the prompt padded to 512
tokens. FLUX was trained without an attention mask on the padding, so the padding tokens are part of
the embedding; the encoders are called exactly as the pipeline calls them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ...errors import UMOError
from ..text_embedding import TextEmbedding
from ..text_encoder_files import check_weights, json_object, load_pretrained

if TYPE_CHECKING:
    from transformers import CLIPTextModel, PreTrainedTokenizerBase, T5EncoderModel

# The files of a diffusers FLUX download (FLUX.1-dev, FLUX.1-schnell) that the encoders are read from.
REQUIRED_FILES = ("text_encoder/config.json", "tokenizer/tokenizer_config.json",
                  "text_encoder_2/config.json", "tokenizer_2/tokenizer_config.json")
ENCODER_FOLDERS = ("text_encoder", "text_encoder_2")
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
    clip_tokenizer = load_pretrained(folder / "tokenizer", AutoTokenizer, local_files_only=True)
    t5_tokenizer = load_pretrained(folder / "tokenizer_2", AutoTokenizer, local_files_only=True)
    clip = load_pretrained(folder / "text_encoder", CLIPTextModel, dtype=dtype, local_files_only=True)
    t5 = load_pretrained(folder / "text_encoder_2", T5EncoderModel, dtype=dtype, local_files_only=True)
    return TextEncoders(clip.to(device), clip_tokenizer, t5.to(device), t5_tokenizer)


def check_text_encoders(folder: Path) -> None:
    """A UMOError naming the file unless `folder` holds FLUX's text encoder files, their configs are JSON objects
    and their weights' headers are whole; reads no weights."""
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise UMOError(f"text encoders: '{folder}' is not a diffusers FLUX folder, it lacks {', '.join(missing)}. "
                       "Give the top folder of a diffusers FLUX.1-dev download, the one that holds text_encoder/ "
                       "(CLIP-L), tokenizer/, text_encoder_2/ (T5-XXL) and tokenizer_2/")
    for name in REQUIRED_FILES:
        json_object(folder / name)
    for encoder in ENCODER_FOLDERS:
        check_weights(folder / encoder)


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
