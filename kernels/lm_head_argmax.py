"""Greedy LM head for one token: `argmax(x @ W.T)` in one CUDA kernel, no logits tensor.

A one-request greedy decode step ends with the LM head (Qwen3-0.6B: a 311 MB
weight, 151,936 rows) and an argmax. `lm_head_argmax` streams the weight
once: each program (one per SM) takes a contiguous range of vocabulary rows,
its 16 warps load four rows at a time straight into registers (16-byte
non-caching loads, many in flight), round each logit to the model dtype as
`F.linear` does, and keep the best (value, index), ties to the lower index as
`torch.argmax` does. Each program writes its best to a workspace; the last
program to finish (a ticket counter, reset for the next call) reduces them and
writes the token id. So the result equals `compute_logits(x, upcast=False)
.argmax(-1)` up to float32 summation order (a near-tie of two logits may round
the other way); NaN logits rank first, as in torch. A workspace serves one
stream: calls on it must not overlap (the engine runs them on its one stream).

Limits (`lm_head_argmax_supported`): one row, bf16/fp16, a Hopper-or-newer GPU,
K a multiple of 8 up to MAX_K, 16-byte aligned x and weight.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Optional

import torch

from . import cuda_rtc
from .pdl import pdl_enabled
from .stream_gemv import STREAM_GEMV_ENV, _aligned, _hopper, _index, _num_sms

MAX_K = 8192  # x is kept in shared memory
_NUM_WARPS = 16
_MAX_PROGRAMS = 1024

_SOURCE = cuda_rtc.DEVICE_HELPERS + r"""
#define NWARPS 16
#define RG 4  // rows per warp at a time
#define U 4   // 256-column steps loaded at once

__device__ __forceinline__ uint4 ld_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// torch.argmax's order: NaN above everything, then the larger value, ties to the lower index.
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) {
  const bool vn = v != v, bn = bv != bv;
  if (vn != bn) return vn;
  return (vn || v == bv) ? i < bi : v > bv;
}

template <bool BF16>
__device__ __forceinline__ void lm_head_argmax_body(
    const u16* __restrict__ w, const u16* x, int n, int k, int pdl,
    float* part_val, int* part_idx, unsigned* ticket, long long* token, long long* host_token) {
  extern __shared__ __align__(16) unsigned char smem[];
  u16* xs = (u16*)smem;
  __shared__ float s_val[NWARPS];
  __shared__ int s_idx[NWARPS];
  __shared__ bool s_last;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int G = gridDim.x, g = blockIdx.x;
  const int n0 = (int)(((long long)g * n) / G), n1 = (int)(((long long)(g + 1) * n) / G);
  if (pdl) {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  }
  for (int e = tid * 8; e < k; e += NWARPS * 32 * 8) {  // x: written before (PDL), L2 loads
    uint4 v;
    asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(x + e) : "memory");
    *(uint4*)(xs + e) = v;
  }
  __syncthreads();

  float best = __int_as_float(0xff800000);  // -inf
  int bi = 0x7fffffff;
  for (int r0 = n0 + warp * RG; r0 < n1; r0 += NWARPS * RG) {
    float acc[RG];
#pragma unroll
    for (int j = 0; j < RG; ++j) acc[j] = 0.f;
    for (int e0 = lane * 8; e0 < k; e0 += 32 * 8 * U) {
      uint4 v[U][RG];  // all RG x U loads issued before any is used
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int j = 0; j < RG; ++j)
          v[u][j] = (r0 + j < n1 && e0 + u * 256 < k)
                        ? ld_stream(w + (size_t)(r0 + j) * k + e0 + u * 256) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (e0 + u * 256 >= k) break;
        float xf[8];
        unpack8<BF16>(*(const uint4*)(xs + e0 + u * 256), xf);
#pragma unroll
        for (int j = 0; j < RG; ++j) {
          float wf[8];
          unpack8<BF16>(v[u][j], wf);
#pragma unroll
          for (int q = 0; q < 8; ++q) acc[j] += wf[q] * xf[q];
        }
      }
    }
#pragma unroll
    for (int j = 0; j < RG; ++j) {
      const float s = to_f<BF16>(from_f<BF16>(warp_sum(acc[j])));  // the logit, as F.linear rounds it
      if (r0 + j < n1 && better(s, r0 + j, best, bi)) { best = s; bi = r0 + j; }
    }
  }
  // Every lane holds its warp's best (the sums are broadcast); warps, then programs.
  if (lane == 0) { s_val[warp] = best; s_idx[warp] = bi; }
  __syncthreads();
  if (tid == 0) {
    for (int j = 0; j < NWARPS; ++j)
      if (better(s_val[j], s_idx[j], best, bi)) { best = s_val[j]; bi = s_idx[j]; }
    part_val[g] = best;
    part_idx[g] = bi;
    __threadfence();
    s_last = atomicAdd(ticket, 1u) == (unsigned)G - 1;
    __threadfence();
  }
  __syncthreads();
  if (!s_last) return;
  // The last program: every thread takes a program's best, then warps, then thread 0.
  __threadfence();
  best = __int_as_float(0xff800000);
  bi = 0x7fffffff;
  for (int j = tid; j < G; j += NWARPS * 32) {
    const float v = *(volatile float*)(part_val + j);
    const int i = *(volatile int*)(part_idx + j);
    if (better(v, i, best, bi)) { best = v; bi = i; }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, best, o);
    const int i = __shfl_xor_sync(0xffffffffu, bi, o);
    if (better(v, i, best, bi)) { best = v; bi = i; }
  }
  __syncthreads();  // s_val / s_idx are free again
  if (lane == 0) { s_val[warp] = best; s_idx[warp] = bi; }
  __syncthreads();
  if (tid != 0) return;
  for (int j = 0; j < NWARPS; ++j)
    if (better(s_val[j], s_idx[j], best, bi)) { best = s_val[j]; bi = s_idx[j]; }
  *token = (long long)bi;
  if (host_token != nullptr) {  // mapped pinned memory: no device->host copy to queue
    *(volatile long long*)host_token = (long long)bi;
    __threadfence_system();
  }
  *ticket = 0u;  // ready for the next call (stream-ordered)
}

