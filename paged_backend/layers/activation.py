"""Gated activations of a fused gate/up projection output."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from paged_backend.layers import fused_kernels


class SiluAndMul(torch.nn.Module):
    """`silu(x[..., :I]) * x[..., I:]` for x `[..., 2*I]`.

    One Triton kernel on CUDA (float32 math, rounded once; see `fused_kernels`),
    else `F.silu(gate) * up` in x's dtype, as HF's Llama MLP computes it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_kernels.use_fused_kernels(x):
            from paged_backend.kernels.activation import silu_and_mul

            x2d = x.reshape(-1, x.shape[-1])
            if x2d.stride(-1) != 1:
                x2d = x2d.contiguous()
            return silu_and_mul(x2d).view(*x.shape[:-1], x.shape[-1] // 2)
        gate, up = x.split(x.shape[-1] // 2, dim=-1)
        return F.silu(gate) * up
