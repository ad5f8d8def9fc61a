"""Triton rotary position embedding (neox style), optionally fused with per-head RMSNorm.

`apply_rotary` rotates q `[T, Hq, D]` and k `[T, Hkv, D]` IN PLACE in one
launch: one program per token handles all of its q and k heads, and, given the
KV cache, also stores the rotated k and the token's v at its slot (the KV write
of the layer, fused: one launch less per layer). cos/sin are
computed in the kernel in float32 from the token's position and `inv_freq`
(`freq = float(pos) * inv_freq[i]`, as HF computes it), so there is no cos/sin
cache and no position limit. With a norm weight (Qwen3's q_norm/k_norm), each
head is first RMS-normalized over D with HF's numerics (normalized in float32,
rounded to the dtype, times the weight, rounded again), then rotated.

The rotation `out[:D/2] = x1*cos - x2*sin, out[D/2:] = x2*cos + x1*sin` runs in
float32 and is rounded once (HF rounds cos/sin and each product to the model
dtype; the difference is within that dtype's rounding). On the GPU, cos/sin
come from libdevice (`__nv_cosf`/`__nv_sinf`: a couple of ulps at any
argument, full range reduction); the interpreter uses numpy's. No host sync:
the launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .pdl import launch_kwargs, pdl_enabled, pdl_wait

# Elements of one half-tile (heads x D/2) a program holds per loop step.
_TILE_ELEMS = 2048


@triton.jit
def rope_cos_sin(freq, USE_LIBDEVICE: tl.constexpr):
    """cos and sin of the float32 angles `freq`: libdevice's on the GPU, the interpreter's else."""
    if USE_LIBDEVICE:
        cos = libdevice.cos(freq)
        sin = libdevice.sin(freq)
    else:
        cos = tl.cos(freq)
        sin = tl.sin(freq)
    return cos, sin


@triton.jit
def _norm_rotate_heads(base_ptr, stride_h, w_ptr, cos, sin, offs_d, d_mask, eps,
                       cache_ptr, stride_ch, cache_heads,
                       NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                       HAS_NORM: tl.constexpr, TO_CACHE: tl.constexpr):
    """Normalize (optionally) and rotate the `NUM_HEADS` heads at `base_ptr`, in place.

    With TO_CACHE, the first `cache_heads` rotated heads (all or none) are also stored at
    `cache_ptr` (head stride `stride_ch`, contiguous D).
    """
    dtype = base_ptr.dtype.element_ty
    if HAS_NORM:
        w1 = tl.load(w_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    for h0 in range(0, NUM_HEADS, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask = (offs_h < NUM_HEADS)[:, None] & d_mask[None, :]
        p1 = base_ptr + offs_h[:, None] * stride_h + offs_d[None, :]
        x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
        if HAS_NORM:
            mean_sq = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF)
            r = tl.math.rsqrt(mean_sq + eps)[:, None]
            x1 = ((x1 * r).to(dtype).to(tl.float32) * w1[None, :]).to(dtype).to(tl.float32)
            x2 = ((x2 * r).to(dtype).to(tl.float32) * w2[None, :]).to(dtype).to(tl.float32)
        o1 = (x1 * cos[None, :] - x2 * sin[None, :]).to(dtype)
        o2 = (x2 * cos[None, :] + x1 * sin[None, :]).to(dtype)
        tl.store(p1, o1, mask=mask)
        tl.store(p1 + HALF, o2, mask=mask)
        if TO_CACHE:
            c1 = cache_ptr + offs_h[:, None] * stride_ch + offs_d[None, :]
            cdt = cache_ptr.dtype.element_ty
            cmask = (offs_h < cache_heads)[:, None] & d_mask[None, :]
            tl.store(c1, o1.to(cdt), mask=cmask)
            tl.store(c1 + HALF, o2.to(cdt), mask=cmask)


@triton.jit
def _copy_heads(src_ptr, stride_h, dst_ptr, stride_dh, num_heads, offs_d, d_mask,
                NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Copy the first `num_heads` (<= NUM_HEADS) heads of 2 * HALF contiguous values."""
    for h0 in range(0, NUM_HEADS, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask = (offs_h < num_heads)[:, None] & d_mask[None, :]
        ps = src_ptr + offs_h[:, None] * stride_h + offs_d[None, :]
        pd = dst_ptr + offs_h[:, None] * stride_dh + offs_d[None, :]
        cdt = dst_ptr.dtype.element_ty
        tl.store(pd, tl.load(ps, mask=mask, other=0.0).to(cdt), mask=mask)
        tl.store(pd + HALF, tl.load(ps + HALF, mask=mask, other=0.0).to(cdt), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, pos_ptr, inv_freq_ptr, qw_ptr, kw_ptr,
    v_ptr, kc_ptr, vc_ptr, slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cblk, stride_cslot, stride_ch,
    eps,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr,
    Q_NORM: tl.constexpr, K_NORM: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
    WRITE_KV: tl.constexpr, BLOCK_SIZE: tl.constexpr, PDL: tl.constexpr,
):
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < HALF
    pos = tl.load(pos_ptr + t).to(tl.float32)
    freq = pos * tl.load(inv_freq_ptr + offs_d, mask=d_mask, other=0.0)
    cos, sin = rope_cos_sin(freq, USE_LIBDEVICE)
    cache_off = 0
    cache_heads = 0
    if WRITE_KV:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        cache_heads = tl.where(slot >= 0, NUM_KV_HEADS, 0)  # padding rows (slot -1): none
        safe = tl.maximum(slot, 0)
        cache_off = (safe // BLOCK_SIZE) * stride_cblk + (safe % BLOCK_SIZE) * stride_cslot
    _norm_rotate_heads(q_ptr + t * stride_qt, stride_qh, qw_ptr, cos, sin, offs_d, d_mask, eps,
                       kc_ptr, stride_ch, 0,
                       NUM_Q_HEADS, HALF, BLOCK_QH, Q_NORM, False)
    _norm_rotate_heads(k_ptr + t * stride_kt, stride_kh, kw_ptr, cos, sin, offs_d, d_mask, eps,
                       kc_ptr + cache_off, stride_ch, cache_heads,
                       NUM_KV_HEADS, HALF, BLOCK_KH, K_NORM, WRITE_KV)
    if WRITE_KV:
        _copy_heads(v_ptr + t * stride_vt, stride_vh, vc_ptr + cache_off, stride_ch, cache_heads,
                    offs_d, d_mask, NUM_KV_HEADS, HALF, BLOCK_KH)


def _head_block(num_heads: int, block_half: int) -> int:
    return max(1, min(triton.next_power_of_2(num_heads), _TILE_ELEMS // block_half))


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 inv_freq: torch.Tensor, q_norm_weight: Optional[torch.Tensor] = None,
                 k_norm_weight: Optional[torch.Tensor] = None,
                 eps: float = 1e-6, v: Optional[torch.Tensor] = None,
                 kv_cache: Optional[torch.Tensor] = None,
                 slot_mapping: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q `[T, Hq, D]` and k `[T, Hkv, D]` IN PLACE by `positions` `[T]`; returns (q, k).

    q and k may be strided views (e.g. of a fused QKV output); only their last
    dim must be contiguous. `inv_freq`: `[D/2]` float32. `q_norm_weight` /
    `k_norm_weight` (`[D]`): per-head RMSNorm (epsilon `eps`) before rotating.
    With `kv_cache` (`[2, num_blocks, block_size, Hkv, D]`, last dim contiguous),
    `v` `[T, Hkv, D]` and `slot_mapping` (`[>= T]` int64/int32), the same launch also
    writes the rotated k and v into the cache at each token's slot (slot < 0 skipped),
    as `kernels.kv_write.write_kv` would.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert k.shape == (num_tokens, num_kv_heads, head_dim), (q.shape, k.shape)
    assert q.dtype == k.dtype, (q.dtype, k.dtype)
    assert q.stride(2) == 1 and k.stride(2) == 1, "the head dim must be contiguous"
    assert head_dim % 2 == 0, f"head_dim must be even, got {head_dim}"
    half = head_dim // 2
    assert positions.shape[0] >= num_tokens, (positions.shape, num_tokens)
    assert inv_freq.shape == (half,) and inv_freq.dtype == torch.float32, inv_freq.shape
    for w in (q_norm_weight, k_norm_weight):
        assert w is None or (w.shape == (head_dim,) and w.stride(0) == 1), "norm weight must be [D]"
    write_kv = kv_cache is not None
    if write_kv:
        assert v is not None and slot_mapping is not None, "kv_cache needs v and slot_mapping"
        assert v.shape == k.shape and v.stride(2) == 1, (v.shape, k.shape)
        assert kv_cache.dim() == 5 and kv_cache.shape[3:] == (num_kv_heads, head_dim), (
            kv_cache.shape, k.shape)
        assert kv_cache.stride(-1) == 1, "the cache's head dim must be contiguous"
        assert slot_mapping.shape[0] >= num_tokens, (slot_mapping.shape, num_tokens)
        if slot_mapping.dtype not in (torch.int64, torch.int32) or slot_mapping.stride(0) != 1:
            slot_mapping = slot_mapping.long().contiguous()
    if num_tokens == 0:
        return q, k
    if positions.stride(0) != 1:
        positions = positions.contiguous()
    inv_freq = inv_freq.contiguous()
    block_half = triton.next_power_of_2(half)
    block_qh = _head_block(num_q_heads, block_half)
    block_kh = _head_block(num_kv_heads, block_half)
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1" or q.device.type != "cuda"
    pdl = pdl_enabled(q)
    if write_kv:
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        assert k_cache.stride() == v_cache.stride(), "K and V caches must share strides"
        block_size = kv_cache.shape[2]
        cstrides = k_cache.stride()[:3]
    else:
        k_cache = v_cache = v = slot_mapping = k  # unused
        block_size, cstrides = 1, (0, 0, 0)
    _rotary_kernel[(num_tokens,)](
        q, k, positions, inv_freq,
        q_norm_weight if q_norm_weight is not None else inv_freq,
        k_norm_weight if k_norm_weight is not None else inv_freq,
        v, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *cstrides,
        float(eps),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads,
        HALF=half, BLOCK_HALF=block_half, BLOCK_QH=block_qh, BLOCK_KH=block_kh,
        Q_NORM=q_norm_weight is not None, K_NORM=k_norm_weight is not None,
        USE_LIBDEVICE=not interpret, WRITE_KV=write_kv, BLOCK_SIZE=block_size, PDL=pdl,
        num_warps=4 if block_qh * block_half >= 1024 else 2, **launch_kwargs(pdl),
    )
    return q, k


def _rms_norm_heads_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * y.to(x.dtype)).to(x.dtype)


def apply_rotary_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     inv_freq: torch.Tensor, q_norm_weight: Optional[torch.Tensor] = None,
                     k_norm_weight: Optional[torch.Tensor] = None,
                     eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch `apply_rotary` with the kernel's numerics; returns NEW (q, k), inputs untouched."""
    num_tokens = q.shape[0]
    freqs = positions[:num_tokens].to(torch.float32)[:, None] * inv_freq.float()[None, :]
    cos, sin = freqs.cos()[:, None, :], freqs.sin()[:, None, :]

    def rotate(x: torch.Tensor, w: Optional[torch.Tensor]) -> torch.Tensor:
        if w is not None:
            x = _rms_norm_heads_ref(x, w, eps)
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q, q_norm_weight), rotate(k, k_norm_weight)
