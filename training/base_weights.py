"""The frozen base in int8 (`--base-dtype int8`): torchao's weight-only int8 quantization of the transformer's
Linear layers, the bulk of its weights (one byte a weight and a scale per output row, instead of bf16's two bytes).
peft trains the LoRA on such layers (its `TorchaoLoraLinear`): the LoRA's own weights stay fp32 and only they get
gradients; the activations keep the --mixed-precision dtype. Any backbone: the layers are found by type.

torchao is an optional extra (`pip install "umo-identity[int8]"`): a well-kept PyTorch library whose int8
weight-only layers run on the CPU and on GPUs alike, and the one peft supports LoRA training on (bitsandbytes
needs CUDA; optimum-quanto's layers peft does not train). fp8 (torchao's float8 weights) needs a GPU of compute
capability 8.9 or later and is not offered: it could not be tested here.
"""

from __future__ import annotations

import torch

from umo_core.errors import UMOError

BASE_DTYPES = ("auto", "int8")  # auto: the --mixed-precision dtype (bf16 or fp32)


def check_int8_support() -> None:
    """A UMOError, before any long work, when --base-dtype int8 cannot run here (torchao is not installed)."""
    try:
        import torchao.quantization  # noqa: F401
    except ImportError:
        raise UMOError("--base-dtype int8 needs torchao, which is not installed: pip install \"umo-identity[int8]\" "
                       "(or pip install torchao), or leave --base-dtype out for the --mixed-precision dtype") from None


def quantize_linear_layers(model: torch.nn.Module) -> None:
    """Every nn.Linear weight of `model` in torchao's int8 weight-only form, in place (before the LoRA is added)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, _: isinstance(module, torch.nn.Linear))

