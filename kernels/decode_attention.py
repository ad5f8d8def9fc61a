"""Triton paged decode attention (flash-decoding, GQA heads packed into `tl.dot`).

Layout: `kv_cache` is `[2, num_blocks, block_size, num_kv_heads, head_dim]`
(K = `kv_cache[0]`, V = `kv_cache[1]`, last dim contiguous); `block_tables`
`[B, max_blocks]` int32 maps a sequence's token `t` to cache block
`block_tables[b, t // block_size]`, row `t % block_size`; `seq_lens` `[B]`
int32 counts the context including the new token, which sits at position
`seq_len - 1` and is already written to the cache. `q` is `[B, Hq, D]`
(one new token per sequence), `Hq = Hkv * group`; query head `h` reads KV
head `h // group`.

Split kernel, grid `(B, Hkv, num_splits)`: a program owns one KV head and all
`group` query heads that share it, packed as the M rows of a
`[BLOCK_H, D] x [D, BLOCK_N]` `tl.dot` (BLOCK_H = max(16, next_pow2(group)),
padding rows are zero queries that are never stored), so each K/V tile is
read once for the whole group and the math runs on tensor cores. The
sequence's tiles (`BLOCK_N` tokens each, gathered token by token through the
block table, so any block size works, smaller than BLOCK_N or not a power of
two) are dealt out to the splits in contiguous runs of
`cdiv(cdiv(seq_len, BLOCK_N), num_splits)` tiles; a split iterates over its
run with an online softmax in fp32 (base-2 exponentials, the scale folded
with log2(e)). Splits past the end of a short sequence do no work.

With one split the program normalises and writes `out` directly. With
several it writes its partial (running max m, sum l, unnormalised acc) to
fp32 scratch `[B, Hq, num_splits, (2 | D)]`, and the reduce kernel, grid
`(B, Hq)`, merges the splits with log-sum-exp weights `exp2(m_s - max m)`
and writes `out` in q's dtype. A sequence with `seq_len == 0` (padding)
gets zeros.

With `new_kv` (a `DecodeNewKV`) the step's new token arrives un-rotated and
not yet cached, and the split kernel does the layer's rotary work itself (one
launch less per layer than `kernels.rotary.apply_rotary` + this kernel): every
program RMS-normalizes (optionally, Qwen3's q_norm) and rotates its query heads
in registers, and the program whose split holds position `seq_len - 1` also
normalizes and rotates the token's k and stores it and v at the token's slot,
then a CTA barrier makes the stores visible to its own tile loads. The rotation
pairs `x[d]` with `x[(d + D/2) % D]` in one full-width tile, with the numerics
of `apply_rotary` (float32, rounded to the dtype once).

Nothing reads device tensors on the host, so the launches are CUDA-graph
capturable as long as `num_splits` (grid and scratch shape) is fixed for the
capture: pass it explicitly, or pass a `max_seq_len` bound.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .pdl import launch_kwargs, pdl_enabled, pdl_wait
from .rotary import rope_cos_sin

_LOG2E = 1.4426950408889634
_DEFAULT_NUM_SMS = 132
_MAX_SPLITS = 16
_sm_count_cache: dict[int, int] = {}


@dataclass(frozen=True)
class DecodeNewKV:
    """The decode step's new token for `decode_attention` to rotate and cache itself.

    `q` passed alongside is then un-rotated. k, v: `[B, Hkv, D]` (views of a fused QKV
    output are fine; contiguous last dim); positions `[B]` and slot_mapping `[B]` (int32
    or int64; slot < 0 skips the store); inv_freq `[D/2]` float32; optional per-head
    RMSNorm weights `[D]` of q's dtype (epsilon `eps`), applied before rotating.
    """

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    inv_freq: torch.Tensor
    q_norm_weight: Optional[torch.Tensor] = None
    k_norm_weight: Optional[torch.Tensor] = None
    eps: float = 1e-6


@triton.jit
def _norm_rotate(x_ptrs, partner_ptrs, mask, w_ptr, offs_d, partner_d, cos, sin_signed, eps,
                 HEAD_DIM: tl.constexpr, NORM: tl.constexpr):
    """Rows of D values at `x_ptrs`, RMS-normed (HF numerics) and rotated; float32 result.

    `partner_ptrs` address each element's rotation partner `(d + D/2) % D`; `sin_signed`
    is -sin for the first half, +sin for the second (neox-style rotate_half).
    """
    dtype = x_ptrs.dtype.element_ty
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(partner_ptrs, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        r = tl.math.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)[:, None]
        w = tl.load(w_ptr + offs_d).to(tl.float32)
        wp = tl.load(w_ptr + partner_d).to(tl.float32)
        x = ((x * r).to(dtype).to(tl.float32) * w[None, :]).to(dtype).to(tl.float32)
        xp = ((xp * r).to(dtype).to(tl.float32) * wp[None, :]).to(dtype).to(tl.float32)
    return x * cos[None, :] + xp * sin_signed[None, :]


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr,
    out_ptr, part_acc_ptr, part_ml_ptr,
    scale_log2,
    stride_qb, stride_qh,
    stride_kblk, stride_kslot, stride_kh,
    stride_vblk, stride_vslot, stride_vh,
    stride_btb,
    stride_ob, stride_oh,
    num_splits,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, SPLIT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, PDL: tl.constexpr,
    # The fused rotary + KV write of the new token (see DecodeNewKV):
    kn_ptr, vn_ptr, pos_ptr, slot_ptr, inv_freq_ptr, qw_ptr, kw_ptr, eps,
    stride_knb, stride_knh, stride_vnb, stride_vnh,
    NEW_KV: tl.constexpr, Q_NORM: tl.constexpr, K_NORM: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr,
):
    pdl_wait(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_q_heads = tl.num_programs(1) * GROUP

    seq_len = tl.load(seq_lens_ptr + b)
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    head_mask = offs_h < GROUP
    q_heads = kvh * GROUP + offs_h
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = q_ptr + b.to(tl.int64) * stride_qb + q_heads[:, None] * stride_qh
    if NEW_KV:
        HALF: tl.constexpr = HEAD_DIM // 2
        partner_d = (offs_d + HALF) % HEAD_DIM
        freq = tl.load(pos_ptr + b).to(tl.float32) * tl.load(inv_freq_ptr + offs_d % HALF)
        cos, sin = rope_cos_sin(freq, USE_LIBDEVICE)
        sin = tl.where(offs_d < HALF, -sin, sin)
        q = _norm_rotate(q_ptrs + offs_d[None, :], q_ptrs + partner_d[None, :],
                         head_mask[:, None], qw_ptr, offs_d, partner_d, cos, sin, eps,
                         HEAD_DIM, Q_NORM).to(q_ptr.dtype.element_ty)
        # The split holding position seq_len - 1 caches the token's rotated k and its v.
        slot = tl.load(slot_ptr + b).to(tl.int64)
        owner = (start <= seq_len - 1) & (seq_len - 1 < end)  # [start, end) holds it
        one = tl.arange(0, 1)
        kn = kn_ptr + b.to(tl.int64) * stride_knb + kvh * stride_knh + one[:, None] * 0
        k_new = _norm_rotate(kn + offs_d[None, :], kn + partner_d[None, :],
                             (one < 1)[:, None], kw_ptr, offs_d, partner_d, cos, sin, eps,
                             HEAD_DIM, K_NORM)
        safe = tl.maximum(slot, 0)
        nk_off = (safe // BLOCK_SIZE) * stride_kblk + (safe % BLOCK_SIZE) * stride_kslot
        n_store = tl.where(owner & (slot >= 0), 1, 0)
        store = (one[:, None] < n_store) & (offs_d[None, :] >= 0)
        cdt = k_ptr.dtype.element_ty
        tl.store(k_ptr + nk_off + kvh * stride_kh + offs_d[None, :],
                 k_new.to(q_ptr.dtype.element_ty).to(cdt), mask=store)
        vn = vn_ptr + b.to(tl.int64) * stride_vnb + kvh * stride_vnh + one[:, None] * 0
        v_new = tl.load(vn + offs_d[None, :])
        nv_off = (safe // BLOCK_SIZE) * stride_vblk + (safe % BLOCK_SIZE) * stride_vslot
        tl.store(v_ptr + nv_off + kvh * stride_vh + offs_d[None, :], v_new.to(cdt), mask=store)
        tl.debug_barrier()  # this CTA's tile loads below see the stores
    else:
        q = tl.load(q_ptrs + offs_d[None, :], mask=head_mask[:, None], other=0.0)
    q = q.to(k_ptr.dtype.element_ty)

    m_i = tl.zeros([BLOCK_H], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)

    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    k_head = k_ptr + kvh * stride_kh
    v_head = v_ptr + kvh * stride_vh
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        row = offs_n % BLOCK_SIZE
        k_off = blk * stride_kblk + row * stride_kslot
        k = tl.load(k_head + k_off[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
        qk = tl.where(n_mask[None, :], qk * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_off = blk * stride_vblk + row * stride_vslot
        v = tl.load(v_head + v_off[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new

    if not SPLIT:
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptrs = out_ptr + b.to(tl.int64) * stride_ob + q_heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=head_mask[:, None])
    else:
        part = (b.to(tl.int64) * num_q_heads + q_heads) * num_splits + split  # [BLOCK_H]
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc,
                 mask=head_mask[:, None])
        tl.store(part_ml_ptr + part * 2, m_i, mask=head_mask)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=head_mask)


@triton.jit
def _decode_reduce_kernel(
    out_ptr, part_acc_ptr, part_ml_ptr,
    stride_ob, stride_oh,
    num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):
    pdl_wait(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    num_q_heads = tl.num_programs(1)
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < num_splits
    offs_d = tl.arange(0, HEAD_DIM)
    part = (b.to(tl.int64) * num_q_heads + h) * num_splits + offs_s
    m = tl.load(part_ml_ptr + part * 2, mask=s_mask, other=float("-inf"))
    l = tl.load(part_ml_ptr + part * 2 + 1, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)  # empty splits: exp2(-inf) = 0
    total = tl.sum(w * l, 0)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=s_mask[:, None], other=0.0)
    o = tl.sum(w[:, None] * acc, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d,
             o.to(out_ptr.dtype.element_ty))


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _DEFAULT_NUM_SMS
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _sm_count_cache.get(idx)
    if n is None:
        n = _sm_count_cache[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


def default_block_n(head_dim: int) -> int:
    """KV tokens per tile of the split kernel."""
    return 64 if head_dim <= 128 else 32


def choose_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, block_n: int = 64,
                      num_sms: int = _DEFAULT_NUM_SMS) -> int:
    """Splits per sequence so that `batch * num_kv_heads * splits` reaches ~2 waves of SMs.

    Capped by the tiles of the longest sequence and by 16; 1 when the grid is already big.
    """
    programs = max(1, batch * num_kv_heads)
    want = triton.cdiv(2 * num_sms, programs)
    splits = min(want, triton.cdiv(max(1, max_seq_len), block_n), _MAX_SPLITS)
    return max(1, splits)


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, out: Optional[torch.Tensor] = None,
                     num_splits: Optional[int] = None, max_seq_len: Optional[int] = None,
                     block_n: Optional[int] = None, num_warps: int = 4,
                     num_stages: int = 3, new_kv: Optional[DecodeNewKV] = None) -> torch.Tensor:
    """Paged decode attention of `q` `[B, Hq, D]` over each sequence's cached context.

    kv_cache: `[2, num_blocks, block_size, Hkv, D]` (last dim contiguous, any other strides);
    block_tables: `[B, max_blocks]` int32; seq_lens: `[B]` int32 (0 gives a zero output).
    `num_splits=None` picks `choose_num_splits(B, Hkv, max_seq_len)`, `max_seq_len` defaulting
    to the block table's capacity `max_blocks * block_size` (no host sync either way).
    Returns `out` `[B, Hq, D]` in q's dtype (written into `out` when given).
    Tuning: `block_n` (KV tokens per tile, default 64 for D <= 128), `num_warps`,
    `num_stages` (>1 pipelines the K/V gathers with cp.async when strides are 16-aligned).
    Scratch (only when num_splits > 1): `B * Hq * num_splits * (D + 2)` fp32, from torch's allocator.
    With `new_kv`, q is un-rotated and the new token (position `seq_len - 1`) is not in the
    cache yet: the kernel rotates q (and k), stores k and v at the token's slot, then attends
    (see the module docstring).
    """
    batch, num_q_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, kv_head_dim = kv_cache.shape
    assert kv_head_dim == head_dim, (q.shape, kv_cache.shape)
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, \
        f"head_dim must be a power of two >= 16, got {head_dim}"
    assert num_q_heads % num_kv_heads == 0, (num_q_heads, num_kv_heads)
    assert q.stride(-1) == 1 and kv_cache.stride(-1) == 1, "last dim must be contiguous"
    assert block_tables.dim() == 2 and block_tables.shape[0] >= batch
    assert seq_lens.shape[0] >= batch
    if block_tables.dtype != torch.int32:
        block_tables = block_tables.to(torch.int32)
    if block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    if seq_lens.dtype != torch.int32 or seq_lens.stride(0) != 1:
        seq_lens = seq_lens.to(torch.int32).contiguous()
    group = num_q_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    else:
        assert out.shape == q.shape and out.stride(-1) == 1
    if batch == 0:
        return out
    if block_n is None:
        block_n = default_block_n(head_dim)
    assert block_n >= 16 and block_n & (block_n - 1) == 0
    if num_splits is None:
        if max_seq_len is None:
            max_seq_len = block_tables.shape[1] * block_size
        num_splits = choose_num_splits(batch, num_kv_heads, max_seq_len, block_n,
                                       _num_sms(q.device))
    num_splits = max(1, min(int(num_splits), 64))
    block_h = max(16, triton.next_power_of_2(group))
    precision = "ieee" if kv_cache.dtype == torch.float32 else "tf32"

    k_cache, v_cache = kv_cache[0], kv_cache[1]
    if num_splits == 1:
        part_acc = part_ml = out  # unused
    else:
        part_acc = torch.empty((batch, num_q_heads, num_splits, head_dim),
                               dtype=torch.float32, device=q.device)
        part_ml = torch.empty((batch, num_q_heads, num_splits, 2),
                              dtype=torch.float32, device=q.device)
    if new_kv is not None:
        nk = new_kv
        assert nk.k.shape[0] >= batch and nk.k.shape[1:] == (num_kv_heads, head_dim), nk.k.shape
        assert nk.v.shape == nk.k.shape and nk.k.stride(-1) == 1 and nk.v.stride(-1) == 1
        assert nk.k.dtype == q.dtype and nk.v.dtype == q.dtype, (nk.k.dtype, q.dtype)
        assert nk.positions.shape[0] >= batch and nk.slot_mapping.shape[0] >= batch
        assert nk.inv_freq.shape == (head_dim // 2,) and nk.inv_freq.dtype == torch.float32
        for w in (nk.q_norm_weight, nk.k_norm_weight):
            assert w is None or (w.shape == (head_dim,) and w.stride(0) == 1
                                 and w.dtype == q.dtype), "norm weights must be [D] of q's dtype"
        positions = nk.positions if nk.positions.stride(0) == 1 else nk.positions.contiguous()
        slots = nk.slot_mapping if nk.slot_mapping.stride(0) == 1 else nk.slot_mapping.contiguous()
        inv_freq = nk.inv_freq.contiguous()
        fused = (nk.k, nk.v, positions, slots, inv_freq,
                 nk.q_norm_weight if nk.q_norm_weight is not None else inv_freq,
                 nk.k_norm_weight if nk.k_norm_weight is not None else inv_freq,
                 float(nk.eps), nk.k.stride(0), nk.k.stride(1), nk.v.stride(0), nk.v.stride(1))
    else:
        fused = (q, q, seq_lens, seq_lens, q, q, q, 0.0, 0, 0, 0, 0)  # unused
    fused_names = ("kn_ptr", "vn_ptr", "pos_ptr", "slot_ptr", "inv_freq_ptr", "qw_ptr", "kw_ptr",
                   "eps", "stride_knb", "stride_knh", "stride_vnb", "stride_vnh")
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1" or q.device.type != "cuda"
    pdl = pdl_enabled(q)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens,
        out, part_acc, part_ml,
        float(scale) * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        num_splits,
        GROUP=group, BLOCK_H=block_h, BLOCK_N=block_n, HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, SPLIT=num_splits > 1, INPUT_PRECISION=precision, PDL=pdl,
        **dict(zip(fused_names, fused)),
        NEW_KV=new_kv is not None,
        Q_NORM=new_kv is not None and new_kv.q_norm_weight is not None,
        K_NORM=new_kv is not None and new_kv.k_norm_weight is not None,
        USE_LIBDEVICE=not interpret,
        num_warps=num_warps, num_stages=num_stages, **launch_kwargs(pdl),
    )
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_q_heads)](
            out, part_acc, part_ml,
            out.stride(0), out.stride(1),
            num_splits,
            HEAD_DIM=head_dim,
            # Few block widths: num_splits is a runtime argument, so split counts share a compile.
            BLOCK_S=16 if num_splits <= 16 else 64, PDL=pdl,
            num_warps=1 if head_dim <= 64 else 2, **launch_kwargs(pdl),
        )
    return out


def decode_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                         seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain-torch oracle: gather each sequence's K/V through its block table, softmax in fp32."""
    batch, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_q_heads // num_kv_heads
    out = torch.zeros_like(q)
    lens = seq_lens.tolist()
    tables = block_tables.long()
    for b in range(batch):
        n = int(lens[b])
        if n == 0:
            continue
        pos = torch.arange(n, device=q.device)
        blocks = tables[b, pos // block_size]
        rows = pos % block_size
        k = kv_cache[0, blocks, rows].float()  # [n, Hkv, D]
        v = kv_cache[1, blocks, rows].float()
        k = k.repeat_interleave(group, dim=1)  # [n, Hq, D]
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        probs = torch.softmax(scores, dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", probs, v).to(q.dtype)
    return out
