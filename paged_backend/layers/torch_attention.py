"""Plain-torch paged attention: the CPU path and the reference for GPU kernels.

Sequences are padded to `[B, max_query_len]` queries and `[B, max_seq_len]`
context keys gathered through their block tables, and attended with one
masked matmul + softmax (decode and prefill sequences padded apart). Half
dtypes are computed in float32.
"""

from __future__ import annotations

import logging

import torch

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


class TorchAttentionBackend:
    """`AttentionBackend` in plain torch: padded batch, one masked matmul per group.

    Decode sequences (one new token) and the others are padded separately, so
    a long prefill does not pad every decode query to its length.
    """

    name = "torch"

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
        out = torch.zeros_like(q)
        qsl = meta.query_start_loc_cpu
        q_lens = [qsl[i + 1] - qsl[i] for i in range(meta.num_seqs)]
        decodes = [i for i, n in enumerate(q_lens) if n == 1]
        prefills = [i for i, n in enumerate(q_lens) if n > 1]
        for seqs in (decodes, prefills):
            if seqs:
                self._attend_padded(q, kv_cache, meta, seqs, scale, out)
        return out

    @staticmethod
    def _attend_padded(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                       seqs: list[int], scale: float, out: torch.Tensor) -> None:
        """Attend sequences `seqs` as one padded batch; write their rows of `out`."""
        _, num_q_heads, head_dim = q.shape
        num_kv_heads = kv_cache.shape[-2]
        group = num_q_heads // num_kv_heads
        device = q.device
        batch = len(seqs)
        qsl = meta.query_start_loc_cpu
        q_start = torch.tensor([qsl[i] for i in seqs], device=device)
        q_lens = torch.tensor([qsl[i + 1] - qsl[i] for i in seqs], device=device)
        seq_lens = torch.tensor([meta.seq_lens_cpu[i] for i in seqs], device=device)
        max_q = int(max(qsl[i + 1] - qsl[i] for i in seqs))
        max_seq = int(max(meta.seq_lens_cpu[i] for i in seqs))
        block_tables = meta.block_tables.to(device=device, dtype=torch.long)
        if batch != meta.num_seqs:
            block_tables = block_tables[torch.tensor(seqs, device=device)]

        # Queries padded to [B, max_q]: token index, validity and absolute position.
        j = torch.arange(max_q, device=device)
        q_valid = j[None, :] < q_lens[:, None]
        tok_idx = torch.where(q_valid, q_start[:, None] + j[None, :], 0)
        q_pos = (seq_lens - q_lens)[:, None] + j[None, :]

        # Context keys/values gathered through the block tables: [B, max_seq, Hkv, D].
        slots, k_valid = context_slots(block_tables, seq_lens, meta.block_size, max_seq)
        k_flat = kv_cache[0].view(-1, num_kv_heads, head_dim)
        v_flat = kv_cache[1].view(-1, num_kv_heads, head_dim)
        compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        keys = k_flat[slots.flatten()].view(batch, max_seq, num_kv_heads, head_dim)
        values = v_flat[slots.flatten()].view(batch, max_seq, num_kv_heads, head_dim)
        # Slots past a sequence's end may hold garbage, even NaN: their scores are
        # masked below, but 0 * NaN in probs @ values would still be NaN.
        keys = keys.to(compute_dtype).transpose(1, 2)
        values = values.to(compute_dtype).masked_fill(~k_valid[:, :, None, None], 0.0).transpose(1, 2)

        # [B, Hkv, group * max_q, D] queries against [B, Hkv, max_seq, D] keys.
        queries = q[tok_idx.flatten()].view(batch, max_q, num_kv_heads, group, head_dim)
        queries = queries.to(compute_dtype).permute(0, 2, 3, 1, 4)
        queries = queries.reshape(batch, num_kv_heads, group * max_q, head_dim)

        scores = torch.matmul(queries, keys.transpose(-1, -2)).float() * scale
        scores = scores.view(batch, num_kv_heads, group, max_q, max_seq)
        # Key p is visible to query j when p <= its position and p < seq_len.
        k_pos = torch.arange(max_seq, device=device)
        visible = (k_pos[None, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]
        scores = scores.masked_fill(~visible[:, None, None, :, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(compute_dtype)
        probs = probs.view(batch, num_kv_heads, group * max_q, max_seq)

        ctx = torch.matmul(probs, values)  # [B, Hkv, group * max_q, D]
        ctx = ctx.view(batch, num_kv_heads, group, max_q, head_dim).permute(0, 3, 1, 2, 4)
        ctx = ctx.reshape(batch, max_q, num_q_heads, head_dim)
        out[tok_idx[q_valid]] = ctx[q_valid].to(q.dtype)


def context_slots(block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                  max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat cache slots `[B, max_seq_len]` of each sequence's context, and their validity mask."""
    pos = torch.arange(max_seq_len, device=block_tables.device)
    # Columns past the table's width only occur at invalid positions: clamp them.
    col = (pos // block_size).clamp(max=block_tables.shape[1] - 1)
    slots = block_tables[:, col] * block_size + pos % block_size
    valid = pos[None, :] < seq_lens[:, None]
    return slots, valid