extern "C" __global__ void __launch_bounds__(NWARPS * 32) lm_head_argmax_bf16(
    const u16* __restrict__ w, const u16* x, int n, int k, int pdl,
    float* part_val, int* part_idx, unsigned* ticket, long long* token, long long* host_token) {
  lm_head_argmax_body<true>(w, x, n, k, pdl, part_val, part_idx, ticket, token, host_token);
}

extern "C" __global__ void __launch_bounds__(NWARPS * 32) lm_head_argmax_f16(
    const u16* __restrict__ w, const u16* x, int n, int k, int pdl,
    float* part_val, int* part_idx, unsigned* ticket, long long* token, long long* host_token) {
  lm_head_argmax_body<false>(w, x, n, k, pdl, part_val, part_idx, ticket, token, host_token);
}
"""

_KERNELS = {torch.bfloat16: "lm_head_argmax_bf16", torch.float16: "lm_head_argmax_f16"}


def new_workspace(device: torch.device) -> torch.Tensor:
    """Scratch for `lm_head_argmax` on `device`: zeroed once, reset by every call. Calls
    that may run at the same time (other streams) need their own."""
    return torch.zeros(2 * _MAX_PROGRAMS + 4, dtype=torch.int32, device=device)


def lm_head_argmax_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel takes `argmax(x @ weight.T)`: one 16-byte aligned bf16/fp16 row on
    a Hopper-or-newer CUDA GPU, a row-major aligned weight of its dtype with K a multiple
    of 8 up to MAX_K and at least one row per SM, NVRTC present, and
    PAGED_BACKEND_STREAM_GEMV not "0"."""
    if not (x.is_cuda and x.dim() == 2 and x.shape[0] == 1 and x.dtype in _KERNELS
            and weight.dtype == x.dtype and weight.device == x.device and weight.dim() == 2
            and weight.is_contiguous() and x.stride(1) == 1):
        return False
    n, k = weight.shape
    if x.shape[1] != k or k % 8 or not 0 < k <= MAX_K or not (_aligned(x) and _aligned(weight)):
        return False
    if os.environ.get(STREAM_GEMV_ENV, "1") == "0":
        return False
    index = _index(x.device)
    return (_hopper(index) and cuda_rtc.available() and n >= _grid(index)
            and cuda_rtc.compiles(_SOURCE, "lm_head_argmax", index))


@functools.cache
def _grid(index: int) -> int:
    return min(_num_sms(index), _MAX_PROGRAMS)


def lm_head_argmax(x: torch.Tensor, weight: torch.Tensor,
                   workspace: Optional[torch.Tensor] = None,
                   host_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`(x @ weight.T).argmax(-1)` for one row x `[1, K]`: an int64 tensor `[1]`. The caller
    checks `lm_head_argmax_supported` first; `workspace` (`new_workspace`) is made per call
    when not given. `host_out`, a pinned int64 CPU tensor of one element, also receives the
    token, written by the kernel over PCIe (mapped memory: no copy to queue); it is valid
    once the stream has passed the call (an event)."""
    if not lm_head_argmax_supported(x, weight):
        raise ValueError("lm_head_argmax does not take this call (see lm_head_argmax_supported)")
    if workspace is None:
        workspace = new_workspace(x.device)
    if not (workspace.dtype == torch.int32 and workspace.numel() >= 2 * _MAX_PROGRAMS + 4
            and workspace.device == x.device and workspace.is_contiguous()):
        raise ValueError("workspace must come from new_workspace(x.device)")
    host = 0
    if host_out is not None:
        from .host_io import host_pointer
        host = host_pointer(host_out) if host_out.dtype == torch.int64 and host_out.numel() == 1 else None
        if host is None:
            raise ValueError("host_out must be one pinned, device-mapped int64 value")
    n, k = weight.shape
    token = torch.empty(1, dtype=torch.int64, device=x.device)
    grid = _grid(_index(x.device))
    base = workspace.data_ptr()
    pdl = pdl_enabled(x)
    kernel = cuda_rtc.compile_module(_SOURCE, "lm_head_argmax", x.device).kernel(_KERNELS[x.dtype])
    args = [ctypes.c_void_p(weight.data_ptr()), ctypes.c_void_p(x.data_ptr()), ctypes.c_int(n),
            ctypes.c_int(k), ctypes.c_int(int(pdl)),
            ctypes.c_void_p(base + 16), ctypes.c_void_p(base + 16 + 4 * _MAX_PROGRAMS),
            ctypes.c_void_p(base), ctypes.c_void_p(token.data_ptr()), ctypes.c_void_p(host)]
    cuda_rtc.launch(kernel, grid, _NUM_WARPS * 32, -(-(k * 2) // 16) * 16, args, pdl)
    return token
