"""The capture loop of the decode and prefill CUDA graphs: one graph per bucket.

For each bucket, largest first (so the smaller graphs' allocations fit in what
the larger ones freed), the owner fills its static buffers with padding inputs,
the model runs twice outside the capture (kernels compile, the allocator
settles), then once inside it, on a side stream, into one memory pool. Graphs
that share a pool must not run concurrently, and a replay's output is valid
until the next replay of any of them: the runner replays them on one stream
and consumes each output in the same step.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable

import torch

from paged_backend.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)

# bucket -> (token ids, positions, metadata) over the owner's static buffers, padding filled in
PaddingInputs = Callable[[int], tuple[torch.Tensor, torch.Tensor, AttentionMetadata]]


@torch.inference_mode()
def capture_buckets(model: torch.nn.Module, kv_caches: list[torch.Tensor], device: torch.device,
                    buckets: Iterable[int], padding_inputs: PaddingInputs, label: str,
                    pool: Any = None
                    ) -> tuple[dict[int, torch.cuda.CUDAGraph], dict[int, torch.Tensor], Any]:
    """Capture `model`'s forward for every bucket into `pool` (a new one when None).

    Returns the graphs, their output tensors (hidden states, rewritten by each replay) and
    the pool, which later captures may share. `label` names them in the log line."""
    t0 = time.perf_counter()
    free_before = torch.cuda.mem_get_info(device)[0]
    pool = pool if pool is not None else torch.cuda.graph_pool_handle()
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    outputs: dict[int, torch.Tensor] = {}
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for b in sorted(buckets, reverse=True):
            ids, pos, meta = padding_inputs(b)
            for _ in range(2):  # compile and settle the allocator outside the capture
                model(ids, pos, kv_caches, meta)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                outputs[b] = model(ids, pos, kv_caches, meta)
            graphs[b] = graph
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    used = free_before - torch.cuda.mem_get_info(device)[0]
    logger.info("captured %d %s in %.1f s, %.0f MiB", len(graphs), label,
                time.perf_counter() - t0, used / 2**20)
    return graphs, outputs, pool
