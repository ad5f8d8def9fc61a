"""Triton SiLU-and-multiply of a fused gate/up projection output.

`silu_and_mul(x)` for x `[T, 2*I]` (gate = `x[:, :I]`, up = `x[:, I:]`) returns
`silu(gate) * up` `[T, I]`, computed in float32 and rounded once. Grid: one
program per (token, block of columns). No host sync (CUDA-graph safe).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .pdl import launch_kwargs, pdl_enabled, pdl_wait

_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inter, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    x_row = x_ptr + row * stride_x
    gate = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + inter + offs, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`silu(x[:, :I]) * x[:, I:]` for x `[T, 2*I]` (any row stride, last dim contiguous).

    Returns a new contiguous `[T, I]` tensor in x's dtype.
    """
    assert x.dim() == 2 and x.stride(1) == 1, "x must be [T, 2*I] with a contiguous last dim"
    num_tokens, width = x.shape
    assert width % 2 == 0, f"last dim must be even, got {width}"
    inter = width // 2
    out = torch.empty((num_tokens, inter), dtype=x.dtype, device=x.device)
    if num_tokens == 0 or inter == 0:
        return out
    block = min(_BLOCK, triton.next_power_of_2(inter))
    pdl = pdl_enabled(x)
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
        x, out, x.stride(0), out.stride(0), inter,
        BLOCK=block, PDL=pdl, num_warps=4 if block >= 1024 else (2 if block >= 256 else 1),
        **launch_kwargs(pdl),
    )
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Plain-torch `silu_and_mul` with the kernel's numerics (float32, rounded once)."""
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)
