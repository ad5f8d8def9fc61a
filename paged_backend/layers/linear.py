"""Linear layers that load their weights shard by shard from HF checkpoints.

Named for the tensor-parallel split they will get: a column-parallel layer's
output features (and each fused shard, e.g. q/k/v or gate/up) would be split
across ranks, a row-parallel layer's input features would be split and its
output all-reduced. Today the world size is 1: no split, no reduce.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from . import fused_kernels


def apply_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 packed: torch.Tensor | None, stream_max_tokens: int = 0,
                 skinny_max_tokens: int = 0) -> torch.Tensor:
    """`x W^T + b`: through oneDNN's prepacked weight when there is one (CPU float32, 2-D x),
    through the CUDA `stream_gemm` for at most `stream_max_tokens` rows where it takes the
    call (`fused_kernels.use_stream_gemm`), else through the Triton skinny GEMM for more
    than `stream_max_tokens` and at most `skinny_max_tokens` rows where it takes the call
    (`fused_kernels.use_skinny_plain`), else `F.linear`."""
    if packed is not None and x.dim() == 2 and x.dtype == torch.float32 and not x.requires_grad:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    if x.is_cuda and fused_kernels.use_stream_gemm(x, weight, bias, max_tokens=stream_max_tokens):
        from paged_backend.kernels.stream_gemm import stream_gemm
        return stream_gemm(x, weight, bias)
    if (x.is_cuda and skinny_max_tokens
            and fused_kernels.use_skinny_plain(x, weight, bias, stream_max_tokens,
                                               skinny_max_tokens)):
        from paged_backend.kernels.skinny_gemm import skinny_gemm
        return skinny_gemm(x, weight, bias)
    return F.linear(x, weight, bias)


def default_weight_loader(param: torch.nn.Parameter, loaded: torch.Tensor) -> None:
    """Copy a checkpoint tensor into `param`, checking the shape."""
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)}, "
                         f"checkpoint {tuple(loaded.shape)}")
    with torch.no_grad():
        param.copy_(loaded)


class ColumnParallelLinear(torch.nn.Module):
    """`y = x W^T + b`; W's rows are the concatenation of `output_sizes` shards.

    Each shard loads from its own checkpoint tensor with
    `weight_loader(param, tensor, shard_id)`; `shard_id=None` loads the whole. With
    `skinny=True` (the attention's QKV projection) CUDA forwards just too large for
    `stream_gemm` run the Triton skinny GEMM (`fused_kernels.SKINNY_COLUMN_MAX_TOKENS`).
    """

    def __init__(self, input_size: int, output_sizes: int | Sequence[int], bias: bool = False,
                 skinny: bool = False) -> None:
        super().__init__()
        self.skinny = skinny
        sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        self.input_size = input_size
        self.output_sizes = sizes
        self.weight = torch.nn.Parameter(torch.empty(sum(sizes), input_size))
        self.bias = torch.nn.Parameter(torch.empty(sum(sizes))) if bias else None
        self.packed: torch.Tensor | None = None  # set by layers.cpu_prepack
        for p in self.parameters():
            p.weight_loader = self.weight_loader

    def weight_loader(self, param: torch.nn.Parameter, loaded: torch.Tensor,
                      shard_id: int | None = None) -> None:
        """Load the whole parameter, or the rows of shard `shard_id`."""
        if shard_id is None:
            default_weight_loader(param, loaded)
            return
        offset = sum(self.output_sizes[:shard_id])
        default_weight_loader(param.narrow(0, offset, self.output_sizes[shard_id]), loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_linear(x, self.weight, self.bias, self.packed,
                            fused_kernels.STREAM_GEMM_MAX_TOKENS,
                            fused_kernels.SKINNY_COLUMN_MAX_TOKENS if self.skinny else 0)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_sizes}, bias={self.bias is not None}"


class RowParallelLinear(torch.nn.Module):
    """`y = x W^T + b` whose input features would be split across ranks."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size))
        self.bias = torch.nn.Parameter(torch.empty(output_size)) if bias else None
        self.packed: torch.Tensor | None = None  # set by layers.cpu_prepack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_linear(x, self.weight, self.bias, self.packed,
                            fused_kernels.STREAM_GEMM_ROW_MAX_TOKENS)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}"
