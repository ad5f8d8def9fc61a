"""Triton RMSNorm, optionally fused with the residual add that precedes it.

Numerics follow HF's LlamaRMSNorm: the row is normalized in float32, rounded
to the input dtype, then multiplied by the weight (in float32, rounded once;
for a weight of the input dtype that is exactly torch's product). With a
residual, `s = x + residual` is rounded to the input dtype first (HF adds in
the model dtype), written back into `residual` and normalized.

Grid: one program per row; the whole row sits in one tile (hidden sizes up
to `MAX_HIDDEN`). No host sync, so the launch can be captured in a CUDA graph.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .pdl import launch_kwargs, pdl_enabled, pdl_wait

MAX_HIDDEN = 65536


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr,
    stride_x, stride_r, stride_o,
    eps,
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr,
):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(res_ptr + row * stride_r + offs, x, mask=mask)
    xf = x.to(tl.float32)
    mean_sq = tl.sum(xf * xf, axis=0) / HIDDEN
    y = (xf * tl.math.rsqrt(mean_sq + eps)).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (y * w).to(out_ptr.dtype.element_ty), mask=mask)


def _num_warps(block: int) -> int:
    return max(1, min(16, block // 512))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RMSNorm of the rows of `x` `[N, H]`; returns a new contiguous `[N, H]` tensor in x's dtype.

    `x` may have any row stride (last dim contiguous). With `residual` (`[N, H]`,
    x's dtype, last dim contiguous), `s = x + residual` (rounded to the dtype)
    is written into `residual` IN PLACE and `norm(s)` is returned.
    """
    assert x.dim() == 2 and x.stride(1) == 1, "x must be [N, H] with a contiguous last dim"
    num_rows, hidden = x.shape
    assert weight.shape == (hidden,) and weight.stride(0) == 1, (weight.shape, x.shape)
    assert hidden <= MAX_HIDDEN, f"hidden size {hidden} > {MAX_HIDDEN}"
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype, (residual.shape, x.shape)
        assert residual.stride(1) == 1, "residual must have a contiguous last dim"
    out = torch.empty((num_rows, hidden), dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out
    block = triton.next_power_of_2(hidden)
    res = residual if residual is not None else x
    pdl = pdl_enabled(x)
    _rms_norm_kernel[(num_rows,)](
        x, res, weight, out,
        x.stride(0), res.stride(0), out.stride(0),
        float(eps),
        HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None, PDL=pdl,
        num_warps=_num_warps(block), **launch_kwargs(pdl),
    )
    return out


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: Optional[torch.Tensor] = None):
    """Plain-torch `rms_norm` with HF's numerics; never mutates its inputs.

    Returns `out` without a residual, else `(out, s)` with `s = x + residual`.
    `x` may have any leading dims (normalized over the last).
    """
    if residual is not None:
        s = x + residual
        return rms_norm_ref(s, weight, eps), s
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * y.to(x.dtype)).to(x.dtype)
