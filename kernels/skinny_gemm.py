"""Triton "skinny" GEMM for small batches: `y = epilogue(prologue(x) @ weight.T)`, M <= 64.

Decode steps multiply a few token rows by a large weight, so the kernel is a
weight stream: output tiles of BLOCK_N columns (no split-K), each computed by
reading its `[BLOCK_N, K]` slice of the weight once and all M input rows (tiny,
served from L2). Each tile holds its whole K reduction in an fp32 accumulator,
so the neighbouring elementwise work fuses for free:

- prologue `norm_weight`: the input rows are RMSNorm'ed on the fly with HF's
  LlamaRMSNorm numerics (fp32 sum of squares, `x * rsqrt(mean + eps)` rounded
  to the dtype, times the weight, rounded again). Each program computes the
  rows' 1/rms in a first pass over x: no separate norm kernel and no normed
  copy of x.
- epilogue `silu_mul`: the weight is a fused gate/up projection `[2N, K]`; a tile
  accumulates BLOCK_N gate and the matching BLOCK_N up columns and stores
  `silu(gate) * up` (kernels/activation.py numerics), `[M, N]`.
- epilogue: `+ bias` in fp32; with `add_to`, `add_to += y` in place, summed in
  fp32 from the accumulator and rounded once (the unfused `F.linear` + add
  rounds twice).

The grid has one program per tile by default. With `num_programs` below the
tile count, programs are persistent: program p walks tiles p, p + P, ... in
one flat loop over (tile, K step), which can keep the weight loads pipelined
across tiles (the default num_stages counts K steps only: override it) and
computes 1/rms once per program. On the H100 that lost with
PDL (llama3-8b one-token decode 154 tok/s against 171 for one program per
tile): early-launched programs of a PDL kernel land unevenly on the SMs that
free up first, and a persistent grid cannot rebalance.

Two inner products: for M <= 4 a broadcast-multiply-reduce on the CUDA cores
(BLOCK_M = M rounded up to a power of two), else `tl.dot` on the tensor cores
with BLOCK_M = max(16, next_pow2(M)). The loop is a `tl.range(...,
num_stages=...)`, which asks Triton to software-pipeline every load in it (not
only the dot operands). Launch configs come from `skinny_gemm_config` (heuristic
documented there) and can be overridden per call for tuning. No host syncs:
launches are CUDA-graph capturable, and the output does not depend on the
number of programs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton
import triton.language as tl

from .activation import silu_and_mul_ref
from .pdl import launch_kwargs, pdl_enabled, pdl_wait
from .rms_norm import rms_norm_ref

MAX_M = 64
# Broadcast-reduce up to this many rows by default; tl.dot above it.
BROADCAST_MAX_M = 4
# An override may run the broadcast path up to here (its registers grow with BLOCK_M).
BROADCAST_LIMIT_M = 16
DEFAULT_NUM_SMS = 132  # H100 SXM; used when x is not on a CUDA device
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True, slots=True)
class SkinnyGemmConfig:
    """Launch parameters of one skinny-GEMM call (`block_n` counts output columns)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    use_dot: bool


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, v))


