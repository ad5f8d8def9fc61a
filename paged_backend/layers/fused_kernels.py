"""Whether a layer runs its fused Triton kernel or its plain-torch path.

The kernels (`paged_backend.kernels.rms_norm`, `.rotary`, `.activation`) serve
CUDA tensors when triton imports; set PAGED_BACKEND_FUSED_KERNELS=0 to force
the torch path everywhere. Layers import the kernels lazily, on first use.

The one-token path (`paged_backend.kernels.skinny_gemm`: four GEMMs per layer with the
RMSNorm, SiLU-and-mul and residual adds fused in) runs forwards of SKINNY_MAX_TOKENS
tokens on CUDA; larger forwards up to SKINNY_SILU_MAX_TOKENS tokens run only their gate/up
projection on it, SiLU-and-mul fused, and up to SKINNY_COLUMN_MAX_TOKENS their QKV projection
(`use_skinny_plain`). PAGED_BACKEND_SKINNY_GEMM=0 turns all of these off (cuBLAS and
separate kernels). On Hopper, `one_token_gemm` hands the one-token GEMMs whose weights
fit to the CUDA `stream_gemv` (PAGED_BACKEND_STREAM_GEMV=0 keeps them on Triton).
Small forwards run their projections on the CUDA `stream_gemm` where it takes them
(`use_stream_gemm`, called by the linear layers and the MLP's fused gate/up;
PAGED_BACKEND_STREAM_GEMM=0 keeps cuBLAS and the Triton skinny GEMM).
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

FUSED_KERNELS_ENV = "PAGED_BACKEND_FUSED_KERNELS"


@functools.cache
def triton_available() -> bool:
    """Whether triton imports (checked once)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_fused_kernels(x: torch.Tensor) -> bool:
    """True when `x` is a CUDA tensor, triton imports and PAGED_BACKEND_FUSED_KERNELS is not "0"."""
    return x.is_cuda and os.environ.get(FUSED_KERNELS_ENV, "1") != "0" and triton_available()


SKINNY_GEMM_ENV = "PAGED_BACKEND_SKINNY_GEMM"
# Largest number of tokens in a forward that takes the skinny-GEMM path. On the H100 the
# fused kernels beat cuBLAS + separate norm / SiLU kernels at one row; at 8 rows the tl.dot
# variants with a norm or SiLU prologue are slower (benchmarks/skinny_gemm.py).
SKINNY_MAX_TOKENS = 1


def use_skinny_gemm(x: torch.Tensor) -> bool:
    """True for a CUDA batch of at most SKINNY_MAX_TOKENS tokens unless switched off."""
    return (x.shape[0] <= SKINNY_MAX_TOKENS and os.environ.get(SKINNY_GEMM_ENV, "1") != "0"
            and use_fused_kernels(x))


def one_token_gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   **kwargs) -> torch.Tensor:
    """`skinny_gemm(x, weight, bias, **kwargs)` for a one-token forward, run by `stream_gemv`
    where it takes the call (it streams the weights in before the previous kernel ends).

    `exclusive` and `trigger_early` (keywords, default False) are `stream_gemv`'s: one
    program per SM, and the next kernel launched as this one starts; the Triton kernel
    has no use for them."""
    from paged_backend.kernels.stream_gemv import stream_gemv, stream_gemv_supported
    exclusive = kwargs.pop("exclusive", False)
    trigger_early = kwargs.pop("trigger_early", False)
    if stream_gemv_supported(x, weight, kwargs.get("silu_mul", False),
                             kwargs.get("norm_weight"), bias, kwargs.get("add_to")):
        return stream_gemv(x, weight, bias, exclusive=exclusive,
                           trigger_early=trigger_early, **kwargs)
    from paged_backend.kernels.skinny_gemm import skinny_gemm
    return skinny_gemm(x, weight, bias, **kwargs)


# Largest forward whose gate/up projection runs as a skinny GEMM with SiLU-and-mul in its
# epilogue (the norm before it stays a separate kernel), and the largest such weight: on the
# H100, Qwen3-0.6B's 12 MB gate/up at 2-64 rows beats cuBLAS plus the SiLU kernel (bench-64
# +0.4-1.3%, BENCHMARKS.md); Llama-3-8B's 235 MB one streams near peak on cuBLAS,
# where the launch saved is noise (bench-256 8,112 vs 8,156 tok/s), so it stays there. The
# cap sits well below Llama-3.2-1B's 64 MB gate/up, which was not measured.
SKINNY_SILU_MAX_TOKENS = 64  # the skinny GEMM's MAX_M
SKINNY_SILU_MAX_WEIGHT_BYTES = 32 << 20


