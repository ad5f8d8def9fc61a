"""Weight-streaming GEMM for 1-64 token rows on the tensor cores (Hopper).

`stream_gemm(x, weight)` computes what `skinny_gemm(x, weight)` does for an
`[M, K]` x with M <= 64 (same `+ bias`, SiLU-and-mul and `add_to` epilogues,
same numerics up to float32 summation order; no norm prologue). It is
`stream_gemv`'s design carried to several rows: each program (one per SM)
owns a run of output columns, copies its whole weight span (the matching up
rows too, with SiLU-and-mul) into shared memory with 16-byte `cp.async`
before `griddepcontrol.wait`, so the span streams in while the kernels before
it finish, and only then reads x. cuBLAS's GEMMs cannot do that (they do not
execute the PDL wait), and the Triton skinny GEMM's loads land in registers
one tile at a time.

The products run on `mma.m16n8k16` with the tokens as the A operand (16
tokens an m-tile) and eight weight rows as B. W warps (8, or 16 where `warps`
says): with up to 32 tokens each warp takes every
token and 1/W of K; with 33-64, half of the tokens and 2/W of K. A warp walks its K range in blocks of 32 and loads
its x fragments straight from global memory into registers (16 bytes a lane:
x is written by the kernel before, read once a program, so it skips shared
memory), PREFETCH blocks ahead. Within a block the two MMA k-steps take the K
positions in a permuted order that A and B share (a lane's 16 bytes of x and
of a weight row hold positions `8 t4 .. 8 t4 + 7`: the k-step 0 operands are
the first and second pairs, k-step 1 the third and fourth), so every fragment
is one 16-byte load; weight rows sit in shared memory with their 16-byte
pieces XOR-swizzled (`piece ^ 4` on odd rows), which makes those loads free
of bank conflicts. The warps' partial sums over K meet in shared memory (the
weight area, once every warp is done with it) and are added in a fixed order.

Limits, checked by `stream_gemm_supported` (callers keep their other path):
bf16/fp16, 1-64 rows of x (16-byte aligned rows, contiguous last dim), K a
multiple of 64, a row-major 16-byte aligned weight of x's dtype, a program's
weight span within STREAM_MAX_SMEM, a Hopper-or-newer GPU with NVRTC, and
PAGED_BACKEND_STREAM_GEMV not "0".
"""

from __future__ import annotations

import ctypes
import os
from typing import Optional

import torch

from . import cuda_rtc
from .pdl import pdl_enabled
from .stream_gemv import (STREAM_GEMV_ENV, STREAM_MAX_SMEM, _aligned, _hopper, _num_sms, _overlaps,
                          _smem_limit)

MAX_M = 64
PREFETCH = 3  # x blocks (32 K positions) a warp keeps in flight

