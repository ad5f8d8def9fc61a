"""One-token GEMV that loads its weights into shared memory before the PDL wait (Hopper).

`stream_gemv` computes what `skinny_gemm` does for one input row (same
prologue and epilogues, same numerics up to float32 summation order): an
RMSNorm prologue, `+ bias`, SiLU-and-mul of a fused gate/up projection, or
`add_to += y` in place. It exists for the latency of one-request decode,
where each of a layer's four GEMVs reads 4-12 MB of weights and is too short
to reach the memory bandwidth on its own.

Each program (one per SM, at most one per output row) owns a contiguous range
of output rows: one contiguous span of the row-major weight (plus the matching
up rows with SiLU-and-mul). Before `griddepcontrol.wait` every thread issues
16-byte `cp.async` copies of its pieces of that span into shared memory, so
the span streams in while the kernels before it finish; the loads stay in
flight across the wait, which Triton cannot express (its loads land in
registers before the wait). After the wait (with `trigger_early`, first of
all, before the copies are issued) the program triggers the next kernel's
launch, reads x (RMSNorm'ed on the fly), waits for its copies, and multiplies from shared memory: 8 warps take
groups of 4 rows, and when there are fewer groups than warps each group's K is
split over several warps (the slices meet in shared memory, added in a fixed
order). With `add_to` in that K-split case, the thread that stores a row reads
its old value right after the wait, so that load's latency overlaps the
products instead of following them (qwen3's o and down projections; graph
replay 655-662 -> 631-633 us).

"One program per SM" is the scheduler's choice, not a guarantee: per-CTA
timestamps showed 16-33 of the 132 SMs running two programs of one GEMV (and
others none), worst after decode attention, which holds only 64 SMs.
`exclusive=True` pads a program's shared memory past half an SM so that two
cannot share one (the model sets it for o_proj; -7 to -9 us a step).
`trigger_early=True` lets the next kernel launch as this one starts (the model
sets it for o_proj, so gate/up's 12 MB stream in during attention, and for the
QKV GEMV, so decode attention gathers its context during the projection):
qwen3 latency 1,375 -> 1,420 tok/s with the trigger after the copies' issue on
o_proj only; at the start, on QKV as well (and with the faster stream_decode),
1,413 -> 1,453; with stream_decode triggering at its start too, 1,532-1,537
(BENCHMARKS.md, eighth session). On gate/up or down it lost (658 against 628
us), as on all of them (below).

Measured on the H100 (benchmarks/stream_gemv.py, BENCHMARKS.md): Qwen3-0.6B's
28 x 4 one-token GEMVs take 511 us as a graph against 621 us with the Triton
kernel. Dropped on the way: TMA bulk copies with mbarriers (549 us),
triggering the next launch before the wait in every GEMV (595-620 us: early
programs pile up on some SMs; kept for o_proj only, as `trigger_early`), two
programs per SM (523 us), and a persistent kernel that streams four GEMVs
through a shared-memory ring with grid barriers between them (640-790 us).

Limits, checked by `stream_gemv_supported` (callers fall back to the Triton
kernel): one row, bf16/fp16 on a compute-capability-9+ GPU where the kernel
compiles, K a multiple of 8, 16-byte aligned x / weight / norm weight, bias
and `add_to` of x's dtype and device (`add_to` not overlapping x), and a
program's shared memory within STREAM_MAX_SMEM, the device's per-block limit
and half an SM.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Optional

import torch

from . import cuda_rtc
from .pdl import pdl_enabled

STREAM_GEMV_ENV = "PAGED_BACKEND_STREAM_GEMV"

_SOURCE = cuda_rtc.DEVICE_HELPERS + r"""
#define NWARPS 8
#define RG 4  // rows per warp group
#define F_BIAS 1
#define F_NORM 2
#define F_SILU 4
#define F_ACCUM 8
#define F_PDL 16
#define F_EARLY 32

__device__ __forceinline__ u16 ld_l2(const u16* p) {  // written by an earlier kernel
  u16 v;
  asm volatile("ld.global.cg.u16 %0, [%1];" : "=h"(v) : "l"(p) : "memory");
  return v;
}

