"""Plain-torch paged attention: the CPU path and the reference for GPU kernels.

Sequences are padded to `[B, max_query_len]` queries and `[B, max_seq_len]`
context keys gathered through their block tables, and attended with one
masked `scaled_dot_product_attention` per group (decode and prefill
sequences padded apart). Half dtypes are computed in float32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from paged_backend.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Copy new keys/values `[T, Hkv, D]` into `kv_cache` at `slot_mapping` (slot -1: skipped)."""
    num_kv_heads, head_dim = kv_cache.shape[-2], kv_cache.shape[-1]
    k_flat = kv_cache[0].view(-1, num_kv_heads, head_dim)
    v_flat = kv_cache[1].view(-1, num_kv_heads, head_dim)
    slots = slot_mapping[: k.shape[0]].to(device=k.device, dtype=torch.long)
    valid = slots >= 0
    if not bool(valid.all()):
        slots, k, v = slots[valid], k[valid], v[valid]
    k_flat.index_copy_(0, slots, k.to(kv_cache.dtype))
    v_flat.index_copy_(0, slots, v.to(kv_cache.dtype))


@dataclass(slots=True)
class _Group:
    """Layer-invariant index tensors for one padded group of sequences (built once per step)."""

    batch: int
    max_q: int
    max_seq: int
    rows: Optional[torch.Tensor]  # [B * max_q] token index of each padded query (None: identity)
    valid_rows: Optional[torch.Tensor]  # [B * max_q] bool: which padded queries are real
    out_rows: Optional[torch.Tensor]  # token indices of the real queries, in padded order
    slots: torch.Tensor  # [B * max_seq] flat cache slot of each context position
    invalid: Optional[torch.Tensor]  # indices into `slots` past a sequence's end (None: none)
    visible: torch.Tensor  # [B, 1, max_q, max_seq] bool: key visible to the query


class TorchAttentionBackend:
    """`AttentionBackend` in plain torch: padded batch, one masked SDPA call per group.

    Decode sequences (one new token) and the others are padded separately, so
    a long prefill does not pad every decode query to its length. The index
    tensors of a step are built at the first layer and kept on the metadata.
    """

    name = "torch"
    graph_capturable = False  # reads the step's host lists and syncs per layer

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D]; kv_cache: [2, num_blocks, block_size, Hkv, D].

        Writes k, v into the cache, then returns the attention output [T, Hq, D].
        """
        write_kv_cache(k, v, kv_cache, meta.slot_mapping)
        return self.attend(q, kv_cache, meta, scale)

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float) -> torch.Tensor:
        """Causal attention of the new queries over each sequence's cached context."""
        groups = meta.backend_cache.get(self.name)
        if groups is None:
            groups = meta.backend_cache[self.name] = self._plan(meta, q.device)
        if len(groups) == 1 and groups[0].rows is None:
            return self._attend_group(q, kv_cache, groups[0], scale)
        out = torch.empty_like(q)
        for g in groups:
            out[g.out_rows] = self._attend_group(q, kv_cache, g, scale)
        return out

    @staticmethod
    def _plan(meta: AttentionMetadata, device: torch.device) -> list[_Group]:
        qsl = meta.query_start_loc_cpu
        q_lens = [qsl[i + 1] - qsl[i] for i in range(meta.num_seqs)]
        decodes = [i for i, n in enumerate(q_lens) if n == 1]
        prefills = [i for i, n in enumerate(q_lens) if n > 1]
        block_tables = meta.block_tables.to(device=device, dtype=torch.long)
        groups = []
        for seqs in (decodes, prefills):
            if not seqs:
                continue
            batch = len(seqs)
            lens = [q_lens[i] for i in seqs]
            ctx = [meta.seq_lens_cpu[i] for i in seqs]
            max_q, max_seq = max(lens), max(ctx)
            q_start = torch.tensor([qsl[i] for i in seqs], device=device)
            q_len_t = torch.tensor(lens, device=device)
            seq_lens = torch.tensor(ctx, device=device)
            tables = block_tables if batch == meta.num_seqs else \
                block_tables[torch.tensor(seqs, device=device)]
            j = torch.arange(max_q, device=device)
            q_valid = j[None, :] < q_len_t[:, None]
            tok_idx = torch.where(q_valid, q_start[:, None] + j[None, :], 0)
            q_pos = (seq_lens - q_len_t)[:, None] + j[None, :]
            slots, k_valid = context_slots(tables, seq_lens, meta.block_size, max_seq)
            k_pos = torch.arange(max_seq, device=device)
            visible = (k_pos[None, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]
            identity = max_q == 1 and seqs == list(range(meta.num_seqs))
            groups.append(_Group(
                batch, max_q, max_seq,
                rows=None if identity else tok_idx.flatten(),
                valid_rows=None if identity else q_valid.flatten(),
                out_rows=None if identity else tok_idx[q_valid],
                slots=slots.flatten(),
                invalid=None if bool(k_valid.all()) else torch.nonzero(~k_valid.flatten()).flatten(),
                visible=visible[:, None]))
        return groups

    @staticmethod
    def _attend_group(q: torch.Tensor, kv_cache: torch.Tensor, g: _Group,
                      scale: float) -> torch.Tensor:
        """Attention output of the group's real queries, in padded order: [n, Hq, D]."""
        _, num_q_heads, head_dim = q.shape
        num_kv_heads = kv_cache.shape[-2]
        group = num_q_heads // num_kv_heads
        b, max_q, max_seq = g.batch, g.max_q, g.max_seq
        compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        k_flat = kv_cache[0].view(-1, num_kv_heads, head_dim)
        v_flat = kv_cache[1].view(-1, num_kv_heads, head_dim)
        # [B, Hkv, max_seq, D]; index_select is much faster than advanced indexing on CPU.
        keys = k_flat.index_select(0, g.slots)
        values = v_flat.index_select(0, g.slots)
        if g.invalid is not None:
            # Slots past a sequence's end may hold anything, even NaN: 0 * NaN would leak.
            keys.index_fill_(0, g.invalid, 0.0)
            values.index_fill_(0, g.invalid, 0.0)
        keys = keys.view(b, max_seq, num_kv_heads, head_dim).to(compute_dtype).transpose(1, 2)
        values = values.view(b, max_seq, num_kv_heads, head_dim).to(compute_dtype).transpose(1, 2)

        qs = q if g.rows is None else q.index_select(0, g.rows)
        queries = qs.view(b, max_q, num_q_heads, head_dim).to(compute_dtype).transpose(1, 2)
        # Query head h reads KV head h // group (enable_gqa), as in transformers.
        ctx = F.scaled_dot_product_attention(queries, keys, values, attn_mask=g.visible,
                                             scale=scale, enable_gqa=group > 1)
        ctx = ctx.transpose(1, 2).reshape(b * max_q, num_q_heads, head_dim).to(q.dtype)
        return ctx if g.valid_rows is None else ctx[g.valid_rows]


def context_slots(block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                  max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat cache slots `[B, max_seq_len]` of each sequence's context, and their validity mask."""
    pos = torch.arange(max_seq_len, device=block_tables.device)
    # Columns past the table's width only occur at invalid positions: clamp them.
    col = (pos // block_size).clamp(max=block_tables.shape[1] - 1)
    slots = block_tables[:, col] * block_size + pos % block_size
    valid = pos[None, :] < seq_lens[:, None]
    return slots, valid