_BODY = r"""
#define NTHREADS (NWARPS * 32)
#define MPW (MT < 2 ? MT : 2)       // token m-tiles a warp
#define TG (MT / MPW)               // token groups
#define KG (NWARPS / TG)            // K groups (warps that share a token group)
#define NBLK (KDIM / 32)            // 32-wide K blocks
#define BPW ((NBLK + KG - 1) / KG)  // blocks a warp at most
#define ROWB (KDIM * 2)             // bytes a weight row
#define PITCH (NTW * 8 + 4)         // floats a token's partial row
#define F_BIAS 1
#define F_SILU 4
#define F_ACCUM 8
#define F_PDL 16
#define F_EARLY 32

static_assert(KDIM % 64 == 0, "K must be a multiple of 64 (the swizzle's 128-byte groups)");
static_assert(NWARPS % TG == 0, "warps split over token groups");

__device__ __forceinline__ void mma16816(float* c, unsigned a0, unsigned a1, unsigned a2,
                                         unsigned a3, unsigned b0, unsigned b1) {
#if IS_BF16
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
#else
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
#endif
               "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint4 ld_x(const u16* p) {  // written by the kernel before: L2
  uint4 v;
  asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
  return v;
}

// Byte offset of 16-byte piece `p` of span row `r` in shared memory (odd rows swap halves
// of each 128-byte group, so two rows' 64-byte reads of one phase use all 32 banks).
__device__ __forceinline__ unsigned wsw(int r, int p) {
  return (unsigned)r * ROWB + (unsigned)((p ^ ((r & 1) << 2)) << 4);
}

extern "C" __global__ void __launch_bounds__(NTHREADS, 1)
stream_gemm(const u16* __restrict__ w, const u16* x, const u16* __restrict__ bias, u16* out,
            int m, int n, long long sx, long long so, int flags) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const bool silu = flags & F_SILU;

  // This program's output columns [n0, n0 + cols): groups of 8, spread evenly.
  const int groups = (n + 7) / 8, G = gridDim.x, pg = blockIdx.x;
  const int n0 = (int)(((long long)pg * groups) / G) * 8;
  const int n1 = min(n, (int)(((long long)(pg + 1) * groups) / G) * 8);
  const int cols = n1 - n0;
  const int rows = silu ? 2 * cols : cols;  // span rows: gate, then up
  const int ntw = (rows + 7) / 8;

  if ((flags & F_PDL) && (flags & F_EARLY))
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  // 1. The weight span -> shared memory (no kernel writes weights: before the wait).
  {
    const int ppr = KDIM / 8;  // pieces a row
    for (int e = tid; e < rows * ppr; e += NTHREADS) {
      const int r = e / ppr, p = e % ppr;
      const int grow = (silu && r >= cols) ? n + n0 + (r - cols) : n0 + r;
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;"
                   :: "r"(smem_u32(smem + wsw(r, p))), "l"(w + (size_t)grow * KDIM + p * 8)
                   : "memory");
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
  }
  if (flags & F_PDL) {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    if (!(flags & F_EARLY)) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  }

  // 2. This warp's tokens and K blocks; its x fragments, PREFETCH blocks ahead.
  const int tg = warp / KG, kg = warp % KG;
  const int tok0 = tg * MPW * 16;
  const int b0 = (kg * NBLK) / KG, nb = ((kg + 1) * NBLK) / KG - b0;
  uint4 xr[PREFETCH][MPW][2];
  auto load_x = [&](int i, uint4 (&dst)[MPW][2]) {
#pragma unroll
    for (int mt = 0; mt < MPW; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int t = tok0 + mt * 16 + h * 8 + g;
        dst[mt][h] = (i < nb && t < m) ? ld_x(x + t * sx + (b0 + i) * 32 + 8 * t4)
                                       : make_uint4(0u, 0u, 0u, 0u);
      }
  };
#pragma unroll
  for (int i = 0; i < PREFETCH; ++i) load_x(i, xr[i]);

  float acc[MPW][NTW][4];
#pragma unroll
  for (int mt = 0; mt < MPW; ++mt)
#pragma unroll
    for (int nt = 0; nt < NTW; ++nt) acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.f;

  asm volatile("cp.async.wait_all;" ::: "memory");
  __syncthreads();

  // 3. Products. Lane (g, t4) holds K positions 8 t4 .. 8 t4 + 7 of its block: of token g
  //    (and g + 8) of each m-tile, and of weight row g of each n-tile.
#pragma unroll
  for (int i = 0; i < BPW; ++i) {
    if (i < nb) {
      uint4 xa[MPW][2];
#pragma unroll
      for (int mt = 0; mt < MPW; ++mt) { xa[mt][0] = xr[i % PREFETCH][mt][0]; xa[mt][1] = xr[i % PREFETCH][mt][1]; }
      load_x(i + PREFETCH, xr[i % PREFETCH]);
      const int p = (b0 + i) * 4 + t4;
#pragma unroll
      for (int nt = 0; nt < NTW; ++nt) {
        if (nt < ntw) {
          const uint4 wv = *reinterpret_cast<const uint4*>(smem + wsw(nt * 8 + g, p));
#pragma unroll
          for (int mt = 0; mt < MPW; ++mt) {
            mma16816(acc[mt][nt], xa[mt][0].x, xa[mt][1].x, xa[mt][0].y, xa[mt][1].y, wv.x, wv.y);
            mma16816(acc[mt][nt], xa[mt][0].z, xa[mt][1].z, xa[mt][0].w, xa[mt][1].w, wv.z, wv.w);
          }
        }
      }
    }
  }

  // 4. Partial sums [kg][token][span row] into shared memory (the weight area is free once
  //    every warp is done), then one thread an output adds the K groups in order.
  __syncthreads();
  float* part = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int mt = 0; mt < MPW; ++mt)
#pragma unroll
    for (int nt = 0; nt < NTW; ++nt) {
      if (nt < ntw) {
        const int t = tok0 + mt * 16 + g, c = nt * 8 + 2 * t4;
        *reinterpret_cast<float2*>(&part[(kg * (MT * 16) + t) * PITCH + c]) =
            make_float2(acc[mt][nt][0], acc[mt][nt][1]);
        *reinterpret_cast<float2*>(&part[(kg * (MT * 16) + t + 8) * PITCH + c]) =
            make_float2(acc[mt][nt][2], acc[mt][nt][3]);
      }
    }
  __syncthreads();
  for (int e = tid; e < m * cols; e += NTHREADS) {
    const int t = e / cols, c = e % cols;
    float a = 0.f, u = 0.f;
#pragma unroll
    for (int k = 0; k < KG; ++k) {
      a += part[(k * (MT * 16) + t) * PITCH + c];
      if (silu) u += part[(k * (MT * 16) + t) * PITCH + cols + c];
    }
    const int o = n0 + c;
    if (flags & F_BIAS) {
      a += to_f<IS_BF16>(bias[o]);
      if (silu) u += to_f<IS_BF16>(bias[n + o]);
    }
    u16* dst = out + t * so + o;
    if (silu) {  // silu_and_mul numerics: both projections rounded, the product once
      const float gt = to_f<IS_BF16>(from_f<IS_BF16>(a)), up = to_f<IS_BF16>(from_f<IS_BF16>(u));
      *dst = from_f<IS_BF16>(gt / (1.f + expf(-gt)) * up);
    } else if (flags & F_ACCUM) {
      *dst = from_f<IS_BF16>(to_f<IS_BF16>(*dst) + a);
    } else {
      *dst = from_f<IS_BF16>(a);
    }
  }
}
"""

