"""FLUX.2 [klein]'s text encoder (Qwen3) from a local diffusers klein folder, and prompt embeddings.

`encode_prompts` gives what diffusers' `Flux2KleinPipeline.encode_prompt` gives: each prompt put in Qwen3's chat
template (a user turn, the generation prompt, thinking off), padded to 512 tokens, and the hidden states of layers
HIDDEN_LAYERS (9, 18, 27) stacked along the width (3 x the encoder's width: 7680 for Qwen3-4B, 12288 for Qwen3-8B).
FLUX.2 [dev]'s Mistral-3 encoder is not read here yet (its embeddings can be made with diffusers' Flux2Pipeline).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ...errors import UMOError
from ..text_embedding import TextEmbedding

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

REQUIRED_FILES = ("text_encoder/config.json", "tokenizer/tokenizer_config.json")
MAX_LENGTH = 512  # the pipelines' max_sequence_length
HIDDEN_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's text_encoder_out_layers


@dataclass
class TextEncoders:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def load_text_encoders(folder: str | Path, dtype: torch.dtype = torch.bfloat16,
                       device: str | torch.device = "cpu") -> TextEncoders:
    """Qwen3 (`text_encoder/`, `tokenizer/`) of a local diffusers FLUX.2 [klein] folder, without any hub access."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    folder = Path(folder)
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise UMOError(f"text encoders: '{folder}' is not a diffusers FLUX.2 folder, it lacks {', '.join(missing)}. "
                       "Give the top folder of a diffusers FLUX.2 [klein] download, the one that holds text_encoder/ "
                       "(Qwen3) and tokenizer/")
    model_type = json.loads((folder / "text_encoder" / "config.json").read_text()).get("model_type")
    if model_type != "qwen3":
        raise UMOError(f"text encoders: '{folder}' holds a {model_type} text encoder; this reads FLUX.2 [klein]'s "
                       "Qwen3 (FLUX.2 [dev]'s Mistral-3 is not supported yet)")
    return TextEncoders(
        model=Qwen3ForCausalLM.from_pretrained(folder / "text_encoder", dtype=dtype, local_files_only=True).to(device),
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True),
    )


@torch.no_grad()
def encode_prompts(encoders: TextEncoders, prompts: list[str], max_length: int = MAX_LENGTH) -> TextEmbedding:
    """The prompts' FLUX.2 [klein] embedding [B, max_length, 3 x width], on the encoder's device, in its dtype."""
    texts = [encoders.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                    add_generation_prompt=True, enable_thinking=False)
             for prompt in prompts]
    inputs = encoders.tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True,
                                max_length=max_length)
    output = encoders.model(input_ids=inputs.input_ids.to(encoders.model.device),
                            attention_mask=inputs.attention_mask.to(encoders.model.device),
                            output_hidden_states=True, use_cache=False)
    stacked = torch.stack([output.hidden_states[layer] for layer in HIDDEN_LAYERS], dim=1)  # [B, 3, L, width]
    b, layers, length, width = stacked.shape
    embeds = stacked.permute(0, 2, 1, 3).reshape(b, length, layers * width)
    return TextEmbedding(embeds.to(encoders.model.dtype))
