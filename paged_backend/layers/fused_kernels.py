"""Whether a layer runs its fused Triton kernel or its plain-torch path.

The kernels (`paged_backend.kernels.rms_norm`, `.rotary`, `.activation`) serve
CUDA tensors when triton imports; set PAGED_BACKEND_FUSED_KERNELS=0 to force
the torch path everywhere. Layers import the kernels lazily, on first use.

The small-batch path (`paged_backend.kernels.skinny_gemm`: GEMMs with the RMSNorm,
SiLU-and-mul and residual add fused in) is opt-in with PAGED_BACKEND_SKINNY_GEMM=1
until it has been measured against cuBLAS on the GPU.
"""

from __future__ import annotations

import functools
import os

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
# Largest number of tokens in a forward that takes the skinny-GEMM path.
SKINNY_MAX_TOKENS = 16


def use_skinny_gemm(x: torch.Tensor) -> bool:
    """True for a CUDA batch of at most SKINNY_MAX_TOKENS tokens when the path is switched on."""
    return (x.shape[0] <= SKINNY_MAX_TOKENS and os.environ.get(SKINNY_GEMM_ENV, "0") == "1"
            and use_fused_kernels(x))