_F_BIAS, _F_SILU, _F_ACCUM, _F_PDL, _F_EARLY = 1, 4, 8, 16, 32


def _m_tiles(m: int) -> int:
    """Token m-tiles of 16 the kernel is compiled for: 1, 2 or 4."""
    return 1 if m <= 16 else (2 if m <= 32 else 4)


# Rows up to which calls without SiLU-and-mul run 16 warps a program instead of 8 (0: never).
# On the H100, 16 warps made decode steps at 4 / 8 / 16 rows 5.7 / 1.4 / 3.1% faster and the
# step at 32 rows slower (BENCHMARKS.md, thirteenth and fourteenth sessions).
WIDE_WARPS_MAX_M = 16
# The same for shapes with K >= 2 N (row-parallel projections: o, down), where 16 warps at
# 17-32 rows made the step at 32 rows 2.0% faster (fourteenth session).
WIDE_ROW_WARPS_MAX_M = 32


def warps(m: int, n: int, k: int, silu_mul: bool) -> int:
    """Warps a program for `m` rows, `n` outputs and `k` inputs: without SiLU-and-mul, 16 up
    to WIDE_WARPS_MAX_M rows (WIDE_ROW_WARPS_MAX_M where K >= 2 N), else 8."""
    wide = WIDE_ROW_WARPS_MAX_M if k >= 2 * n else WIDE_WARPS_MAX_M
    return 16 if m <= wide and not silu_mul else 8


