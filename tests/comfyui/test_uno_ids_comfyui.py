"""UNO's position ids (umo_core.backbones.flux1.uno) against the ids ComfyUI's own FLUX builds for reference latents."""

from __future__ import annotations

import torch

from tests.comfyui.conftest import comfy_import_path, flux_config
from umo_core.backbones.flux1.uno import uno_image_ids


def test_ids_equal_comfyui_uxo_ids():
    """ComfyUI's own Flux._forward builds the ids; its transformer is replaced by a probe."""
    comfy_import_path()
    import comfy.ops
    from comfy.ldm.flux.model import Flux

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