template <bool BF16>
__device__ __forceinline__ void store(float a, float u, int o, int n, int flags,
                                      const u16* __restrict__ bias, u16* out, float base) {
  if (flags & F_BIAS) {
    a += to_f<BF16>(bias[o]);
    if (flags & F_SILU) u += to_f<BF16>(bias[n + o]);
  }
  if (flags & F_SILU) {  // silu_and_mul numerics: both projections rounded, product once
    const float gt = to_f<BF16>(from_f<BF16>(a)), up = to_f<BF16>(from_f<BF16>(u));
    out[o] = from_f<BF16>(gt / (1.f + expf(-gt)) * up);
  } else if (flags & F_ACCUM) {  // base: out[o] as read after the wait
    out[o] = from_f<BF16>(base + a);
  } else {
    out[o] = from_f<BF16>(a);
  }
}

template <bool BF16>
__device__ __forceinline__ void stream_gemv_body(
    const u16* __restrict__ w, const u16* x, const u16* __restrict__ bias,
    const u16* __restrict__ norm_w, u16* out, int n, int k, int flags, float eps) {
  extern __shared__ __align__(128) unsigned char smem[];
  float* red = (float*)smem;                               // NWARPS floats
  u16* xs = (u16*)(smem + 128);                            // x (normed), k values
  unsigned char* ws = smem + 128 + ((k * 2 + 127) & ~127); // weight rows, then up rows
  float* part = (float*)ws;  // after the products: K-slice partial sums (reuses ws)

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int G = gridDim.x, g = blockIdx.x;
  const int n0 = (int)(((long long)g * n) / G);
  const int rows = (int)(((long long)(g + 1) * n) / G) - n0;
  const bool silu = flags & F_SILU;
  const unsigned row_bytes = (unsigned)k * 2u;

  // 0. F_EARLY (the caller's `trigger_early`): let the next kernel launch now, so its
  //    pre-wait phase overlaps all of this one, even the issue of this one's copies.
  if ((flags & F_PDL) && (flags & F_EARLY))
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  // 1. Every thread asks for its 16-byte pieces of the program's weight span (data no
  //    kernel writes: safe before the PDL wait).
  const unsigned total = (unsigned)rows * row_bytes;
  const unsigned char* src = (const unsigned char*)(w + (size_t)n0 * k);
  const unsigned char* src_up = (const unsigned char*)(w + (size_t)(n + n0) * k);
  for (unsigned off = tid * 16u; off < total; off += NWARPS * 32 * 16u) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;"
                 :: "r"(smem_u32(ws + off)), "l"(src + off) : "memory");
    if (silu)
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;"
                   :: "r"(smem_u32(ws + total + off)), "l"(src_up + off) : "memory");
  }
  asm volatile("cp.async.commit_group;" ::: "memory");
  // 2. PDL: wait for the previous kernel, then (without F_EARLY) let the next one launch.
  if (flags & F_PDL) {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    if (!(flags & F_EARLY)) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  }

  // The K-split path (fewer row groups than warps) stores row `tid` from thread `tid`: with
  // F_ACCUM that thread reads the row's old value now, so the read's latency is hidden.
  const int ngroups = (rows + RG - 1) / RG;
  const int ks = ngroups >= NWARPS ? 1 : NWARPS / max(ngroups, 1);
  float base = 0.f;
  if ((flags & F_ACCUM) && ks > 1 && tid < rows) base = to_f<BF16>(ld_l2(out + n0 + tid));

  // 3. x -> shared memory, RMSNorm'ed with F_NORM (HF numerics: fp32 mean of squares,
  //    x * rstd rounded, times the weight, rounded).
  float ss = 0.f;
  for (int i = tid * 8; i < k; i += NWARPS * 32 * 8) {
    uint4 v;  // x is written by the kernel before (PDL): a plain L2 load, after the wait
    asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(x + i) : "memory");
    *(uint4*)(xs + i) = v;
    float f[8];
    unpack8<BF16>(v, f);
