"""The prompt embedding, in memory and on disk, for every backbone.

In memory a batch is a `TextEmbedding`. On disk one prompt is one .safetensors file holding `prompt_embeds`
[L, width] and, for backbones that have one, `pooled_prompt_embeds` [width] (FLUX.1: T5-XXL's last hidden state
4096 wide, L = 512, and CLIP-L's pooled output 768 wide; FLUX.2: the stacked hidden states of its language model,
no pooled vector). FLUX.2 [klein]'s files also hold `negative_prompt_embeds` [L, width], the empty prompt's
embedding: klein base is sampled with classifier-free guidance against it, as Flux2KleinPipeline does (it doubles
the file's size). The file's metadata names the backbone it was made for (BACKBONE_METADATA_KEY); files
without it are FLUX.1's, the only kind made before. Where a backbone has several text encoders (FLUX.2: [klein]'s
Qwen3, [dev]'s Mistral-3, told apart by their widths) the metadata also names the one used (MADE_WITH_METADATA_KEY),
and a file of the wrong width names it. `python -m training.encode_prompts` writes them; the trainer and
`generate --text-embedding` read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..errors import UMOError

PROMPT_KEY = "prompt_embeds"
POOLED_KEY = "pooled_prompt_embeds"
NEGATIVE_KEY = "negative_prompt_embeds"
# The text encoder whose files hold NEGATIVE_KEY (FLUX.2 [klein]'s; flux2/text_encoders names its Qwen3 by this).
NEGATIVE_MADE_WITH = "FLUX.2 [klein]'s Qwen3"
BACKBONE_METADATA_KEY = "umo_backbone"  # also the key of the LoRA files' backbone
MADE_WITH_METADATA_KEY = "umo_text_encoder"
UNMARKED_BACKBONE = "flux1"  # files without the metadata key: the only kind written before it existed


@dataclass
class TextEmbedding:
    prompt_embeds: torch.Tensor  # [B, L, width]
    pooled_prompt_embeds: torch.Tensor | None = None  # [B, width], FLUX.1's CLIP vector
    made_with: str | None = None  # the text encoder, where the backbone has several ("FLUX.2 [dev]'s Mistral-3")
    # [B, L, width], the empty prompt's embedding: given, sampling with guidance > 1 is classifier-free guidance
    negative_prompt_embeds: torch.Tensor | None = None


def embedding_file_tensors(text: TextEmbedding, index: int) -> dict[str, torch.Tensor]:
    """The tensors of prompt `index`'s file (no batch dimension), on the CPU."""
    tensors = {PROMPT_KEY: text.prompt_embeds[index].cpu()}
    if text.pooled_prompt_embeds is not None:
        tensors[POOLED_KEY] = text.pooled_prompt_embeds[index].cpu()
    if text.negative_prompt_embeds is not None:
        tensors[NEGATIVE_KEY] = text.negative_prompt_embeds[index].cpu()
    return tensors


def embedding_file_metadata(backbone: str, made_with: str | None = None) -> dict[str, str]:
    """The metadata of a text-embedding file made for `backbone` (with the text encoder `made_with`)."""
    return {BACKBONE_METADATA_KEY: backbone} | ({MADE_WITH_METADATA_KEY: made_with} if made_with else {})


def load_text_embeddings(paths: list[Path], device: str | torch.device = "cpu",
                         negative: bool = False) -> TextEmbedding:
    """One file per prompt -> their batch, on `device` (the files must have one text length); with `negative`, also
    their negative_prompt_embeds (for classifier-free guidance; see `check_negative`)."""
    files = [load_file(path) for path in paths]
    pooled = None
    if all(POOLED_KEY in f for f in files):
        pooled = torch.stack([f[POOLED_KEY] for f in files]).to(device)
    negatives = torch.stack([f[NEGATIVE_KEY] for f in files]).to(device) if negative else None
    return TextEmbedding(torch.stack([f[PROMPT_KEY] for f in files]).to(device), pooled,
                         negative_prompt_embeds=negatives)


def lacks_negative(path: Path) -> bool:
    """Whether the file was made with the text encoder whose files hold negative_prompt_embeds, but lacks it (made
    before they did); False for an unreadable file (the trainer's check names it)."""
    try:
        with safe_open(path, "pt") as embedding:
            made_with = (embedding.metadata() or {}).get(MADE_WITH_METADATA_KEY)
            return made_with == NEGATIVE_MADE_WITH and NEGATIVE_KEY not in embedding.keys()
    except (SafetensorError, OSError):
        return False


