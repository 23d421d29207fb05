"""UNO's multi-reference token scheme for FLUX (UNO, arXiv 2504.02160) and FLUX's schedule.

The transformer sees `[text | target | ref1 | ref2 ...]`. Latents are packed into 2x2 patches
(one token per patch); position ids have three axes (index, row, column): text tokens are all
zero, target token (i, j) is (0, i, j) and reference k's token (i, j) is
(0, i + off_h, j + off_w), where the offsets start at the target's token height and width and
grow by each earlier reference's size: references sit on a diagonal after the target. This is
UNO's `pe='d'` and ComfyUI's `uxo/uno` reference method. The output is sliced back to the
target tokens.
"""

from __future__ import annotations

import math

import numpy as np
import torch

PATCH = 2


def pack_latents(latent: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] (H, W even) -> tokens [B, H/2 * W/2, C*4], channel-major within each 2x2 patch."""
    b, c, h, w = latent.shape
    patches = latent.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_latents` for a latent of `height` x `width`."""
    b, _, d = tokens.shape
    c = d // (PATCH * PATCH)
    patches = tokens.reshape(b, height // PATCH, width // PATCH, c, PATCH, PATCH)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def grid_ids(rows: int, columns: int, row_offset: int = 0, column_offset: int = 0) -> torch.Tensor:
    """Position ids [rows*columns, 3] of a token grid: (0, row + row_offset, column + column_offset)."""
    ids = torch.zeros(rows, columns, 3)
    ids[..., 1] = torch.arange(rows)[:, None] + row_offset
    ids[..., 2] = torch.arange(columns)[None, :] + column_offset
    return ids.reshape(rows * columns, 3)


def uno_image_ids(target_hw: tuple[int, int], reference_hws: list[tuple[int, int]]) -> torch.Tensor:
    """Ids [N,3] of `[target | refs]` tokens for latent sizes (height, width) in latent pixels."""
    rows, columns = target_hw[0] // PATCH, target_hw[1] // PATCH
    ids = [grid_ids(rows, columns)]
    row_offset, column_offset = rows, columns
    for height, width in reference_hws:
        ids.append(grid_ids(height // PATCH, width // PATCH, row_offset, column_offset))
        row_offset += height // PATCH
        column_offset += width // PATCH
    return torch.cat(ids)


def text_ids(tokens: int) -> torch.Tensor:
    return torch.zeros(tokens, 3)


def flux_shift(image_tokens: int, base_tokens: int = 256, max_tokens: int = 4096,
               base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift mu: linear in the target token count, 256 -> 0.5, 4096 -> 1.15."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return base_shift + slope * (image_tokens - base_tokens)


def flux_sigmas(steps: int, image_tokens: int) -> torch.Tensor:
    """The shifted flow-matching schedule, steps + 1 values from 1 down to 0 (FLUX's time_shift)."""
    mu = flux_shift(image_tokens)
    t = np.linspace(1.0, 1.0 / steps, steps)
    shifted = math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))
    return torch.tensor(np.append(shifted, 0.0), dtype=torch.float32)
