"""FLUX.2's text encoders from a local diffusers folder, and prompt embeddings: [klein]'s Qwen3, [dev]'s Mistral-3.

`encode_prompts` gives what the pipelines' `encode_prompt` gives: each prompt in the encoder's chat template, padded
to 512 tokens, and the hidden states of three layers stacked along the width (3 x the encoder's width).
- [klein] (Flux2KleinPipeline): Qwen3; a user turn, the generation prompt, thinking off; layers 9, 18 and 27
  (7680 wide for Qwen3-4B, 12288 for Qwen3-8B).
- [dev] (Flux2Pipeline): Mistral Small 3 (Mistral3ForConditionalGeneration, its tokenizer/ a Pixtral processor);
  the pipeline's system message then a user turn, built by diffusers' own `format_input`; layers 10, 20 and 30
  (15360 wide).
Which encoder a folder holds is read from text_encoder/config.json; the embedding records it (`made_with`).
[klein]'s embedding also holds the empty prompt's (`negative_prompt_embeds`): Flux2KleinPipeline samples the base
models with classifier-free guidance against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ...errors import UMOError
from ..text_embedding import NEGATIVE_MADE_WITH, TextEmbedding
from ..text_encoder_files import check_weights, json_object, load_pretrained

if TYPE_CHECKING:
    from transformers import PreTrainedModel

REQUIRED_FILES = ("text_encoder/config.json", "tokenizer/tokenizer_config.json")
MAX_LENGTH = 512  # the pipelines' max_sequence_length
FOLDERS = ("a diffusers FLUX.2 [klein] or FLUX.2 [dev] download, the one that holds text_encoder/ (Qwen3 or "
           "Mistral-3) and tokenizer/")


@dataclass(frozen=True)
class Encoder:
    """One of FLUX.2's text encoders, as its pipeline runs it."""

    model_type: str  # text_encoder/config.json's
    made_with: str  # recorded in the embedding files, and named in messages
    hidden_layers: tuple[int, ...]  # the pipeline's text_encoder_out_layers


QWEN3 = Encoder("qwen3", NEGATIVE_MADE_WITH, (9, 18, 27))
MISTRAL3 = Encoder("mistral3", "FLUX.2 [dev]'s Mistral-3", (10, 20, 30))
ENCODERS = {encoder.model_type: encoder for encoder in (QWEN3, MISTRAL3)}


@dataclass
class TextEncoders:
    encoder: Encoder
    model: PreTrainedModel
    tokenizer: object  # Qwen3: its tokenizer; Mistral-3: its Pixtral processor (whose chat template takes the messages)


def load_text_encoders(folder: str | Path, dtype: torch.dtype = torch.bfloat16,
                       device: str | torch.device = "cpu") -> TextEncoders:
    """The text encoder (`text_encoder/`, `tokenizer/`) of a local diffusers FLUX.2 folder, without any hub access;
    the files are checked (configs, weight headers, tokenizer) before any weight is read."""
    from transformers import AutoProcessor, AutoTokenizer, Mistral3ForConditionalGeneration, Qwen3ForCausalLM

    folder = Path(folder)
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise UMOError(f"text encoders: '{folder}' is not a diffusers FLUX.2 folder, it lacks {', '.join(missing)}. "
                       f"Give the top folder of {FOLDERS}")
    model_type = json_object(folder / "text_encoder" / "config.json").get("model_type")
    json_object(folder / "tokenizer" / "tokenizer_config.json")
    if model_type not in ENCODERS:
        raise UMOError(f"text encoders: '{folder}' holds a {model_type} text encoder; FLUX.2 takes [klein]'s Qwen3 or "
                       f"[dev]'s Mistral-3: give the top folder of {FOLDERS}")
    check_weights(folder / "text_encoder")
    encoder = ENCODERS[model_type]
    tokenizer_class, model_class = ((AutoTokenizer, Qwen3ForCausalLM) if encoder is QWEN3
                                    else (AutoProcessor, Mistral3ForConditionalGeneration))
    tokenizer = load_pretrained(folder / "tokenizer", tokenizer_class, local_files_only=True)
    model = load_pretrained(folder / "text_encoder", model_class, dtype=dtype, local_files_only=True)
    return TextEncoders(encoder, model.to(device), tokenizer)


def _tokens(encoders: TextEncoders, prompts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """The prompts in the encoder's chat template, as its pipeline tokenizes them: input_ids and attention_mask."""
    padding = {"padding": "max_length", "truncation": True, "max_length": max_length}
    if encoders.encoder is QWEN3:
        texts = [encoders.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                        add_generation_prompt=True, enable_thinking=False)
                 for prompt in prompts]
        return encoders.tokenizer(texts, return_tensors="pt", **padding)
    from diffusers.pipelines.flux2.pipeline_flux2 import SYSTEM_MESSAGE, format_input

    return encoders.tokenizer.apply_chat_template(format_input(prompts, SYSTEM_MESSAGE), add_generation_prompt=False,
                                                  tokenize=True, return_dict=True, return_tensors="pt",
                                                  processor_kwargs=padding)


@torch.no_grad()
def encode_prompts(encoders: TextEncoders, prompts: list[str], max_length: int = MAX_LENGTH) -> TextEmbedding:
    """The prompts' FLUX.2 embedding [B, max_length, 3 x width], on the encoder's device, in its dtype; [klein]'s
    with the empty prompt's (the pipeline's negative prompt) for each."""
    negative = None
    if encoders.encoder is QWEN3:  # encoded alone, as the pipeline encodes it
        negative = _embeds(encoders, [""], max_length).repeat(len(prompts), 1, 1)
    return TextEmbedding(_embeds(encoders, prompts, max_length), made_with=encoders.encoder.made_with,
                         negative_prompt_embeds=negative)


def _embeds(encoders: TextEncoders, prompts: list[str], max_length: int) -> torch.Tensor:
    """The prompts' stacked hidden states [B, max_length, 3 x width], in the encoder's dtype."""
    inputs = _tokens(encoders, prompts, max_length)
    device = encoders.model.device
    output = encoders.model(input_ids=inputs["input_ids"].to(device),
                            attention_mask=inputs["attention_mask"].to(device), output_hidden_states=True,
                            use_cache=False)
    stacked = torch.stack([output.hidden_states[layer] for layer in encoders.encoder.hidden_layers], dim=1)
    b, layers, length, width = stacked.shape  # [B, 3, L, width]
    embeds = stacked.permute(0, 2, 1, 3).reshape(b, length, layers * width)
    return embeds.to(encoders.model.dtype)
