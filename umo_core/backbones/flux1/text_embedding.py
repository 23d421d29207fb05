"""FLUX.1's prompt embedding, in memory and on disk.

In memory a batch is a `TextEmbedding`. On disk one prompt is one .safetensors file holding
`prompt_embeds` [L, T5 width] (T5-XXL's last hidden state, 4096 wide, L = 512 tokens) and
`pooled_prompt_embeds` [CLIP width] (CLIP-L's pooled output, 768 wide): what
`python -m training.encode_prompts` writes and what the trainer and `generate --text-embedding` read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ...errors import UMOError

PROMPT_KEY = "prompt_embeds"
POOLED_KEY = "pooled_prompt_embeds"


@dataclass
class TextEmbedding:
    prompt_embeds: torch.Tensor  # [B, L, 4096] T5
    pooled_prompt_embeds: torch.Tensor  # [B, 768] CLIP


def embedding_file_tensors(text: TextEmbedding, index: int) -> dict[str, torch.Tensor]:
    """The tensors of prompt `index`'s file (no batch dimension), on the CPU."""
    return {PROMPT_KEY: text.prompt_embeds[index].cpu(), POOLED_KEY: text.pooled_prompt_embeds[index].cpu()}


def load_text_embeddings(paths: list[Path], device: str | torch.device = "cpu") -> TextEmbedding:
    """One file per prompt -> their batch, on `device` (the files must have one text length)."""
    files = [load_file(path) for path in paths]
    return TextEmbedding(torch.stack([f[PROMPT_KEY] for f in files]).to(device),
                         torch.stack([f[POOLED_KEY] for f in files]).to(device))


def text_embedding_shapes(path: Path) -> tuple[list[int], list[int]] | None:
    """The shapes of (prompt_embeds, pooled_prompt_embeds) in the file's header, None when it lacks either; the
    safetensors errors of an unreadable file pass through."""
    with safe_open(path, "pt") as embedding:
        if not {PROMPT_KEY, POOLED_KEY} <= set(embedding.keys()):
            return None
        return embedding.get_slice(PROMPT_KEY).get_shape(), embedding.get_slice(POOLED_KEY).get_shape()


def checked_text_embedding_widths(path: Path, name: str, hint: str,
                                  widths: tuple[int, int] | None = None) -> tuple[int, int]:
    """The (T5, CLIP) widths of one prompt's embedding file, from its header; a UMOError naming it by `name`, with
    `hint` (how to make a good one), when it is unreadable, lacks a tensor, holds other shapes than [L, width] and
    [width], or other widths than `widths` (the transformer's, where known)."""
    try:
        shapes = text_embedding_shapes(path)
    except (SafetensorError, OSError) as error:
        raise UMOError(f"{name} is not a readable .safetensors file ({error}); {hint}") from None
    if shapes is None:
        raise UMOError(f"{name} lacks {PROMPT_KEY} / {POOLED_KEY}; {hint}")
    prompt, pooled = shapes
    if len(prompt) != 2 or prompt[0] < 1 or len(pooled) != 1:
        raise UMOError(f"{name} has {PROMPT_KEY} {prompt} and {POOLED_KEY} {pooled}; they must be [L, width] and "
                       f"[width] (one prompt, no batch dimension); {hint}")
    found = (prompt[1], pooled[0])
    if widths is not None and found != widths:
        raise UMOError(f"{name} has {PROMPT_KEY} of width {found[0]} and {POOLED_KEY} of {found[1]}; the "
                       f"transformer takes {widths[0]} and {widths[1]} (made with other text encoders?); {hint}")
    return found