@functools.lru_cache(maxsize=4096)
def skinny_gemm_config(m: int, n: int, k: int, elem_bytes: int, *, norm: bool = False,
                       silu_mul: bool = False, num_sms: int = DEFAULT_NUM_SMS,
                       use_dot: Optional[bool] = None) -> SkinnyGemmConfig:
    """The default launch config for an `[m, k] @ W.T` call with n output columns.

    W is `[n, k]`, or `[2n, k]` with `silu_mul` (each tile then reads BLOCK_N gate and
    BLOCK_N up rows). `use_dot` forces the inner-product path (the broadcast path takes
    m <= 16); the rest of the config then follows the same rules. Tuned for 16-bit dtypes;
    float32 works but its larger tiles are not tuned (tl.dot then runs exact fp32 FMAs).

    Heuristic (an H100 has 132 SMs and wants a few MB of loads in flight):
    - path: broadcast-reduce for m <= 4, else `tl.dot` with BLOCK_M = max(16, next_pow2(m)).
    - weight rows per tile: the largest power of two <= W's rows (n, or 2n with `silu_mul`)
      / (2 * SMs), clamped to [4, 8]
      (broadcast: on llama3-8b's gate_up, 8 x 1024 tiles stream at 3.0 TB/s, 32 x 256 at 2.3)
      or [16, 64] (dot; at least 32 when BLOCK_M = 64, since every tile re-reads all of x
      from L2). BLOCK_N is that, halved with `silu_mul`, and at least 16 for tl.dot.
    - BLOCK_K: a weight tile of ~16 KB, capped by registers at 64 fp32 values per thread:
      broadcast BLOCK_M * rows * BLOCK_K (the products), dot BLOCK_M * BLOCK_K (the x tile,
      2x with a norm prologue), and by next_pow2(k); at least 16 (dot) or 32; halved once
      where that makes it divide k (every K step unmasked).
    - one program per tile; num_warps 4; num_stages: the K loop's trip count, capped at 4
      and by ~96 KB of shared memory for the staged x and weight tiles (so two programs fit
      on an SM); 1 for a single trip.
    """
    assert 1 <= m <= MAX_M, m
    if use_dot is None:
        use_dot = m > BROADCAST_MAX_M
    assert use_dot or m <= BROADCAST_LIMIT_M, f"the broadcast path takes <= {BROADCAST_LIMIT_M} rows"
    num_warps = 4
    budget = 64 * 32 * num_warps  # fp32 values in registers
    halves = 2 if silu_mul else 1
    if use_dot:
        block_m = max(16, triton.next_power_of_2(m))
        lo, hi = (32 if block_m >= 64 else 16), 64
    else:
        block_m = triton.next_power_of_2(m)
        lo, hi = 4, 8
    rows = _clamp(_pow2_floor(n * halves // (2 * num_sms)), lo, hi)
    block_n = max(rows // halves, 16 if use_dot else 1)
    rows = block_n * halves
    block_k = 16384 // (rows * elem_bytes)
    if use_dot:
        block_k = min(block_k, budget // (block_m * (2 if norm else 1)))
    else:
        block_k = min(block_k, budget // (block_m * rows))
    min_k = 16 if use_dot else 32
    block_k = _clamp(_pow2_floor(block_k), min_k, max(min_k, triton.next_power_of_2(k)))
    if k > block_k and k % block_k and k % (block_k // 2) == 0 and block_k // 2 >= min_k:
        block_k //= 2  # unmasked K steps (qwen3's down, K=3072, M=1: 4.4 vs 5.0 us)
    stage_bytes = (block_m + rows) * block_k * elem_bytes
    trips = triton.cdiv(k, block_k)
    num_stages = 1 if trips == 1 else _clamp(min(trips, 98304 // stage_bytes), 2, 4)
    return SkinnyGemmConfig(block_m, block_n, block_k, num_warps, num_stages, use_dot)


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _x_mask(mask_m, ks, K, EVEN_K: tl.constexpr):
    """Mask of the x tile `[BLOCK_M, BLOCK_K]` at columns `ks` (rows past M off)."""
    if EVEN_K:
        return mask_m[:, None] & (ks[None, :] >= 0)
    return mask_m[:, None] & (ks[None, :] < K)


@triton.jit
def _load_a(x_rows, nw_ptr, ks, mask, rstd, K, NORM: tl.constexpr, EVEN_K: tl.constexpr):
    """The GEMM input tile `[BLOCK_M, BLOCK_K]` of columns `ks`, prologue applied, in x's dtype."""
    dtype = x_rows.dtype.element_ty
    if NORM:
        xf = tl.load(x_rows + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        y = (xf * rstd[:, None]).to(dtype).to(tl.float32)
        if EVEN_K:
            nw = tl.load(nw_ptr + ks).to(tl.float32)
        else:
            nw = tl.load(nw_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
        a = (y * nw[None, :]).to(dtype)
    else:
        a = tl.load(x_rows + ks[None, :], mask=mask, other=0.0)
    return a


@triton.jit
def _load_w(w_ptrs, mask, MASKED: tl.constexpr):
    """The weight tile at `w_ptrs` `[BLOCK_N, BLOCK_K]`."""
    if MASKED:
        return tl.load(w_ptrs, mask=mask, other=0.0)
    return tl.load(w_ptrs)


@triton.jit
def _product(acc, a, w, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """`acc + a @ w.T` for a loaded weight tile `w` `[BLOCK_N, BLOCK_K]`."""
    if USE_DOT:
        return tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc + tl.sum(a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)


@triton.jit
def _tile_product(acc, a, w_ptrs, mask, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  MASKED: tl.constexpr):
    """`acc + a @ w.T` for the weight tile at `w_ptrs` `[BLOCK_N, BLOCK_K]`."""
    return _product(acc, a, _load_w(w_ptrs, mask, MASKED), USE_DOT, DOT_PRECISION)


@triton.jit
def _prefetch_l2(ptrs):
    """Ask for the cache lines at `ptrs` in L2 (no registers, no wait)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _epilogue(acc, acc_up, offs_m, mask_m, offs_n, N, bias_ptr, out_ptr, stride_o,
              HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, ACCUMULATE: tl.constexpr):
    """Bias, SiLU-and-mul and the (accumulating) store of one finished output tile."""
    mask_n = offs_n < N
    y = acc
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if SILU_MUL:
        up = acc_up
        if HAS_BIAS:
            up += tl.load(bias_ptr + N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        # silu_and_mul of the rounded projections (kernels/activation.py numerics).
        gate = y.to(out_ptr.dtype.element_ty).to(tl.float32)
        up = up.to(out_ptr.dtype.element_ty).to(tl.float32)
        y = gate * tl.sigmoid(gate) * up
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_o + offs_n[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE:
        y += tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _skinny_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, nw_ptr, out_ptr,
    M, N, K,
    stride_x, stride_w, stride_o,
    eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr, NORM: tl.constexpr, SILU_MUL: tl.constexpr,
    ACCUMULATE: tl.constexpr, EVEN_K: tl.constexpr, MASK_W: tl.constexpr,
    PDL: tl.constexpr, PREFETCH_LINES: tl.constexpr, LINE: tl.constexpr,
    SINGLE: tl.constexpr,
):
    # Program p computes output tiles p, p + P, p + 2P, ... (P programs; one tile each with
    # the default grid) in one flat loop over (tile, K step).
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_tiles = tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    total = tl.cdiv(num_tiles - pid, num_programs) * k_steps
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_bn = tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_x  # [BLOCK_M, 1]
    # With SILU_MUL the weight is [2N, K]: gate rows [0, N), up rows [N, 2N).
    up_rows = tl.cast(N, tl.int64) * stride_w  # N == 1 arrives as a Python int
    if SINGLE:
        # One K step and one tile per program: the weight tile goes into registers first,
        # before the PDL wait (no kernel writes weights) and before x and the norm pass, so
        # its stream overlaps the previous kernel's tail and the x round trip.
        offs_n = pid * BLOCK_N + offs_bn
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :]
        w_mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        w = _load_w(w_ptrs, w_mask, MASK_W)
        w_up = w
        if SILU_MUL:
            w_up = _load_w(w_ptrs + up_rows, w_mask, MASK_W)
        pdl_wait(PDL)
        xm = _x_mask(mask_m, offs_k, K, EVEN_K)
        rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
        if NORM:
            xf = tl.load(x_rows + offs_k[None, :], mask=xm, other=0.0).to(tl.float32)
            rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=1) / K + eps)
        a = _load_a(x_rows, nw_ptr, offs_k, xm, rstd, K, NORM, EVEN_K)
        zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc = _product(zero, a, w, USE_DOT, DOT_PRECISION)
        acc_up = zero
        if SILU_MUL:
            acc_up = _product(zero, a, w_up, USE_DOT, DOT_PRECISION)
        _epilogue(acc, acc_up, offs_m, mask_m, offs_n, N, bias_ptr, out_ptr, stride_o,
                  HAS_BIAS, SILU_MUL, ACCUMULATE)
    else:
        if PDL:
            if PREFETCH_LINES > 0:
                # No kernel writes the weight: pull the first lines of this program's first tile
                # into L2 while the previous kernel finishes (one address per cache line).
                pk = tl.minimum(tl.arange(0, PREFETCH_LINES) * LINE, K - 1)
                first = tl.minimum(pid * BLOCK_N + offs_bn, N - 1)
                rows = w_ptr + first[:, None].to(tl.int64) * stride_w
                _prefetch_l2(rows + pk[None, :])
                if SILU_MUL:
                    _prefetch_l2(rows + up_rows + pk[None, :])
            pdl_wait(PDL)

        # The RMSNorm prologue's 1 / rms of each row, once per program.
        rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
        if NORM:
            sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
                ks = k0 + offs_k
                xm = _x_mask(mask_m, ks, K, EVEN_K)
                xf = tl.load(x_rows + ks[None, :], mask=xm, other=0.0).to(tl.float32)
                sum_sq += tl.sum(xf * xf, axis=1)
            rstd = tl.math.rsqrt(sum_sq / K + eps)

        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for it in tl.range(0, total, num_stages=NUM_STAGES):
            step = it // k_steps
            kk = it - step * k_steps
            offs_n = (pid + step * num_programs) * BLOCK_N + offs_bn
            ks = kk * BLOCK_K + offs_k
            xm = _x_mask(mask_m, ks, K, EVEN_K)
            a = _load_a(x_rows, nw_ptr, ks, xm, rstd, K, NORM, EVEN_K)
            w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_w + ks[None, :]
            w_mask = (offs_n[:, None] < N) & (ks[None, :] < K)
            acc = _tile_product(acc, a, w_ptrs, w_mask, USE_DOT, DOT_PRECISION, MASK_W)
            if SILU_MUL:
                acc_up = _tile_product(acc_up, a, w_ptrs + up_rows, w_mask, USE_DOT,
                                       DOT_PRECISION, MASK_W)
            if kk == k_steps - 1:
                _epilogue(acc, acc_up, offs_m, mask_m, offs_n, N, bias_ptr, out_ptr, stride_o,
                          HAS_BIAS, SILU_MUL, ACCUMULATE)
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)


def _check_vector(v: torch.Tensor, n: int, name: str) -> None:
    assert v.dim() == 1 and v.shape[0] == n and v.stride(0) == 1, f"{name} must be [{n}] contiguous"


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
                silu_mul: bool = False, add_to: Optional[torch.Tensor] = None,
                block_n: Optional[int] = None, block_k: Optional[int] = None,
                num_warps: Optional[int] = None, num_stages: Optional[int] = None,
                use_dot: Optional[bool] = None,
                num_programs: Optional[int] = None) -> torch.Tensor:
    """`epilogue(prologue(x) @ weight.T + bias)` for x `[M, K]`, M <= 64, weight `[N_w, K]`.

    x (any row stride, contiguous last dim) and weight (contiguous last dim) share one
    dtype of bfloat16 / float16 / float32; bias `[N_w]` and norm_weight `[K]` are contiguous.
    Prologue: with `norm_weight`, x is RMSNorm'ed first (HF LlamaRMSNorm numerics, `eps`).
    Output: `[M, N_w]`; with `silu_mul=True` the weight is a fused gate/up projection
    (`[2N, K]`, gate rows first) and the output is `silu_and_mul` of the product, `[M, N]`
    (each projection rounded to the dtype, then `silu(gate) * up` in fp32, rounded once).
    With `add_to` (`[M, N_w]`, x's dtype, contiguous; not with `silu_mul`),
    `add_to += y` IN PLACE, summed in fp32 and rounded once, and `add_to` is returned.
    `block_n` (output columns per tile), `block_k`, `num_warps`, `num_stages`, `use_dot`
    override the defaults of `skinny_gemm_config`; `num_programs` below the tile count
    makes the programs persistent (see the module docstring). For tuning and tests.
    """
    assert x.dim() == 2 and x.stride(1) == 1, "x must be [M, K] with a contiguous last dim"
    assert weight.dim() == 2 and weight.stride(1) == 1, "weight must be [N, K], row-major"
    assert x.dtype in _DTYPES and weight.dtype == x.dtype, (x.dtype, weight.dtype)
    assert not (silu_mul and add_to is not None), "add_to does not combine with silu_mul"
    m, k_in = x.shape
    n_w, k = weight.shape
    assert m <= MAX_M, f"skinny_gemm takes at most {MAX_M} rows, got {m}"
    assert k_in == k, f"x has {k_in} columns for a weight of K={k}"
    assert not silu_mul or n_w % 2 == 0, f"silu_mul needs an even number of weight rows, got {n_w}"
    n = n_w // 2 if silu_mul else n_w
    if bias is not None:
        _check_vector(bias, n_w, "bias")
    if norm_weight is not None:
        _check_vector(norm_weight, k, "norm_weight")
    if add_to is not None:
        assert add_to.shape == (m, n) and add_to.dtype == x.dtype and add_to.is_contiguous(), (
            "add_to must be a contiguous [M, N] tensor of x's dtype")
        assert add_to.data_ptr() != x.data_ptr(), "add_to must not alias x"
        out = add_to
    else:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        # An empty reduction: the product is the bias (or zero), like F.linear.
        y = torch.zeros((m, n_w), dtype=torch.float32, device=x.device)
        if bias is not None:
            y += bias.float()
        if silu_mul:
            y = silu_and_mul_ref(y.to(x.dtype)).float()
        if add_to is not None:
            y += add_to.float()
        return out.copy_(y)

    cfg = skinny_gemm_config(m, n, k, x.element_size(), norm=norm_weight is not None,
                             silu_mul=silu_mul, num_sms=_num_sms(x.device), use_dot=use_dot)
    cfg = replace(cfg, block_n=block_n or cfg.block_n, block_k=block_k or cfg.block_k,
                  num_warps=num_warps or cfg.num_warps,
                  num_stages=cfg.num_stages if num_stages is None else num_stages)
    tiles = triton.cdiv(n, cfg.block_n)
    assert num_programs is None or num_programs >= 1, f"num_programs must be >= 1, got {num_programs}"
    programs = min(tiles, num_programs or tiles)
    if cfg.use_dot:
        assert cfg.block_n >= 16 and cfg.block_k >= 16, "tl.dot needs BLOCK_N, BLOCK_K >= 16"

    pdl = pdl_enabled(x)
    line = max(1, 128 // x.element_size())  # elements per 128-byte cache line
    # With a norm prologue, one K step per tile and one tile per program, the kernel loads
    # its whole weight tile before the PDL wait and the norm pass (nothing to prefetch).
    # Without a norm the L2 prefetch measured better (qwen3 o_proj M=1: 2.9 vs 3.3 us).
    single = norm_weight is not None and k <= cfg.block_k and programs == tiles
    # Otherwise prefetch (PDL only) two K tiles of the weight, at most its row.
    prefetch_lines = min(triton.next_power_of_2(triton.cdiv(k, line)),
                         max(1, 2 * cfg.block_k // line)) if pdl and not single else 0
    dummy = weight  # stands in for absent optional pointers (never read)
    _skinny_gemm_kernel[(programs,)](
        x, weight, bias if bias is not None else dummy,
        norm_weight if norm_weight is not None else dummy, out,
        m, n, k,
        x.stride(0), weight.stride(0), out.stride(0),
        float(eps),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        NUM_STAGES=cfg.num_stages, USE_DOT=cfg.use_dot,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        HAS_BIAS=bias is not None, NORM=norm_weight is not None, SILU_MUL=silu_mul,
        ACCUMULATE=add_to is not None, EVEN_K=k % cfg.block_k == 0,
        MASK_W=not (k % cfg.block_k == 0 and n % cfg.block_n == 0),
        PDL=pdl, PREFETCH_LINES=prefetch_lines, LINE=line, SINGLE=single,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_kwargs(pdl),
    )
    return out


def skinny_gemm_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                    norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
                    silu_mul: bool = False, add_to: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain-torch `skinny_gemm` with the kernel's numerics (any M).

    The prologue is `rms_norm_ref` (rounded to the dtype); the product and bias are float32;
    `silu_mul` rounds both projections to the dtype and applies `silu_and_mul_ref`; the
    `add_to` sum is float32, rounded once. Like the kernel, `add_to` is updated in place
    and returned.
    """
    a = x
    if norm_weight is not None:
        a = rms_norm_ref(x, norm_weight, eps)
    y = a.float() @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    if silu_mul:
        return silu_and_mul_ref(y.to(x.dtype))
    if add_to is not None:
        return add_to.copy_(add_to.float() + y)
    return y.to(x.dtype)