#pragma unroll
    for (int j = 0; j < 8; ++j) ss += f[j] * f[j];
  }
  if (flags & F_NORM) {
    ss = warp_sum(ss);
    if (lane == 0) red[warp] = ss;
    __syncthreads();
    float tot = 0.f;
#pragma unroll
    for (int i = 0; i < NWARPS; ++i) tot += red[i];
    const float rstd = rsqrtf(tot / (float)k + eps);
    for (int i = tid * 8; i < k; i += NWARPS * 32 * 8) {
      float f[8], nw[8];
      unpack8<BF16>(*(const uint4*)(xs + i), f);
      unpack8<BF16>(*(const uint4*)(norm_w + i), nw);
      unsigned p[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const u16 lo = from_f<BF16>(nw[2 * j] * to_f<BF16>(from_f<BF16>(f[2 * j] * rstd)));
        const u16 hi = from_f<BF16>(nw[2 * j + 1] * to_f<BF16>(from_f<BF16>(f[2 * j + 1] * rstd)));
        p[j] = (unsigned)lo | ((unsigned)hi << 16);
      }
      *(uint4*)(xs + i) = make_uint4(p[0], p[1], p[2], p[3]);
    }
  }
  asm volatile("cp.async.wait_all;" ::: "memory");
  __syncthreads();

  // 4. Products from shared memory: warps take groups of RG rows; with fewer groups than
  //    warps, each group's K is split over ks warps and the slices meet in shared memory.
  const int slice = warp % ks;
  float acc[RG], accu[RG];
  for (int grp = warp / ks; grp < ngroups && warp < ngroups * ks; grp += NWARPS / ks) {
    const int r0 = grp * RG;
#pragma unroll
    for (int j = 0; j < RG; ++j) acc[j] = accu[j] = 0.f;
    for (int i = (slice * 32 + lane) * 8; i < k; i += ks * 32 * 8) {
      float xf[8];
      unpack8<BF16>(*(const uint4*)(xs + i), xf);
#pragma unroll
      for (int j = 0; j < RG; ++j) {
        if (r0 + j < rows) {
          float wf[8];
          unpack8<BF16>(*(const uint4*)(ws + (size_t)(r0 + j) * row_bytes + i * 2), wf);
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[j] += wf[e] * xf[e];
          if (silu) {
            unpack8<BF16>(*(const uint4*)(ws + total + (size_t)(r0 + j) * row_bytes + i * 2), wf);
#pragma unroll
            for (int e = 0; e < 8; ++e) accu[j] += wf[e] * xf[e];
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < RG; ++j) {
      acc[j] = warp_sum(acc[j]);
      if (silu) accu[j] = warp_sum(accu[j]);
    }
    if (ks > 1) break;  // one group per warp; the slices are combined below
    if (lane < RG && r0 + lane < rows) {
      float a = 0.f, u = 0.f;
#pragma unroll
      for (int j = 0; j < RG; ++j) if (j == lane) { a = acc[j]; u = accu[j]; }
      const int o = n0 + r0 + lane;
      const float base_o = (flags & F_ACCUM) ? to_f<BF16>(ld_l2(out + o)) : 0.f;
      store<BF16>(a, u, o, n, flags, bias, out, base_o);
    }
  }
  if (ks == 1) return;
  // K split: partial sums [warp][row in group] (up rows after them) in shared memory, then
  // one thread per output row adds its ks slices in order and stores.
  __syncthreads();  // every warp is done reading ws
  if (warp < ngroups * ks && lane < RG) {
    float a = 0.f, u = 0.f;
#pragma unroll
    for (int j = 0; j < RG; ++j) if (j == lane) { a = acc[j]; u = accu[j]; }
    part[warp * RG + lane] = a;
    part[NWARPS * RG + warp * RG + lane] = u;
  }
  __syncthreads();
  if (tid < rows) {
    const int gi = tid / RG, j = tid % RG;
    float a = 0.f, u = 0.f;
    for (int s = 0; s < ks; ++s) {
      a += part[(gi * ks + s) * RG + j];
      u += part[NWARPS * RG + (gi * ks + s) * RG + j];
    }
    store<BF16>(a, u, n0 + tid, n, flags, bias, out, base);
  }
}

extern "C" __global__ void __launch_bounds__(NWARPS * 32) stream_gemv_bf16(
    const u16* __restrict__ w, const u16* x, const u16* __restrict__ bias,
    const u16* __restrict__ norm_w, u16* out, int n, int k, int flags, float eps) {
  stream_gemv_body<true>(w, x, bias, norm_w, out, n, k, flags, eps);
}

extern "C" __global__ void __launch_bounds__(NWARPS * 32) stream_gemv_f16(
    const u16* __restrict__ w, const u16* x, const u16* __restrict__ bias,
    const u16* __restrict__ norm_w, u16* out, int n, int k, int flags, float eps) {
  stream_gemv_body<false>(w, x, bias, norm_w, out, n, k, flags, eps);
}
"""

_F_BIAS, _F_NORM, _F_SILU, _F_ACCUM, _F_PDL, _F_EARLY = 1, 2, 4, 8, 16, 32
_KERNELS = {torch.bfloat16: "stream_gemv_bf16", torch.float16: "stream_gemv_f16"}
_NUM_WARPS = 8
# A program's shared memory (x + weight span) at most: half an SM's 227 KB, so the next
# GEMV's programs fit next to this one's and load their weights while it runs.
STREAM_MAX_SMEM = 112 << 10
_HEADER = 128  # reduction scratch, before x


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


_BLOCK_RESERVED = 1024  # shared memory the driver keeps per resident block
_EXCLUSIVE_PAD = 128


def exclusive_smem(per_sm: int) -> int:
    """Shared memory for an `exclusive` program: just too much for two on one SM of
    `per_sm` bytes, while any other program of at most `_smem_limit` still fits beside it."""
    return per_sm // 2 - _BLOCK_RESERVED + _EXCLUSIVE_PAD


@functools.cache
def _smem_per_sm(index: int) -> int:
    p = torch.cuda.get_device_properties(index)
    return getattr(p, "shared_memory_per_multiprocessor", 2 * STREAM_MAX_SMEM + 4096)


@functools.cache
def _smem_optin(index: int) -> int:
    p = torch.cuda.get_device_properties(index)
    return getattr(p, "shared_memory_per_block_optin", STREAM_MAX_SMEM)


def smem_limit(optin: int, per_sm: int) -> int:
    """A program's shared memory at most: STREAM_MAX_SMEM, what the device allows a block
    (`optin`), and half of an SM's `per_sm` (less the 1 KB per block the driver keeps, and
    the margin an `exclusive` program takes) so two fit side by side."""
    return min(STREAM_MAX_SMEM, optin, per_sm // 2 - _BLOCK_RESERVED - _EXCLUSIVE_PAD)


@functools.cache
def _smem_limit(index: int) -> int:
    return smem_limit(_smem_optin(index), _smem_per_sm(index))


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _aligned(t: Optional[torch.Tensor]) -> bool:
    return t is None or t.data_ptr() % 16 == 0


def _grid_and_smem(n: int, k: int, silu_mul: bool, index: int) -> tuple[int, int]:
    """One program per SM (at most one per output row) and its shared memory."""
    grid = min(_num_sms(index), n)
    span = -(-n // grid) * k * 2 * (2 if silu_mul else 1)
    # The K-split scratch (2 * NWARPS * 4 floats) reuses the weight area.
    return grid, _HEADER + -(-(k * 2) // 128) * 128 + max(span, 2 * _NUM_WARPS * 4 * 4)


def gemv_weight_supported(weight: torch.Tensor, dtype: torch.dtype, device: torch.device,
                          silu_mul: bool = False,
                          norm_weight: Optional[torch.Tensor] = None) -> bool:
    """Whether `stream_gemv` takes a one-row GEMV by this weight for an x of `dtype` on
    `device`: a Hopper-or-newer GPU; bf16/fp16; a row-major, 16-byte aligned weight (and
    norm weight) of that dtype with K a multiple of 8; a program's span within
    STREAM_MAX_SMEM; NVRTC present; and PAGED_BACKEND_STREAM_GEMV not "0"."""
    if not (device.type == "cuda" and dtype in _KERNELS and weight.dtype == dtype
            and weight.device == device and weight.dim() == 2 and weight.is_contiguous()):
        return False
    n_w, k = weight.shape
    if k % 8 or k == 0 or n_w == 0 or (silu_mul and n_w % 2) or not _aligned(weight):
        return False
    if norm_weight is not None and not (
            _aligned(norm_weight) and norm_weight.dtype == dtype and norm_weight.is_contiguous()
            and norm_weight.shape == (k,)):
        return False
    if os.environ.get(STREAM_GEMV_ENV, "1") == "0":
        return False
    index = _index(device)
    if not _hopper(index) or not cuda_rtc.available():
        return False
    n = n_w // 2 if silu_mul else n_w
    return _grid_and_smem(n, k, silu_mul, index)[1] <= _smem_limit(index) and cuda_rtc.compiles(_SOURCE, "stream_gemv", index)


def _extent(t: torch.Tensor) -> int:
    """Bytes from `t`'s first element to just past its last (strided rows included)."""
    if t.numel() == 0:
        return 0
    return (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the byte ranges that `a` and `b` span share a byte."""
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + _extent(b) and b0 < a0 + _extent(a)


def stream_gemv_supported(x: torch.Tensor, weight: torch.Tensor, silu_mul: bool = False,
                          norm_weight: Optional[torch.Tensor] = None,
                          bias: Optional[torch.Tensor] = None,
                          add_to: Optional[torch.Tensor] = None) -> bool:
    """`gemv_weight_supported`; x is one 16-byte aligned row of K contiguous values; a bias
    is a contiguous vector of x's dtype and device; an `add_to` is a contiguous `[1, N]`
    tensor of x's dtype and device that does not overlap x (and not with `silu_mul`)."""
    if not (x.dim() == 2 and x.shape[0] == 1 and weight.dim() == 2
            and x.shape[1] == weight.shape[1] and x.stride(1) == 1 and _aligned(x)
            and gemv_weight_supported(weight, x.dtype, x.device, silu_mul, norm_weight)):
        return False
    if norm_weight is not None and norm_weight.device != x.device:
        return False
    n_w = weight.shape[0]
    if bias is not None and not (bias.shape == (n_w,) and bias.is_contiguous()
                                 and bias.dtype == x.dtype and bias.device == x.device):
        return False
    if add_to is not None and (silu_mul or not (
            add_to.shape == (1, n_w) and add_to.is_contiguous() and add_to.dtype == x.dtype
            and add_to.device == x.device) or _overlaps(add_to, x)):
        return False
    return True


def stream_gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
                silu_mul: bool = False, add_to: Optional[torch.Tensor] = None,
                exclusive: bool = False, trigger_early: bool = False) -> torch.Tensor:
    """`skinny_gemm` for one row (same arguments, same numerics up to float32 summation
    order); the caller checks `stream_gemv_supported(x, weight, silu_mul, norm_weight)`.

    `exclusive`: pad each program's shared memory past half an SM so that no two share
    one (`exclusive_smem`). For a GEMV after a kernel that holds only some SMs (decode
    attention): the scheduler otherwise doubles its programs up on the free SMs.

    `trigger_early` (with PDL): let the next kernel launch as this one starts (before its
    copies and its wait), not after its wait. Its wait still waits for this kernel, but its
    pre-wait phase may then overlap this kernel's predecessors back to the nearest one
    that triggers after its own wait: the caller promises that none of them writes what the
    next kernel reads before its wait (kernels/pdl.py)."""
    if not stream_gemv_supported(x, weight, silu_mul, norm_weight, bias, add_to):
        raise ValueError("stream_gemv does not take this call (see stream_gemv_supported)")
    n_w, k = weight.shape
    n = n_w // 2 if silu_mul else n_w
    if add_to is not None:
        out = add_to
    else:
        out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    pdl = pdl_enabled(x)
    flags = ((_F_BIAS if bias is not None else 0) | (_F_NORM if norm_weight is not None else 0)
             | (_F_SILU if silu_mul else 0) | (_F_ACCUM if add_to is not None else 0)
             | (_F_PDL if pdl else 0) | (_F_EARLY if pdl and trigger_early else 0))
    index = _index(x.device)
    grid, smem = _grid_and_smem(n, k, silu_mul, index)
    if exclusive:  # never past what a block may opt in to (a hint, not a requirement)
        smem = max(smem, min(exclusive_smem(_smem_per_sm(index)), _smem_optin(index)))
    # All shared memory, no L1 carveout: as measured (the kernel reads x and weights once).
    kernel = cuda_rtc.compile_module(_SOURCE, "stream_gemv", x.device).kernel(
        _KERNELS[x.dtype], carveout=100)
    null = ctypes.c_void_p(0)
    args = [ctypes.c_void_p(weight.data_ptr()), ctypes.c_void_p(x.data_ptr()),
            ctypes.c_void_p(bias.data_ptr()) if bias is not None else null,
            ctypes.c_void_p(norm_weight.data_ptr()) if norm_weight is not None else null,
            ctypes.c_void_p(out.data_ptr()), ctypes.c_int(n), ctypes.c_int(k),
            ctypes.c_int(flags), ctypes.c_float(eps)]
    cuda_rtc.launch(kernel, grid, _NUM_WARPS * 32, smem, args, pdl)
    return out