def check_negative(path: Path, name: str, hint: str) -> None:
    """A UMOError naming the file by `name` when it lacks negative_prompt_embeds, which classifier-free guidance
    needs; `hint`: how to make it again (the file is readable: checked_text_embedding_widths has read it)."""
    with safe_open(path, "pt") as embedding:
        if NEGATIVE_KEY not in embedding.keys():
            raise UMOError(f"{name} lacks {NEGATIVE_KEY} (the empty prompt's embedding), which FLUX.2 [klein] base "
                           f"is sampled with when guidance is above 1 (classifier-free guidance); {hint}")


def text_embedding_backbone(path: Path) -> str:
    """The backbone a text-embedding file was made for, from its metadata (safetensors errors pass through)."""
    return _metadata(path).get(BACKBONE_METADATA_KEY, UNMARKED_BACKBONE)


def text_embedding_made_with(path: Path) -> str | None:
    """The text encoder a text-embedding file was made with, where its metadata names one."""
    return _metadata(path).get(MADE_WITH_METADATA_KEY)


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(path, "pt") as embedding:
        return embedding.metadata() or {}


def text_embedding_shapes(path: Path) -> tuple[list[int], list[int]] | None:
    """The shapes of (prompt_embeds, pooled_prompt_embeds) in the file's header, pooled [] when the file has none;
    None when it lacks prompt_embeds. The safetensors errors of an unreadable file pass through."""
    with safe_open(path, "pt") as embedding:
        keys = set(embedding.keys())
        if PROMPT_KEY not in keys:
            return None
        pooled = embedding.get_slice(POOLED_KEY).get_shape() if POOLED_KEY in keys else []
        return embedding.get_slice(PROMPT_KEY).get_shape(), pooled


def widths_text(widths: tuple[int, ...]) -> str:
    """'prompt_embeds of width 4096 and pooled_prompt_embeds of 768' (FLUX.1) or 'prompt_embeds of width 7680'."""
    return " and ".join([f"{PROMPT_KEY} of width {widths[0]}"] + [f"{POOLED_KEY} of {width}" for width in widths[1:]])


def checked_text_embedding_widths(path: Path, name: str, hint: str, backbone,
                                  widths: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The widths of one prompt's embedding file for `backbone` (prompt_embeds, and pooled_prompt_embeds where the
    backbone has one), from its header; a UMOError naming it by `name`, with `hint` (how to make a good one), when
    it is unreadable, was made for another backbone, lacks a tensor, holds other shapes than [L, width] (and
    [width]), or other widths than `widths` (the transformer's, where known)."""
    try:
        shapes = text_embedding_shapes(path)
        made_for, made_with = text_embedding_backbone(path), text_embedding_made_with(path)
    except (SafetensorError, OSError) as error:
        raise UMOError(f"{name} is not a readable .safetensors file ({error}); {hint}") from None
    pooled_wanted = POOLED_KEY in backbone.text_keys
    if shapes is None or (pooled_wanted and not shapes[1]):
        raise UMOError(f"{name} lacks {' / '.join(backbone.text_keys)}; {hint}")
    if made_for != backbone.name:
        raise UMOError(f"{name} was made for {made_for}, the model is {backbone.name} (--backbone); {hint}")
    prompt, pooled = shapes
    if pooled_wanted:
        if len(prompt) != 2 or prompt[0] < 1 or len(pooled) != 1:
            raise UMOError(f"{name} has {PROMPT_KEY} {prompt} and {POOLED_KEY} {pooled}; they must be [L, width] and "
                           f"[width] (one prompt, no batch dimension); {hint}")
        found = (prompt[1], pooled[0])
    else:
        if len(prompt) != 2 or prompt[0] < 1:
            raise UMOError(f"{name} has {PROMPT_KEY} {prompt}; it must be [L, width] (one prompt, no batch "
                           f"dimension); {hint}")
        found = (prompt[1],)
    if widths is not None and found != tuple(widths):
        takes = f"the transformer takes {' and '.join(map(str, widths))}"
        if made_with:  # FLUX.2 [klein]'s embeddings for [dev], or the reverse
            raise UMOError(f"{name} has {widths_text(found)}, made with {made_with}; {takes} (another model's text "
                           f"encoder); {hint}")
        raise UMOError(f"{name} has {widths_text(found)}; {takes} (made with other text encoders?); {hint}")
    return found
