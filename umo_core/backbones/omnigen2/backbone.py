"""OmniGen2's part of the backbone contract: the name, the LoRA family and the reference rule (the nodes use it)."""

from __future__ import annotations

import torch

from .references import resize_omnigen2_reference


class OmniGen2:
    name = "omnigen2"
    family = "omnigen2"
    title = "OmniGen2"

    @staticmethod
    def resize_reference(image: torch.Tensor, count: int) -> torch.Tensor:
        """One reference [H,W,3] float -> [h,w,3]; OmniGen2's rule does not depend on the number of references."""
        return resize_omnigen2_reference(image)


BACKBONE = OmniGen2()
