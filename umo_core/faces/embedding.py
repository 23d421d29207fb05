"""Face embedding: one interface, two backends over the same ArcFace-style ONNX file.

- `OnnxEmbedder`: onnxruntime, no gradient; the fast path for scoring and reranking.
- `TorchEmbedder`: the graph converted once to torch with onnx2torch; differentiable with
  respect to the crops (the reward path), on any device and dtype.
Both take aligned RGB crops [F,3,112,112] in 0..1 and return L2-normalised [F,D] embeddings.
Graphs whose input declares a fixed batch (like the 1x3x112x112 fixture recogniser) run in
chunks of that size: fed a larger batch, such a graph can silently mix faces together.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UMOError
from .face_pack import onnx_session, read_onnx_model

if TYPE_CHECKING:
    from onnx import ModelProto


def _input_normalisation(model: ModelProto) -> tuple[float, float]:
    """(mean, std) in 0..255 units, insightface's rule: MXNet exports normalise inside the graph."""
    names = [node.name for node in model.graph.node[:8]]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 127.5)


class FaceEmbedder:
    """Common part of both backends: input scaling and output normalisation."""

    path: Path
    dim: int
    batch_size: int | None  # None = any batch

    def __init__(self, path: Path, model: ModelProto):
        self.path = path
        mean, std = _input_normalisation(model)
        # Crops arrive in 0..1: x * 255 - mean, divided by std.
        self.scale, self.offset = 255.0 / std, -mean / std
        batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
        self.batch_size = batch_dim.dim_value if batch_dim.HasField("dim_value") else None
        self.dim = model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value

    def _chunks(self, count: int) -> list[slice]:
        step = self.batch_size or max(count, 1)
        return [slice(i, i + step) for i in range(0, count, step)]

    def embed(self, crops: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class OnnxEmbedder(FaceEmbedder):
    def __init__(self, path: Path, providers: list[str]):
        model = read_onnx_model(path, "face recogniser")
        super().__init__(path, model)
        self.session = onnx_session(path, providers, "face recogniser")
        self.input_name = self.session.get_inputs()[0].name
        self.dim = self.dim or self.session.get_outputs()[0].shape[-1]

    @torch.no_grad()
    def embed(self, crops: torch.Tensor) -> torch.Tensor:
        if len(crops) == 0:
            return crops.new_zeros((0, self.dim), dtype=torch.float32)
        blob = (crops.detach().float().cpu().numpy() * self.scale + self.offset).astype(np.float32)
        outputs = [self.session.run(None, {self.input_name: blob[s]})[0] for s in self._chunks(len(blob))]
        features = torch.from_numpy(np.concatenate(outputs)).reshape(len(blob), -1)
        return F.normalize(features, dim=-1).to(crops.device)


@functools.lru_cache(maxsize=4)
def _converted(path: str, mtime_ns: int, size: int) -> torch.nn.Module:
    """onnx2torch conversion, done once per file version and process (keyed by mtime and size)."""
    from onnx2torch import convert  # imports onnx (and torchvision): only this backend pays for them

    try:
        module = convert(read_onnx_model(Path(path), "face recogniser"))
    except Exception as error:  # onnx2torch raises NotImplementedError and others for odd graphs
        raise UMOError(f"face recogniser '{path}' cannot be converted to torch ({error}); "
                       "use the onnx embedder backend") from None
    return module.eval().requires_grad_(False)


class TorchEmbedder(FaceEmbedder):
    def __init__(self, path: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        model = read_onnx_model(path, "face recogniser")
        super().__init__(path, model)
        stat = Path(path).stat()
        self.device, self.dtype = torch.device(device), dtype
        # This backend exists for gradients: its weights must be ordinary tensors even when it is
        # built under torch.inference_mode() (as ComfyUI runs nodes); a copy made outside it is.
        with torch.inference_mode(False):
            self.module = copy.deepcopy(_converted(str(path), stat.st_mtime_ns, stat.st_size)).to(self.device, dtype)

    def embed(self, crops: torch.Tensor) -> torch.Tensor:
        """Differentiable when `crops` requires grad; the network's own weights stay frozen."""
        if len(crops) == 0:
            return crops.new_zeros((0, self.dim), dtype=torch.float32)
        blob = crops.to(self.device, self.dtype) * self.scale + self.offset
        features = torch.cat([self.module(blob[s]).reshape(-1, self.dim) for s in self._chunks(len(blob))])
        return F.normalize(features.float(), dim=-1).to(crops.device)


BACKENDS = ("onnx", "torch")  # make_embedder's choices: the CLIs', the node's and the bench's


def make_embedder(path: Path, backend: str, providers: list[str], device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> FaceEmbedder:
    """An embedder for `backend` 'onnx' (onnxruntime with `providers`) or 'torch' (`device`, `dtype`)."""
    if backend == "onnx":
        return OnnxEmbedder(path, providers)
    if backend == "torch":
        return TorchEmbedder(path, device, dtype)
    raise UMOError(f"embedder backend '{backend}' is unknown; choose one of {', '.join(BACKENDS)}")