def use_skinny_silu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True for a 2-D, row-major bf16/fp16 CUDA batch of at most SKINNY_SILU_MAX_TOKENS rows
    and a gate/up `weight` of x's dtype and at most SKINNY_SILU_MAX_WEIGHT_BYTES, unless
    switched off (anything else keeps cuBLAS; float32 was never timed on this path)."""
    return (x.dim() == 2 and x.shape[0] <= SKINNY_SILU_MAX_TOKENS and x.stride(-1) == 1
            and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and weight.numel() * weight.element_size() <= SKINNY_SILU_MAX_WEIGHT_BYTES
            and os.environ.get(SKINNY_GEMM_ENV, "1") != "0" and use_fused_kernels(x))


STREAM_GEMM_ENV = "PAGED_BACKEND_STREAM_GEMM"
# Largest forwards that take `stream_gemm`: column-parallel projections (QKV, gate/up) and
# row-parallel ones (o, down: each program reads more of x than of its weight). On the H100
# (decode-graph replays, BENCHMARKS.md) both beat cuBLAS and the skinny GEMM in place at
# 8-32 rows (row-parallel ones with 16 warps a program: the step at 32 rows -2.0%) and lose
# at 64 (row-parallel ones +84 us a step with 16 warps, +330 with 8).
STREAM_GEMM_MAX_TOKENS = 32
STREAM_GEMM_ROW_MAX_TOKENS = 32


def use_stream_gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    silu_mul: bool = False, max_tokens: int = STREAM_GEMM_MAX_TOKENS) -> bool:
    """True where `stream_gemm` takes `x @ weight.T (+ bias)` (with SiLU-and-mul of a fused
    gate/up weight): a CUDA batch of 1 to `max_tokens` rows within the kernel's limits,
    unless PAGED_BACKEND_STREAM_GEMM is "0" or autograd would need the product (the kernel
    records no graph)."""
    if not (x.is_cuda and x.dim() == 2 and x.shape[0] <= max_tokens
            and os.environ.get(STREAM_GEMM_ENV, "1") != "0"):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (
            bias is not None and bias.requires_grad)):
        return False
    from paged_backend.kernels.stream_gemm import stream_gemm_supported
    return stream_gemm_supported(x, weight, silu_mul, bias)


# Largest forwards above STREAM_GEMM_MAX_TOKENS rows whose QKV projection (a
# `ColumnParallelLinear(..., skinny=True)`) runs as the Triton skinny GEMM with PDL instead
# of cuBLAS. On the H100 (decode-graph replays, BENCHMARKS.md, fourteenth session) that made
# the step at 64 rows 4.0% faster and at 48 5.5% (bench-64 +3%), though it beats cuBLAS by
# only ~1.3 us a call in isolation: its launch and first loads overlap the kernel before it,
# where cuBLAS's GEMM waits for that kernel to end, so it is taken only where kernels launch
# with PDL. o and down on it lost (+42 to +150 us a step at 32-64 rows), so row-parallel
# layers stay on cuBLAS. Weights over SKINNY_SILU_MAX_WEIGHT_BYTES (Llama-3-8B's 50 MB QKV)
# stay on cuBLAS too, as for gate/up: not measured there.
SKINNY_COLUMN_MAX_TOKENS = 64


def use_skinny_plain(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     above: int, max_tokens: int) -> bool:
    """True for a 2-D, row-major bf16/fp16 CUDA batch of more than `above` and at most
    `max_tokens` rows (and at most the skinny GEMM's 64) on a device where kernels launch
    with PDL, with a weight (and `[N]` bias) of x's dtype and device, the weight at most
    SKINNY_SILU_MAX_WEIGHT_BYTES, unless switched off or autograd would need the product
    (the kernel records no graph)."""
    if not (x.dim() == 2 and above < x.shape[0] <= min(max_tokens, SKINNY_SILU_MAX_TOKENS)
            and x.stride(-1) == 1 and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dim() == 2 and weight.dtype == x.dtype and weight.device == x.device
            and weight.stride(-1) == 1 and weight.shape[1] == x.shape[1]
            and weight.numel() * weight.element_size() <= SKINNY_SILU_MAX_WEIGHT_BYTES
            and (bias is None or (bias.shape == (weight.shape[0],) and bias.is_contiguous()
                                  and bias.dtype == x.dtype and bias.device == x.device))
            and os.environ.get(SKINNY_GEMM_ENV, "1") != "0" and use_fused_kernels(x)):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (
            bias is not None and bias.requires_grad)):
        return False
    from paged_backend.kernels.pdl import pdl_enabled
    return pdl_enabled(x)
