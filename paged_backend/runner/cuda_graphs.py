"""CUDA graphs of decode steps, one per batch-size bucket, captured at start-up.

A decode step (one new token per sequence) launches a few hundred small
kernels; replaying them as one graph removes the per-kernel launch cost.
Each bucket's graph reads its inputs from static device buffers:

- `i64`: one flat int64 buffer; a bucket `b` reads token ids from `[0, b)`,
  positions from `[b, 2b)` and KV slots from `[2b, 3b)`, so one host->device
  copy of `3b` values fills all three;
- `seq_lens` `[max_bs]` int32 and `block_tables` `[max_bs, max_blocks]` int32.

A step with `B` sequences replays the smallest bucket `b >= B`; rows `B..b`
are padding (slot -1: no KV write; seq_len 0: zero attention output) and
their hidden states are ignored. The decode kernel's split count is fixed
per bucket (its grid is part of the graph). All buckets share one memory
pool (with the prefill graphs), captured from the largest down
(runner/graph_capture.py); the output of a replay stays valid until the next
replay.
"""

from __future__ import annotations

from typing import Any

import torch

from paged_backend.layers.attention import AttentionMetadata
from paged_backend.runner.graph_capture import capture_buckets


def batch_size_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to `max_batch_size` (which is always included)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    sizes.append(max_batch_size)
    return sorted(set(sizes))


class DecodeGraphs:
    """Captured decode graphs and the static buffers they read."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], *,
                 max_batch_size: int, max_blocks_per_seq: int, block_size: int,
                 max_model_len: int, num_kv_heads: int, device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.num_kv_heads = num_kv_heads
        self.device = device
        self.buckets = batch_size_buckets(max_batch_size)
        self.max_batch_size = self.buckets[-1]
        mb = self.max_batch_size
        # ids, positions, slots, then room for the step's extra index rows (pending-token
        # gather, sampled rows), which the runner copies in the same transfer.
        self.i64 = torch.zeros(7 * mb, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(mb, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((mb, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(mb + 1, dtype=torch.int32, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}

    def bucket(self, batch_size: int) -> int:
        """The smallest captured batch size >= `batch_size`."""
        for b in self.buckets:
            if b >= batch_size:
                return b
        raise ValueError(f"batch size {batch_size} exceeds the largest graph ({self.max_batch_size})")

    def num_splits(self, bucket: int) -> int:
        from paged_backend.kernels.decode_attention import choose_num_splits
        return choose_num_splits(bucket, self.num_kv_heads, self.max_model_len)

    def _views(self, b: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        ids, pos, slots = self.i64[:b], self.i64[b:2 * b], self.i64[2 * b:3 * b]
        meta = AttentionMetadata(
            num_tokens=b, query_start_loc=self.query_start_loc[:b + 1],
            seq_lens=self.seq_lens[:b], slot_mapping=slots, block_tables=self.block_tables[:b],
            max_query_len=1, max_seq_len=self.max_model_len, block_size=self.block_size,
            query_start_loc_cpu=list(range(b + 1)), seq_lens_cpu=[0] * b,
            decode_num_splits=self.num_splits(b))
        return ids, pos, meta

    def _padding_inputs(self, b: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Token 0 at position 0, no KV write, empty contexts: what a capture runs on."""
        self.i64[:3 * b].zero_()
        self.i64[2 * b:3 * b].fill_(-1)
        self.seq_lens.zero_()
        return self._views(b)

    def capture(self, pool: Any = None) -> Any:
        """Warm up and capture every bucket (largest first) into `pool` (a new one when None);
        returns the pool."""
        self._graphs, self._outputs, pool = capture_buckets(
            self.model, self.kv_caches, self.device, self.buckets, self._padding_inputs,
            f"decode graphs (batch sizes up to {self.max_batch_size})", pool)
        return pool

    def replay(self, bucket: int) -> torch.Tensor:
        """Replay bucket `bucket` on the current buffers; returns hidden states `[bucket, H]`."""
        self._graphs[bucket].replay()
        return self._outputs[bucket]

    def stats(self) -> dict[str, Any]:
        return {"num_graphs": len(self._graphs), "max_batch_size": self.max_batch_size}
