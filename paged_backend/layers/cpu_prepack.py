"""oneDNN weight prepacking for the CPU float32 path.

At decode batch sizes a CPU linear layer is bound by how fast it streams its
weight. oneDNN's prepacked (blocked) layout streams it 1.5-1.7x faster than
`F.linear` on the same float32 weight (measured on the CI machine's AMD EPYC:
[16, 576] x [576, 3072] 1.04 ms -> 0.60 ms). The packed copy is made once,
after the weights are loaded; the plain weight stays for loading and export.
Set PAGED_BACKEND_CPU_PREPACK=0 to turn it off.
"""

from __future__ import annotations

import logging
import os

import torch

from paged_backend.layers.linear import ColumnParallelLinear, RowParallelLinear

logger = logging.getLogger(__name__)

PREPACK_ENV = "PAGED_BACKEND_CPU_PREPACK"


def prepack_available() -> bool:
    """Whether this torch build has oneDNN's linear prepacking (checked with a tiny call)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 2), 1)
        torch.ops.mkldnn._linear_pointwise(torch.ones(1, 2), w, None, "none", [], "")
    except (RuntimeError, AttributeError):
        return False
    return True


def prepack_cpu_linears(model: torch.nn.Module, batch_size_hint: int = 16) -> int:
    """Give every CPU float32 linear layer of `model` a prepacked weight; returns how many.

    Call again after changing the weights: the packed copies do not follow them.
    """
    if os.environ.get(PREPACK_ENV, "1") == "0" or not prepack_available():
        return 0
    n = 0
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (ColumnParallelLinear, RowParallelLinear)):
                w = mod.weight
                if w.device.type == "cpu" and w.dtype == torch.float32:
                    mod.packed = torch.ops.mkldnn._reorder_linear_weight(
                        w.detach().contiguous(), batch_size_hint)
                    n += 1
    logger.info("prepacked %d linear layers for oneDNN", n)
    return n
