"""RMSNorm, computed in float32 as HF Llama does, optionally fused with the residual add."""

from __future__ import annotations

from typing import Optional, Union

import torch

from paged_backend.layers import fused_kernels


class RMSNorm(torch.nn.Module):
    """`weight * x / sqrt(mean(x^2) + eps)` over the last dimension.

    `forward(x)` returns the normalized `x`; `forward(x, residual)` adds first:
    `s = x + residual`, returns `(norm(s), s)`. On CUDA (see `fused_kernels`)
    one Triton kernel does both, writing `s` into `residual` IN PLACE and
    returning that tensor; the torch path leaves its inputs untouched.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if x.dtype == self.weight.dtype and fused_kernels.use_fused_kernels(x):
            return self._forward_kernel(x, residual)
        if residual is None:
            return self._norm(x)
        s = x + residual
        return self._norm(s), s

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(input_dtype)

    def _forward_kernel(self, x: torch.Tensor, residual: Optional[torch.Tensor]
                        ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        from paged_backend.kernels.rms_norm import rms_norm

        hidden = x.shape[-1]
        x2d = x.reshape(-1, hidden)
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        if residual is None:
            return rms_norm(x2d, self.weight, self.eps).view(x.shape)
        # A view, so the kernel's in-place update reaches the caller's tensor.
        out = rms_norm(x2d, self.weight, self.eps, residual.view(-1, hidden))
        return out.view(x.shape), residual

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
