"""Triton kernel writing new tokens' K/V into the paged KV cache.

Layout: `kv_cache` is `[2, num_blocks, block_size, num_kv_heads, head_dim]`
(K = `kv_cache[0]`, V = `kv_cache[1]`); token `t` goes to flat slot
`slot_mapping[t] = block * block_size + offset`, i.e. `kv_cache[:, block, offset]`.

Grid: one program per new token. Each program copies the token's
`num_kv_heads * head_dim` values of K and of V (cast to the cache dtype) in
one masked vector; a negative slot (padding, e.g. CUDA-graph padding rows)
masks every store off, so the program writes nothing. No host sync: slots are
only read on the device, so the launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import launch_kwargs, pdl_enabled, pdl_wait


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_cblk, stride_cslot, stride_ch, stride_cd,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    NUM_ELEMS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    pdl_wait(PDL)
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    # slot < 0: an empty mask, nothing is read or written.
    mask = offs < tl.where(slot >= 0, NUM_ELEMS, 0)
    h = offs // HEAD_DIM
    d = offs % HEAD_DIM
    safe_slot = tl.maximum(slot, 0)
    blk = safe_slot // BLOCK_SIZE
    off = safe_slot % BLOCK_SIZE
    dst = blk * stride_cblk + off * stride_cslot + h * stride_ch + d * stride_cd
    t64 = t.to(tl.int64)
    k = tl.load(k_ptr + t64 * stride_kt + h * stride_kh + d * stride_kd, mask=mask)
    v = tl.load(v_ptr + t64 * stride_vt + h * stride_vh + d * stride_vd, mask=mask)
    tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Copy `k`, `v` `[T, Hkv, D]` into `kv_cache` at `slot_mapping[:T]` (int64; slot < 0 skipped).

    `k`/`v` may be strided views (e.g. slices of a fused QKV output); `kv_cache`
    may be any strided `[2, num_blocks, block_size, Hkv, D]` tensor.
    """
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    assert k.shape == v.shape == (num_tokens, num_kv_heads, head_dim), (k.shape, kv_cache.shape)
    assert slot_mapping.shape[0] >= num_tokens
    if slot_mapping.dtype not in (torch.int64, torch.int32):
        slot_mapping = slot_mapping.long()
    if slot_mapping.stride(0) != 1:
        slot_mapping = slot_mapping.contiguous()
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    num_elems = num_kv_heads * head_dim
    block = triton.next_power_of_2(num_elems)
    pdl = pdl_enabled(k)
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, NUM_ELEMS=num_elems, BLOCK=block, PDL=pdl,
        num_warps=4 if block >= 1024 else (2 if block >= 256 else 1), **launch_kwargs(pdl),
    )


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Plain-torch `write_kv`: index_copy_ into the flattened cache, skipping slot < 0 (host sync)."""
    num_kv_heads, head_dim = kv_cache.shape[-2], kv_cache.shape[-1]
    slots = slot_mapping[: k.shape[0]].to(device=k.device, dtype=torch.long)
    valid = slots >= 0
    slots, k, v = slots[valid], k[valid], v[valid]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k.to(kv_cache.dtype))
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v.to(kv_cache.dtype))
