"""UNO's token scheme and FLUX's schedule, against hand-computed values, diffusers and ComfyUI."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from umo_core.backbones.flux1.uno import (
    clean_estimate,
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


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="COMFYUI_PATH not set (a ComfyUI checkout)")
def test_ids_equal_comfyui_uxo_ids():
    """ComfyUI's own Flux._forward builds the ids; its transformer is replaced by a probe."""
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    from tests.comfyui.conftest import flux_config

    config = flux_config(vec_in_dim=8, context_in_dim=8, hidden_size=48, mlp_ratio=2.0, num_heads=2, depth=0,
                         depth_single_blocks=0, axes_dim=[8, 8, 8], guidance_embed=False)
    model = Flux(**config, operations=comfy.ops.disable_weight_init)
    seen = {}

    def probe(img, img_ids, *args, **kwargs):
        seen["ids"] = img_ids[0]
        return torch.zeros(img.shape[0], img.shape[1], 64)

    model.forward_orig = probe
    target, refs = (12, 16), [(8, 6), (10, 4), (6, 6)]
    model._forward(torch.zeros(1, 16, *target), torch.zeros(1), torch.zeros(1, 3, 8),
                   ref_latents=[torch.zeros(1, 16, *hw) for hw in refs], ref_latents_method="uxo")
    assert torch.equal(seen["ids"].float(), uno_image_ids(target, refs))
