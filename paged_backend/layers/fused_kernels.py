"""Whether a layer runs its fused Triton kernel or its plain-torch path.

The kernels (`paged_backend.kernels.rms_norm`, `.rotary`, `.activation`) serve
CUDA tensors when triton imports; set PAGED_BACKEND_FUSED_KERNELS=0 to force
the torch path everywhere. Layers import the kernels lazily, on first use.
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