def layout(m: int, n: int, k: int, silu_mul: bool, num_sms: int) -> tuple[int, int, int]:
    """(programs, weight n-tiles a program at most, shared memory bytes) of a call with
    `n` output columns."""
    groups = -(-n // 8)
    grid = min(num_sms, groups)
    ntw = -(-groups // grid) * (2 if silu_mul else 1)
    mt = _m_tiles(m)
    kg = warps(m, n, k, silu_mul) // (mt // min(mt, 2))
    span = ntw * 8 * k * 2
    partials = kg * mt * 16 * (ntw * 8 + 4) * 4
    return grid, ntw, max(span, partials)


def _source(k: int, mt: int, ntw: int, nw: int, dtype: torch.dtype) -> str:
    defs = (f"#define KDIM {k}\n#define MT {mt}\n#define NTW {ntw}\n#define NWARPS {nw}\n"
            f"#define PREFETCH {PREFETCH}\n"
            f"#define IS_BF16 {1 if dtype == torch.bfloat16 else 0}\n")
    return cuda_rtc.DEVICE_HELPERS + defs + _BODY


def _module_name(k: int, mt: int, ntw: int, nw: int, dtype: torch.dtype) -> str:
    return f"stream_gemm_k{k}_m{mt}_n{ntw}_w{nw}_{'bf16' if dtype == torch.bfloat16 else 'f16'}"


def stream_gemm_supported(x: torch.Tensor, weight: torch.Tensor, silu_mul: bool = False,
                          bias: Optional[torch.Tensor] = None,
                          add_to: Optional[torch.Tensor] = None) -> bool:
    """Whether `stream_gemm` takes this call (the module docstring's limits)."""
    if not (x.is_cuda and x.dim() == 2 and 1 <= x.shape[0] <= MAX_M and x.stride(1) == 1
            and x.dtype in (torch.bfloat16, torch.float16) and weight.dim() == 2
            and weight.dtype == x.dtype and weight.device == x.device
            and weight.is_contiguous() and x.shape[1] == weight.shape[1]):
        return False
    n_w, k = weight.shape
    if k == 0 or k % 64 or n_w == 0 or (silu_mul and n_w % 2):
        return False
    if not (_aligned(x) and _aligned(weight) and (x.shape[0] == 1 or x.stride(0) % 8 == 0)):
        return False
    n = n_w // 2 if silu_mul else n_w
    if bias is not None and not (bias.shape == (n_w,) and bias.is_contiguous()
                                 and bias.dtype == x.dtype and bias.device == x.device):
        return False
    if add_to is not None and (silu_mul or not (
            add_to.shape == (x.shape[0], n) and add_to.is_contiguous()
            and add_to.dtype == x.dtype and add_to.device == x.device) or _overlaps(add_to, x)):
        return False
    if os.environ.get(STREAM_GEMV_ENV, "1") == "0":
        return False
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if not _hopper(index) or not cuda_rtc.available():
        return False
    _, ntw, smem = layout(x.shape[0], n, k, silu_mul, _num_sms(index))
    if smem > min(STREAM_MAX_SMEM, _smem_limit(index)):
        return False
    mt, nw = _m_tiles(x.shape[0]), warps(x.shape[0], n, k, silu_mul)
    return cuda_rtc.compiles(_source(k, mt, ntw, nw, x.dtype),
                             _module_name(k, mt, ntw, nw, x.dtype), index)


def stream_gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                silu_mul: bool = False, add_to: Optional[torch.Tensor] = None,
                trigger_early: bool = False) -> torch.Tensor:
    """`skinny_gemm(x, weight, bias, silu_mul=..., add_to=...)` for x `[M, K]`, M <= 64 (the
    caller checks `stream_gemm_supported`). `trigger_early` as `stream_gemv`'s (kernels/pdl.py)."""
    if not stream_gemm_supported(x, weight, silu_mul, bias, add_to):
        raise ValueError("stream_gemm does not take this call (see stream_gemm_supported)")
    m, k = x.shape
    n_w = weight.shape[0]
    n = n_w // 2 if silu_mul else n_w
    out = add_to if add_to is not None else torch.empty((m, n), dtype=x.dtype, device=x.device)
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    grid, ntw, smem = layout(m, n, k, silu_mul, _num_sms(index))
    mt, nw = _m_tiles(m), warps(m, n, k, silu_mul)
    pdl = pdl_enabled(x)
    flags = ((_F_BIAS if bias is not None else 0) | (_F_SILU if silu_mul else 0)
             | (_F_ACCUM if add_to is not None else 0) | (_F_PDL if pdl else 0)
             | (_F_EARLY if pdl and trigger_early else 0))
    kernel = cuda_rtc.compile_module(_source(k, mt, ntw, nw, x.dtype),
                                     _module_name(k, mt, ntw, nw, x.dtype), x.device).kernel(
        "stream_gemm", carveout=100)
    null = ctypes.c_void_p(0)
    args = [ctypes.c_void_p(weight.data_ptr()), ctypes.c_void_p(x.data_ptr()),
            ctypes.c_void_p(bias.data_ptr()) if bias is not None else null,
            ctypes.c_void_p(out.data_ptr()), ctypes.c_int(m), ctypes.c_int(n),
            ctypes.c_longlong(x.stride(0)), ctypes.c_longlong(out.stride(0)),
            ctypes.c_int(flags)]
    cuda_rtc.launch(kernel, grid, nw * 32, smem, args, pdl)
    return out
