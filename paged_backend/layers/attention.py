"""The attention-backend interface and the batch metadata every backend reads.

A backend writes the new tokens' K/V into the paged cache and attends each
new query token over its sequence's cached context (causal on the new
tokens). The same interface serves prefill, chunked prefill, prefix-cache
hits and decode in one mixed batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Where each new token of a step lives; built once per step by the runner.

    Tokens of all scheduled sequences are flattened in batch order.
    `query_start_loc[i]:query_start_loc[i+1]` are sequence i's new tokens;
    they sit at positions `seq_lens[i] - query_len_i .. seq_lens[i] - 1`.
    `slot_mapping[t] = block_id * block_size + offset` (-1: padding, skipped).
    `block_tables[i]` lists sequence i's blocks (padded with 0).
    The `_cpu` lists are host copies for backends that loop or pad on the host.
    `backend_cache` lives for one step only, like the metadata itself.
    """

    num_tokens: int
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32, cached + new tokens
    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [B, max_blocks] int32
    max_query_len: int
    max_seq_len: int
    block_size: int
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    # Split count of the decode kernel, fixed when the step replays a CUDA graph (None: per step).
    decode_num_splits: Optional[int] = None
    # Per-step scratch of a backend (index tensors it builds at the first layer, reused by the rest).
    backend_cache: dict = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


class AttentionBackend(Protocol):
    """Computes paged attention for one layer."""

    name: str
    # True when forward() never reads device values on the host, so steps can be graph-captured.
    graph_capturable: bool

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D]; kv_cache: [2, num_blocks, block_size, Hkv, D].

        Writes k, v into kv_cache at `meta.slot_mapping`, then returns the
        attention output [T, Hq, D] (Hq a multiple of Hkv: grouped queries).
        """
        ...

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float) -> torch.Tensor:
        """`forward` for a layer that has already written this step's k, v into kv_cache.

        Optional: a layer falls back to `forward` for a backend without it."""
        ...
