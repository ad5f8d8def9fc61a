"""CUDA graphs of one sequence's prefill (or prompt chunk), one per token-count bucket.

A short prompt's eager forward is bound by the host: each of a few hundred
kernel launches costs tens of microseconds of Python (a 128-token Qwen3-0.6B
prefill took 12 ms on an H100 for ~1.5 ms of GPU work). Steps that run one
sequence with 2..`max_tokens` new tokens (a prompt, a prompt chunk or the rest
of a prompt after a prefix-cache hit) instead replay the graph of the smallest
bucket `T >= ` their token count; rows past the real tokens are padding (token
0 at position 0, slot -1: no KV write) whose outputs are ignored.

Each bucket's graph reads its inputs from static buffers laid out as the
runner's eager step lays out its own (so one host->device copy each fills them):

- `i64` int64: token ids `[0, T)`, positions `[T, 2T)`, KV slots `[2T, 3T)`,
  then the step's extra index rows (pending-token gather, sampled rows);
- `i32` int32: `query_start_loc` `[0, 2)` (`[0, L]` for L real tokens),
  `seq_lens` at `[16, 17)`, the block table row at `[32, 32 + max_blocks)`.

The extend-attention kernel's grid depends only on the bucket (`max_query_len
= T`); everything that varies per step (lengths, the cached prefix, slots) is
read from the buffers, so one graph serves any prefix. Buckets: 16, 32, 64,
then multiples of 64 up to `max_tokens`; all share one memory pool with the
decode graphs.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from paged_backend.layers.attention import AttentionMetadata
from paged_backend.runner.graph_capture import capture_buckets

SEQ_LENS_OFFSET = 16  # int32 offsets in `i32`, as the runner's eager layout places them
BLOCK_TABLE_OFFSET = 32
DEFAULT_MAX_TOKENS = 512


def token_buckets(max_tokens: int) -> list[int]:
    """16, 32, 64, then every 64 up to `max_tokens` (rounded up to a multiple of 16)."""
    top = max(16, -(-max_tokens // 16) * 16)
    sizes = [t for t in (16, 32) if t < top] + list(range(64, top, 64)) + [top]
    return sorted(set(sizes))


class PrefillGraphs:
    """Captured one-sequence prefill graphs and the static buffers they read."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], *,
                 max_tokens: int, max_blocks_per_seq: int, block_size: int,
                 max_model_len: int, device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.device = device
        self.buckets = token_buckets(max_tokens)
        self.max_tokens = self.buckets[-1]
        # Block-table width: a multiple of 16, as in the runner's eager layout.
        self.max_blocks = -(-max_blocks_per_seq // 16) * 16
        self.i64 = torch.zeros(7 * self.max_tokens, dtype=torch.int64, device=device)
        self.i32 = torch.zeros(BLOCK_TABLE_OFFSET + self.max_blocks, dtype=torch.int32,
                               device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}

    def bucket(self, num_tokens: int) -> Optional[int]:
        """The smallest bucket >= `num_tokens`, or None when there is none."""
        for t in self.buckets:
            if t >= num_tokens:
                return t
        return None

    def _views(self, t: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        i32 = self.i32
        meta = AttentionMetadata(
            num_tokens=t, query_start_loc=i32[:2],
            seq_lens=i32[SEQ_LENS_OFFSET:SEQ_LENS_OFFSET + 1],
            slot_mapping=self.i64[2 * t:3 * t],
            block_tables=i32[BLOCK_TABLE_OFFSET:].view(1, self.max_blocks),
            max_query_len=t, max_seq_len=self.max_model_len, block_size=self.block_size,
            query_start_loc_cpu=[0, t], seq_lens_cpu=[t])
        return self.i64[:t], self.i64[t:2 * t], meta

    def _padding_inputs(self, t: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """t tokens of a fresh sequence, nothing written to the cache: what a capture runs on."""
        self.i64.zero_()
        self.i64[2 * t:3 * t].fill_(-1)
        self.i32.zero_()
        self.i32[1] = t
        self.i32[SEQ_LENS_OFFSET] = t
        return self._views(t)

    def capture(self, pool: Any = None) -> Any:
        """Warm up and capture every bucket (largest first) into `pool` (a new one when None);
        returns the pool."""
        self._graphs, self._outputs, pool = capture_buckets(
            self.model, self.kv_caches, self.device, self.buckets, self._padding_inputs,
            f"prefill graphs (up to {self.max_tokens} tokens)", pool)
        return pool

    def replay(self, bucket: int) -> torch.Tensor:
        """Replay bucket `bucket` on the current buffers; returns hidden states `[bucket, H]`."""
        self._graphs[bucket].replay()
        return self._outputs[bucket]
