"""Varlen paged attention in Triton: prefill, chunked prefill, prefix hits and decode.

Layout
------
* ``q`` ``[T, Hq, D]``: the new query tokens of a mixed batch, flattened in
  batch order; sequence ``b`` owns rows ``query_start_loc[b]:query_start_loc[b+1]``
  (``q_len_b`` of them, possibly 0), at positions ``seq_lens[b] - q_len_b ..
  seq_lens[b] - 1``.
* ``kv_cache`` ``[2, num_blocks, block_size, Hkv, D]``: the new tokens' K/V are
  already written. Context token ``t`` of sequence ``b`` lives in block
  ``block_tables[b, t // block_size]`` at offset ``t % block_size``. Keys and
  values are read straight from the paged cache (no contiguous gather), so
  any ``block_size`` from 1 to 128 works (power of two or not).
* ``Hq = Hkv * G`` (grouped queries): query head ``h`` reads KV head ``h // G``.

Grid
----
``(cdiv(max_query_len, BLOCK_Q), B, Hkv)``. A program owns ``BLOCK_Q`` query
tokens of one sequence and *all* ``G`` query heads of one KV head, packed into
the M dimension of the tile: row ``m`` is token ``m // G_PAD`` of the tile and
query head ``kv_head * G + m % G_PAD`` (``G_PAD = next_pow2(G)``; rows with
``m % G_PAD >= G`` are padding). So every K/V tile is read once for the whole
group, and decode (``q_len`` 1) still fills a 16-row ``tl.dot``. Programs whose
query tile starts past ``q_len_b`` do no work (their KV loop bounds are 0).

Masking
-------
For a tile whose first query position is ``p0 = seq_len - q_len + tile_start``,
keys ``< p0 + 1`` are visible to every row: whole BLOCK_N tiles below that run
without masks (phase 1). The remaining tiles up to the tile's last query
position (phase 2) mask loads past that bound and apply the causal mask
``key_pos <= query_pos``; tiles above the diagonal are never visited. Softmax is
online in fp32 (base-2 exponent with ``scale * log2(e)`` folded in); the
output is written in ``q``'s dtype. Padding query rows are never stored.

No host synchronisation: ``seq_lens`` and ``query_start_loc`` are read on the
device only; the caller passes ``max_query_len`` as a Python int.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _softmax_update(s, v, m_i, l_i, acc, PRECISION: tl.constexpr):
    """One online-softmax step: fold scores `s` [M, N] (log2 units) and values `v` [N, D] in."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _extend_attention_kernel(
    q_ptr, kv_ptr, out_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    qk_scale,
    stride_qt, stride_qh, stride_qd,
    stride_kv, stride_kb, stride_ks, stride_kh, stride_kd,
    stride_ot, stride_oh, stride_od,
    stride_bt,
    G: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_prefix = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q_idx = tile * BLOCK_Q + offs_m // G_PAD  # token index within the sequence
    g_idx = offs_m % G_PAD
    head = kv_head * G + g_idx
    row_valid = (q_idx < q_len) & (g_idx < G)
    q_pos = ctx_prefix + q_idx

    tok = (q_start + q_idx).to(tl.int64)
    q_ptrs = q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh \
        + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_valid[:, None], other=0.0)

    # Key range of this tile: [0, kv_hi); keys < kv_full are visible to every row.
    tile_lo = tile * BLOCK_Q
    active = tile_lo < q_len
    tile_hi = tl.minimum(tile_lo + BLOCK_Q, q_len)
    kv_hi = tl.where(active, ctx_prefix + tile_hi, 0)
    kv_full = tl.where(active, ctx_prefix + tile_lo + 1, 0)
    full_end = (kv_full // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = kv_ptr + kv_head.to(tl.int64) * stride_kh
    v_base = k_base + stride_kv

    # Phase 1: tiles entirely below the diagonal, no masks.
    for start in range(0, full_end, BLOCK_N):
        k_pos = start + offs_n
        blk = tl.load(table_row + k_pos // BLOCK_SIZE).to(tl.int64)
        slot_off = blk * stride_kb + (k_pos % BLOCK_SIZE).to(tl.int64) * stride_ks
        k = tl.load(k_base + slot_off[None, :] + offs_d[:, None] * stride_kd)  # [D, N]
        v = tl.load(v_base + slot_off[:, None] + offs_d[None, :] * stride_kd)  # [N, D]
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        m_i, l_i, acc = _softmax_update(s, v, m_i, l_i, acc, PRECISION)

    # Phase 2: tiles crossing the diagonal (and the sequence end), masked.
    for start in range(full_end, kv_hi, BLOCK_N):
        k_pos = start + offs_n
        k_valid = k_pos < kv_hi
        blk = tl.load(table_row + k_pos // BLOCK_SIZE, mask=k_valid, other=0).to(tl.int64)
        slot_off = blk * stride_kb + (k_pos % BLOCK_SIZE).to(tl.int64) * stride_ks
        k = tl.load(k_base + slot_off[None, :] + offs_d[:, None] * stride_kd,
                    mask=k_valid[None, :], other=0.0)
        v = tl.load(v_base + slot_off[:, None] + offs_d[None, :] * stride_kd,
                    mask=k_valid[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        visible = (k_pos[None, :] <= q_pos[:, None]) & k_valid[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_i, l_i, acc = _softmax_update(s, v, m_i, l_i, acc, PRECISION)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    acc = acc / l_safe[:, None]
    o_ptrs = out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh \
        + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _launch_config(max_query_len: int, group: int, head_dim: int) -> dict:
    """Tile sizes: BLOCK_M = BLOCK_Q * G_PAD rows (>= 16), BLOCK_N keys per step."""
    g_pad = _next_pow2(group)
    target_m = 64
    block_q = max(1, min(_next_pow2(max(1, max_query_len)), target_m // g_pad))
    block_m = max(16, block_q * g_pad)
    block_q = block_m // g_pad
    block_n = 64 if head_dim <= 128 else 32
    num_warps = 4 if block_m <= 64 else 8
    num_stages = 2 if head_dim >= 256 else 3
    return dict(G_PAD=g_pad, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n,
                num_warps=num_warps, num_stages=num_stages)


def extend_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, query_start_loc: torch.Tensor, max_query_len: int,
                     scale: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal paged attention of the new queries of a mixed batch; returns ``out`` [T, Hq, D].

    q: [T, Hq, D]; kv_cache: [2, num_blocks, block_size, Hkv, D] (new K/V already
    written); block_tables: [B, max_blocks] int32; seq_lens: [B] int32 (cached +
    new); query_start_loc: [B + 1] int32; max_query_len: max new tokens of any
    sequence (a Python int, >= every real q_len). Any strides are accepted.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    assert kv_cache.dim() == 5 and kv_cache.shape[0] == 2, "kv_cache must be [2, NB, BS, Hkv, D]"
    _, _, block_size, num_kv_heads, kv_dim = kv_cache.shape
    assert kv_dim == head_dim, f"head_dim mismatch: q {head_dim}, cache {kv_dim}"
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, \
        f"head_dim must be a power of two >= 16, got {head_dim}"
    assert num_q_heads % num_kv_heads == 0, "Hq must be a multiple of Hkv"
    assert block_tables.dim() == 2
    group = num_q_heads // num_kv_heads
    if out is None:
        out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0 or max_query_len <= 0:
        return out
    cfg = _launch_config(max_query_len, group, head_dim)
    grid = (triton.cdiv(max_query_len, cfg["BLOCK_Q"]), num_seqs, num_kv_heads)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _extend_attention_kernel[grid](
        q, kv_cache, out,
        block_tables, seq_lens, query_start_loc,
        float(scale) * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        kv_cache.stride(4),
        out.stride(0), out.stride(1), out.stride(2),
        block_tables.stride(0),
        G=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, PRECISION=precision,
        **cfg,
    )
    return out


def extend_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                         seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                         max_query_len: int, scale: float,
                         out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain-torch reference of `extend_attention` (per-sequence gather, fp32 masked softmax)."""
    num_tokens, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_q_heads // num_kv_heads
    if out is None:
        out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        q0, q1 = qsl[b], qsl[b + 1]
        q_len = q1 - q0
        if q_len == 0:
            continue
        assert q_len <= max_query_len
        pos = torch.arange(seq_len, device=q.device)
        blocks = block_tables[b].to(torch.long)[pos // block_size]
        keys = kv_cache[0][blocks, pos % block_size].float()  # [S, Hkv, D]
        values = kv_cache[1][blocks, pos % block_size].float()
        keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, S, D]
        values = values.repeat_interleave(group, dim=1).transpose(0, 1)
        queries = q[q0:q1].float().transpose(0, 1)  # [Hq, L, D]
        scores = queries @ keys.transpose(1, 2) * scale  # [Hq, L, S]
        q_pos = seq_len - q_len + torch.arange(q_len, device=q.device)
        visible = pos[None, :] <= q_pos[:, None]
        scores = scores.masked_fill(~visible[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q0:q1] = (probs @ values).transpose(0, 1).to(q.dtype)
    return out


__all__ = ["extend_attention", "extend_attention_ref"]
