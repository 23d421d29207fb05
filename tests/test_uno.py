"""UNO's token scheme and FLUX's schedule, against hand-computed values and diffusers (ComfyUI:
tests/comfyui/test_uno_ids_comfyui.py)."""

from __future__ import annotations

import numpy as np
import torch

from umo_core.backbones.flow import clean_estimate
from umo_core.backbones.flux1.uno import (
    flux_sigmas,
    pack_latents,
    text_ids,
    uno_image_ids,
    unpack_latents,
)


def test_pack_unpack_round_trip_and_patch_order():
    latent = torch.arange(2 * 16 * 4 * 6, dtype=torch.float32).reshape(2, 16, 4, 6)
    tokens = pack_latents(latent)
    assert tokens.shape == (2, 6, 64)
    # token 0 holds the top-left 2x2 patch of every channel, channel-major
    assert tokens[0, 0, :4].tolist() == [latent[0, 0, 0, 0], latent[0, 0, 0, 1], latent[0, 0, 1, 0], latent[0, 0, 1, 1]]
    assert torch.equal(unpack_latents(tokens, 4, 6), latent)


def test_diagonal_ids_by_hand():
    ids = uno_image_ids((4, 6), [(2, 2), (4, 2)])  # target 2x3 tokens, refs 1x1 and 2x1 tokens
    target, ref1, ref2 = ids[:6], ids[6:7], ids[7:]
    assert target[:, 0].eq(0).all() and target[:, 1:].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert ref1.tolist() == [[0, 2, 3]]  # starts at the target's token height and width
    assert ref2.tolist() == [[0, 3, 4], [0, 4, 4]]  # then grows by ref1's size
    assert text_ids(5).eq(0).all()


def test_schedule_matches_diffusers_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler

    tokens = (768 // 16) ** 2
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 25, 25), mu=mu)
    torch.testing.assert_close(flux_sigmas(25, tokens), scheduler.sigmas.float(), atol=1e-6, rtol=0)


def test_clean_estimate_inverts_the_flow():
    x0, noise, t = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8), 0.3
    x_t = (1 - t) * x0 + t * noise
    torch.testing.assert_close(clean_estimate(x_t, noise - x0, t), x0)
