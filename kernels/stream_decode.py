"""Decode attention for a few sequences whose cached context streams in before the PDL wait (Hopper).

`stream_decode` computes what `decode_attention(..., new_kv=DecodeNewKV(...))`
computes (kernels/decode_attention.py: normalize and rotate q and the new k,
store the new k and v at the token's slot, attend over the whole context)
with the same rounding points; results differ by float32 summation order and
by where P is rounded (the splits' runs of positions differ). It exists for the
latency of one-request decode, where the Triton split kernel and its reduce
kernel cost two dependent launches per layer around ~1 us of memory traffic.

Grid `(SPLITS, Hkv, B)`, one thread-block cluster of SPLITS programs per
(sequence, KV head). Split `s` owns positions `[s * r, (s + 1) * r)` with
`r = cdiv(seq_len, SPLITS)`: cached ones (written by earlier steps) and, in
the split that holds `seq_len - 1`, the new token (a row with a negative
slot stores nothing and reads all `seq_len` positions from the cache, as the
Triton kernel does). Before `griddepcontrol.wait` every program issues 16-byte
`cp.async` copies of its first tiles of K and V (gathered through the block
table) into a shared-memory ring, so the context streams in while the QKV
projection before it runs. After the wait (at its start with `trigger_early`)
it triggers the next launch, RMS-normalizes (optionally) and rotates its
group's query heads (and, in the last split, the new k, which it stores with
v at the token's slot unless the slot is negative), then runs an online
softmax over its tiles: 64 tokens a tile; for the scores two threads a token,
half a row each (read in an order rotated per token, so a quarter-warp's
reads hit distinct banks), one shuffle to add the halves; for P @ V a thread
per dimension pair and token group (tokens dealt out round-robin over the
groups), each V element read once for every query head of the group, the
groups' partial sums added at the end; P rounded to the dtype as the Triton
kernel does.
The splits' (max, sum, acc) meet through distributed shared memory: each
program pushes its (max, sum) to every program and each acc value to the
program that merges it (`st.shared::cluster`); after one release / acquire
cluster barrier each program merges its slice of the outputs by log-sum-exp
weights from its own shared memory and stores it (no program reads another's
shared memory, so none waits for the others before exiting). No scratch, no
second kernel, no atomics.

PDL precondition (kernels/pdl.py): the block table, seq_lens, positions,
slots and the cached context are read before the wait, so the kernel right
before this one must not write them, nor, if that kernel triggers before its
own wait (`stream_gemv(trigger_early=True)`), the kernel before it. In the
models the QKV projection comes right before and triggers early; before it
run the previous layer's down projection (which writes only the residual
stream) or the embedding. The wrapper therefore converts nothing (a conversion would be that
kernel): the support check asks for int32 / int64 tensors with unit stride as
the runner passes them.

Limits, checked by `stream_decode_supported` (callers keep the Triton path):
bf16/fp16 on a compute-capability-9+ GPU where the kernel compiles and an
8-program cluster fits, head_dim 64 or 128, at most 8 query heads per KV
head, at most STREAM_DECODE_MAX_BATCH sequences, a cache whose K and V halves
share strides with a contiguous last dim and 16-byte aligned rows, int32
block tables and seq_lens and int64 positions and slots with unit stride,
and PAGED_BACKEND_STREAM_GEMV not "0" (the switch for every CUDA kernel here).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from typing import Optional

import torch

from . import cuda_rtc
from .decode_attention import DecodeNewKV
from .pdl import pdl_enabled
from .stream_gemv import STREAM_GEMV_ENV

logger = logging.getLogger(__name__)

SPLITS = 8  # programs per (sequence, KV head): one cluster (8 is the portable maximum)
STREAM_DECODE_MAX_BATCH = 4
_TILE = 64  # tokens per shared-memory tile
_STAGES = 2  # tiles in flight; the first _STAGES are issued before the PDL wait
_NUM_THREADS = 128
_LOG2E = 1.4426950408889634

# Device code both CUDA attention kernels use (after DEVICE_HELPERS and the HEAD_DIM and
# IS_BF16 defines): flag bits, a warp max, a store to a cluster peer's shared memory,
# and the rotary constants and RMSNorm + rotary of one head.
ATTENTION_HELPERS = r"""
#define EPL (HEAD_DIM / 32)       // values per lane in the rotary pass
#define F_QNORM 1
#define F_KNORM 2
#define F_PDL 4
#define F_EARLY 8
#define NEG_INF __int_as_float(0xff800000)  // NVRTC has no math.h

// With F_PDL: wait for the kernels before this one, then let the next one launch (unless
// F_EARLY let it launch at the start already).
__device__ __forceinline__ void pdl_wait(int flags) {
  if (flags & F_PDL) {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    if (!(flags & F_EARLY)) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  }
}

// The parameters of both kernels, in the order of `kernel_args`.
#define ATTENTION_PARAMS                                                                  \
  const u16* q, long long s_qb, long long s_qh, const u16* kn, long long s_knb,           \
      long long s_knh, const u16* vn, long long s_vnb, long long s_vnh, u16* kc, u16* vc,   \
      long long s_blk, long long s_slot, long long s_head, const int* __restrict__ bt,      \
      long long s_btb, const int* __restrict__ seq_lens, const long long* pos,             \
      const long long* slots, const float* __restrict__ inv_freq,                          \
      const u16* __restrict__ qw, const u16* __restrict__ kw, float eps, float scale_log2, \
      u16* out, int block_size, int flags

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ void st_cluster(float* p, unsigned rank, float v) {
  unsigned a;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(a) : "r"(smem_u32(p)), "r"(rank));
  asm volatile("st.shared::cluster.f32 [%0], %1;" :: "r"(a), "f"(v) : "memory");
}

// HEAD_DIM values of one head spread over a warp (EPL consecutive values a lane): RMS-
// normalized with HF numerics when `w` is set (nw: this lane's weights), rotated (neox: d
// pairs with d +- D/2, the lane 16 away), in float32 (the caller rounds).
__device__ __forceinline__ void norm_rotate(float* x, bool norm, const float* nw, float eps,
                                            const float* cs, const float* sn, int lane) {
  if (norm) {
    float ss = 0.f;
#pragma unroll
    for (int e = 0; e < EPL; ++e) ss += x[e] * x[e];
    const float r = rsqrtf(warp_sum(ss) / (float)HEAD_DIM + eps);
#pragma unroll
    for (int e = 0; e < EPL; ++e)
      x[e] = to_f<IS_BF16>(from_f<IS_BF16>(nw[e] * to_f<IS_BF16>(from_f<IS_BF16>(x[e] * r))));
  }
  float xp[EPL];
#pragma unroll
  for (int e = 0; e < EPL; ++e) xp[e] = __shfl_xor_sync(0xffffffffu, x[e], 16);
  const bool first = lane < 16;
#pragma unroll
  for (int e = 0; e < EPL; ++e) x[e] = x[e] * cs[e] + xp[e] * (first ? -sn[e] : sn[e]);
}

// This lane's rotary cos / sin (EPL dimensions) at position `fpos`, and its q / k norm
// weights (1 where that norm is off).
__device__ __forceinline__ void rotary_setup(float fpos, const float* __restrict__ inv_freq,
                                             const u16* __restrict__ qw,
                                             const u16* __restrict__ kw, int flags, int lane,
                                             float* cs, float* sn, float* qnw, float* knw) {
#pragma unroll
  for (int e = 0; e < EPL; ++e) {
    const int dd = lane * EPL + e;
    const float f = fpos * inv_freq[dd % (HEAD_DIM / 2)];
    cs[e] = cosf(f);
    sn[e] = sinf(f);
    qnw[e] = (flags & F_QNORM) ? to_f<IS_BF16>(qw[dd]) : 1.f;
    knw[e] = (flags & F_KNORM) ? to_f<IS_BF16>(kw[dd]) : 1.f;
  }
}

// The head at `head` (HEAD_DIM values of the dtype), this lane's EPL of them loaded,
// normalized (when `norm`) and rotated into `x`, in float32.
__device__ __forceinline__ void load_norm_rotate(const u16* head, float* x, bool norm,
                                                 const float* nw, float eps, const float* cs,
                                                 const float* sn, int lane) {
#pragma unroll
  for (int e = 0; e < EPL; ++e) x[e] = to_f<IS_BF16>(head[lane * EPL + e]);
  norm_rotate(x, norm, nw, eps, cs, sn, lane);
}

#define SLICE ((GROUP * HEAD_DIM + SPLITS - 1) / SPLITS)  // outputs merged per program

// After the cluster barrier that made every split's (max, sum) and this program's slice of
// their accs visible here: output value `split * SLICE + t` of row `row` (the first of the
// KV head's query heads) merged by log-sum-exp weights (empty splits weigh 0) and stored.
__device__ __forceinline__ void store_merged(int t, unsigned split, const float* part_m,
                                             const float* part_l, const float* part_acc,
                                             u16* out, long long row) {
  const int idx = split * SLICE + t;
  if (idx >= GROUP * HEAD_DIM) return;
  const int h = idx / HEAD_DIM, d = idx % HEAD_DIM;
  float mx = NEG_INF;
#pragma unroll
  for (int r = 0; r < SPLITS; ++r) mx = fmaxf(mx, part_m[r * GROUP + h]);
  float tot = 0.f, o = 0.f;
  if (mx != NEG_INF) {
#pragma unroll
    for (int r = 0; r < SPLITS; ++r) {
      const float wgt = exp2f(part_m[r * GROUP + h] - mx);  // empty splits: 0
      tot += wgt * part_l[r * GROUP + h];
      o += wgt * part_acc[r * SLICE + t];
    }
  }
  out[(row + h) * HEAD_DIM + d] = from_f<IS_BF16>(tot > 0.f ? o / tot : 0.f);
}

"""

_BODY = r"""
#define NT 128
#define CPR (HEAD_DIM / 8)        // 16-byte chunks per row
#define HC (CPR / 2)              // chunks a thread reads of a K row (two threads a token)
#define NPAIR (HEAD_DIM / 2)      // dimension pairs: the P @ V threads of one token group
#define NG (NT / NPAIR)           // token groups in P @ V (tokens j = group mod NG)
#define HPW ((GROUP + 3) / 4)     // heads per warp in the softmax pass

struct Smem {
  u16 kv[STAGES][2][TILE][HEAD_DIM];  // ring of K/V tiles
  u16 q[GROUP][HEAD_DIM];             // normalized, rotated query heads (in the dtype)
  float p[GROUP][TILE];               // scores, then probabilities
  float alpha[GROUP];
  float part_m[SPLITS][GROUP], part_l[SPLITS][GROUP];  // every split's results, pushed here
  float part_acc[SPLITS][SLICE];                       // (this program's slice of acc)
};
static_assert(sizeof(Smem) == SMEM_BYTES, "stream_decode.py's _smem_bytes is out of date");
static_assert(NT == 2 * TILE, "the score pass gives every tile row two threads");
static_assert(NG * GROUP * HEAD_DIM * 4 <= sizeof(((Smem*)0)->kv), "P @ V partials reuse the ring");

extern "C" __global__ void __cluster_dims__(SPLITS, 1, 1) __launch_bounds__(NT)
stream_decode(ATTENTION_PARAMS) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  unsigned split;
  asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(split));
  const int kvh = blockIdx.y, b = blockIdx.z;
  // Every program of the cluster is running before any writes another's shared memory.
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
  // F_EARLY (the caller's `trigger_early`): the next kernel launches now and loads its
  // weights while this one runs.
  if ((flags & F_PDL) && (flags & F_EARLY))
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");

  // Before the PDL wait: only data that neither the kernel before this one nor, when that
  // one triggers early, the kernels before it write (the block table, seq_lens, positions,
  // slots, the cached context, rotary and norm constants).
  // The splits deal out the L positions in runs of cdiv(L, SPLITS); the new token (position
  // L - 1) comes from q/k/v after the wait unless its slot is negative (then the row stores
  // nothing and reads all L positions from the cache, as the Triton kernel does).
  const int L = seq_lens[b];
  const bool store_new = slots[b] >= 0;
  const int per = (L + SPLITS - 1) / SPLITS;
  const int c0 = min((int)split * per, L), c1 = min(c0 + per, L);
  const int ntok = c1 - c0;
  const bool owner = store_new && L > 0 && c0 <= L - 1 && L - 1 < c1;
  const int ncache_split = owner ? ntok - 1 : ntok;
  const int ntiles = (ntok + TILE - 1) / TILE;
  const int* bt_row = bt + (long long)b * s_btb;

  auto load_tile = [&](int t) {
    const int i0 = t * TILE;
    const int rows = min(TILE, ncache_split - i0);
    if (rows > 0) {
      // A thread copies one 16-byte chunk c of every (NT / CPR)-th row, K rows then V rows:
      // one block-table lookup per row.
      u16* dst = &sm.kv[t % STAGES][0][0][0];
      const int c = tid % CPR;
      for (int rr = tid / CPR; rr < 2 * rows; rr += NT / CPR) {
        const int half = rr >= rows;  // 0: K, 1: V
        const int r = rr - half * rows;
        const int p = c0 + i0 + r;
        const long long off = (long long)bt_row[p / block_size] * s_blk +
                              (long long)(p % block_size) * s_slot + (long long)kvh * s_head + c * 8;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;"
                     :: "r"(smem_u32(dst + (half * TILE + r) * HEAD_DIM + c * 8)),
                        "l"((half ? vc : kc) + off) : "memory");
      }
    }
    asm volatile("cp.async.commit_group;" ::: "memory");  // one group per tile, even empty
  };
#pragma unroll
  for (int t = 0; t < STAGES; ++t) load_tile(t);

  float cs[EPL], sn[EPL], qnw[EPL], knw[EPL];
  rotary_setup(L > 0 ? (float)pos[b] : 0.f, inv_freq, qw, kw, flags, lane, cs, sn, qnw, knw);

  pdl_wait(flags);

  // Rotary of this token: every split its query heads (a warp a head); the owner also k,
  // which it stores with v at the slot and as its last tile row.
  for (int h = warp; h < GROUP; h += 4) {
    float x[EPL];
    load_norm_rotate(q + (long long)b * s_qb + (long long)(kvh * GROUP + h) * s_qh, x,
                     flags & F_QNORM, qnw, eps, cs, sn, lane);
#pragma unroll
    for (int e = 0; e < EPL; ++e) sm.q[h][lane * EPL + e] = from_f<IS_BF16>(x[e]);
  }
  if (owner && warp == 3) {
    const u16* vsrc = vn + (long long)b * s_vnb + (long long)kvh * s_vnh + lane * EPL;
    float x[EPL];
    load_norm_rotate(kn + (long long)b * s_knb + (long long)kvh * s_knh, x, flags & F_KNORM,
                     knw, eps, cs, sn, lane);
    const long long slot = slots[b];
    const long long off = (slot / block_size) * s_blk + (slot % block_size) * s_slot +
                          (long long)kvh * s_head + lane * EPL;
    const int t = (ntok - 1) / TILE, r = (ntok - 1) % TILE;
    u16* krow = &sm.kv[t % STAGES][0][r][lane * EPL];
    u16* vrow = &sm.kv[t % STAGES][1][r][lane * EPL];
    if (t < STAGES) {  // its tile is in the ring already (a later one: see the loop)
#pragma unroll
      for (int e = 0; e < EPL; ++e) { krow[e] = from_f<IS_BF16>(x[e]); vrow[e] = vsrc[e]; }
    }
#pragma unroll
    for (int e = 0; e < EPL; ++e) {
      kc[off + e] = from_f<IS_BF16>(x[e]);
      vc[off + e] = vsrc[e];
    }
  }
  __syncthreads();

  float m_run[HPW], l_run[HPW];
#pragma unroll
  for (int i = 0; i < HPW; ++i) { m_run[i] = NEG_INF; l_run[i] = 0.f; }
  // P @ V: this thread's dimension pair of every head, over tokens j = tg mod NG.
  const int dp = tid % NPAIR, tg = tid / NPAIR;
  float acc[GROUP][2];
#pragma unroll
  for (int h = 0; h < GROUP; ++h) acc[h][0] = acc[h][1] = 0.f;

  for (int t = 0; t < ntiles; ++t) {
    asm volatile("cp.async.wait_group %0;" :: "n"(STAGES - 1) : "memory");
    const int i0 = t * TILE;
    const int n = min(TILE, ntok - i0);
    u16 (*kt)[HEAD_DIM] = sm.kv[t % STAGES][0];
    u16 (*vt)[HEAD_DIM] = sm.kv[t % STAGES][1];
    if (owner && t >= STAGES && t == (ntok - 1) / TILE && tid < 2 * CPR) {
      // A late tile holding the new token: copy it in again from the cache (stored above
      // by this program; the CTA barriers since then make it visible).
      const int r = (ntok - 1) % TILE, c = tid % CPR;
      const long long slot = slots[b];
      const u16* src = (tid < CPR ? kc : vc) + (slot / block_size) * s_blk +
                       (slot % block_size) * s_slot + (long long)kvh * s_head + c * 8;
      uint4 v;
      asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
                   : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(src) : "memory");
      *(uint4*)((tid < CPR ? kt[r] : vt[r]) + c * 8) = v;
    }
    __syncthreads();
    // Scores (base-2, scaled): row j from threads 2j and 2j + 1, half a row each, read in
    // an order rotated by j (and by half a row's chunks in the second thread) so that the
    // eight threads of a quarter-warp hit distinct banks.
    {
      const int j = tid >> 1, half = tid & 1;
      float sc[GROUP];
#pragma unroll
      for (int h = 0; h < GROUP; ++h) sc[h] = 0.f;
#pragma unroll
      for (int i = 0; i < HC; ++i) {
        const int c = half * HC + (i + j + (HC >= 8 ? 4 * half : 0)) % HC;
        float kf[8];
        unpack8<IS_BF16>(*(const uint4*)(kt[j] + c * 8), kf);
#pragma unroll
        for (int h = 0; h < GROUP; ++h) {
          float qf[8];
          unpack8<IS_BF16>(*(const uint4*)(&sm.q[h][c * 8]), qf);
#pragma unroll
          for (int e = 0; e < 8; ++e) sc[h] += qf[e] * kf[e];
        }
      }
#pragma unroll
      for (int h = 0; h < GROUP; ++h) {
        const float tot = sc[h] + __shfl_xor_sync(0xffffffffu, sc[h], 1);
        if (half == 0) sm.p[h][j] = j < n ? tot * scale_log2 : NEG_INF;
      }
    }
    __syncthreads();
    // Online softmax: a warp per head, TILE / 32 tokens a lane.
#pragma unroll
    for (int i = 0; i < HPW; ++i) {
      const int h = warp + 4 * i;
      if (h < GROUP) {
        float x[TILE / 32], mt = NEG_INF;
#pragma unroll
        for (int u = 0; u < TILE / 32; ++u) { x[u] = sm.p[h][lane + 32 * u]; mt = fmaxf(mt, x[u]); }
        const float mnew = fmaxf(m_run[i], warp_max(mt));
        float ps = 0.f, alpha = 1.f;
#pragma unroll
        for (int u = 0; u < TILE / 32; ++u) {
          const float p = mnew != NEG_INF ? exp2f(x[u] - mnew) : 0.f;
          ps += p;
          sm.p[h][lane + 32 * u] = to_f<IS_BF16>(from_f<IS_BF16>(p));  // rounded as in Triton
        }
        if (mnew != NEG_INF) alpha = exp2f(m_run[i] - mnew);  // exp2(-inf) = 0: first tile
        l_run[i] = l_run[i] * alpha + warp_sum(ps);
        m_run[i] = mnew;
        if (lane == 0) sm.alpha[h] = alpha;
      }
    }
    __syncthreads();
    // P @ V: each V element is read once and used for every head of the group.
#pragma unroll
    for (int h = 0; h < GROUP; ++h) {
      const float a = sm.alpha[h];
      acc[h][0] *= a;
      acc[h][1] *= a;
    }
#pragma unroll 4
    for (int j = tg; j < n; j += NG) {
      const unsigned vv = *(const unsigned*)(vt[j] + 2 * dp);
      const float v0 = to_f<IS_BF16>((u16)(vv & 0xffffu)), v1 = to_f<IS_BF16>((u16)(vv >> 16));
#pragma unroll
      for (int h = 0; h < GROUP; ++h) {
        const float pj = sm.p[h][j];
        acc[h][0] += pj * v0;
        acc[h][1] += pj * v1;
      }
    }
    __syncthreads();  // the slot is free: refill it
    load_tile(t + STAGES);
  }
  asm volatile("cp.async.wait_all;" ::: "memory");
  // The token groups' P @ V partials meet in the (now idle) ring.
  __syncthreads();
  float* red = reinterpret_cast<float*>(&sm.kv[0][0][0][0]);
#pragma unroll
  for (int h = 0; h < GROUP; ++h)
    *(float2*)&red[(tg * GROUP + h) * HEAD_DIM + 2 * dp] = make_float2(acc[h][0], acc[h][1]);
  __syncthreads();

  // Push this split's (m, l) to every program and each acc value to the program that
  // merges it; one cluster barrier (release / acquire) later each merges its slice.
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
#pragma unroll
  for (int i = 0; i < HPW; ++i) {
    const int h = warp + 4 * i;
    if (h < GROUP && lane < SPLITS) {
      st_cluster(&sm.part_m[split][h], lane, m_run[i]);
      st_cluster(&sm.part_l[split][h], lane, l_run[i]);
    }
  }
  for (int idx = tid; idx < GROUP * HEAD_DIM; idx += NT) {
    float v = 0.f;
#pragma unroll
    for (int g = 0; g < NG; ++g) v += red[g * GROUP * HEAD_DIM + idx];
    st_cluster(&sm.part_acc[split][idx % SLICE], idx / SLICE, v);
  }
  asm volatile("barrier.cluster.arrive.release.aligned;\n"
               "barrier.cluster.wait.acquire.aligned;" ::: "memory");
  if (tid < SLICE)
    store_merged(tid, split, &sm.part_m[0][0], &sm.part_l[0][0], &sm.part_acc[0][0], out,
                 (long long)b * (gridDim.y * GROUP) + kvh * GROUP);
}
"""


def _source(head_dim: int, group: int, dtype: torch.dtype) -> str:
    defs = (f"#define HEAD_DIM {head_dim}\n#define GROUP {group}\n#define SPLITS {SPLITS}\n"
            f"#define STAGES {_STAGES}\n#define TILE {_TILE}\n#define SMEM_BYTES {_smem_bytes(head_dim, group)}\n"
            f"#define IS_BF16 {'true' if dtype == torch.bfloat16 else 'false'}\n")
    return cuda_rtc.DEVICE_HELPERS + defs + ATTENTION_HELPERS + _BODY


def _module_name(head_dim: int, group: int, dtype: torch.dtype) -> str:
    return f"stream_decode_d{head_dim}_g{group}_{'bf16' if dtype == torch.bfloat16 else 'f16'}"


def _smem_bytes(head_dim: int, group: int) -> int:
    ring = _STAGES * 2 * _TILE * head_dim * 2
    slice_ = -(-group * head_dim // SPLITS)
    return (ring + group * head_dim * 2 + group * _TILE * 4 + group * 4
            + 2 * SPLITS * group * 4 + SPLITS * slice_ * 4)


@functools.cache
def _hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


@functools.cache
def _smem_optin(index: int) -> int:
    return getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", 0)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _unit_stride(t: torch.Tensor, dtype: torch.dtype, dim: int) -> bool:
    return t.dtype == dtype and t.dim() == dim and t.stride(-1) == 1


@functools.cache
def _launchable(index: int, head_dim: int, group: int, dtype: torch.dtype) -> bool:
    """The kernel compiles on the device and one 8-program cluster of it fits there."""
    src, name = _source(head_dim, group, dtype), _module_name(head_dim, group, dtype)
    if not cuda_rtc.compiles(src, name, index):
        return False
    kernel = cuda_rtc.compile_module(src, name, torch.device("cuda", index)).kernel(
        "stream_decode", carveout=100)
    try:
        n = cuda_rtc.max_active_clusters(kernel, (SPLITS, 1, 1), _NUM_THREADS,
                                         _smem_bytes(head_dim, group))
    except RuntimeError as e:
        logger.warning("stream_decode cannot launch its clusters on cuda:%d: %s", index, e)
        return False
    return n > 0


def layout_supported(q: torch.Tensor, kv_cache: torch.Tensor, new_kv: DecodeNewKV,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor) -> bool:
    """What both CUDA attention kernels (this and `batch_decode`) ask of a decode step's
    tensors, at any batch size: a Hopper-or-newer device with the CUDA runtime pieces,
    bf16/fp16, head_dim 64 or 128, 1-8 query heads per KV head, the cache, index and norm
    layouts of the module docstring, and the switch PAGED_BACKEND_STREAM_GEMV not "0"."""
    if q.device.type != "cuda" or q.dim() != 3 or kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        return False
    batch, hq, d = q.shape
    hkv = kv_cache.shape[3]
    if not (q.dtype in (torch.bfloat16, torch.float16) and kv_cache.dtype == q.dtype
            and d in (64, 128) and kv_cache.shape[4] == d and hq % hkv == 0
            and 1 <= hq // hkv <= 8 and batch >= 1):
        return False
    if os.environ.get(STREAM_GEMV_ENV, "1") == "0":
        return False
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    if k_cache.stride() != v_cache.stride() or kv_cache.stride(-1) != 1 or q.stride(-1) != 1:
        return False
    if any(s % 8 for s in k_cache.stride()[:3]) or kv_cache.data_ptr() % 16 \
            or (kv_cache.stride(0) * kv_cache.element_size()) % 16:
        return False
    nk = new_kv
    for t in (nk.k, nk.v):
        if t.dtype != q.dtype or t.dim() != 3 or t.shape[0] < batch \
                or t.shape[1:] != (hkv, d) or t.stride(-1) != 1:
            return False
    # Read before the PDL wait, so taken as they are (a conversion would be a kernel in front).
    if not (_unit_stride(block_tables, torch.int32, 2) and _unit_stride(seq_lens, torch.int32, 1)
            and _unit_stride(nk.positions, torch.int64, 1)
            and _unit_stride(nk.slot_mapping, torch.int64, 1)
            and nk.inv_freq.shape == (d // 2,) and _unit_stride(nk.inv_freq, torch.float32, 1)):
        return False
    if min(block_tables.shape[0], seq_lens.shape[0], nk.positions.shape[0],
           nk.slot_mapping.shape[0]) < batch:
        return False
    norms = [w for w in (nk.q_norm_weight, nk.k_norm_weight) if w is not None]
    if any(w.shape != (d,) or not _unit_stride(w, q.dtype, 1) for w in norms):
        return False
    if not all(t.device == q.device for t in (kv_cache, nk.k, nk.v, block_tables, seq_lens,
                                               nk.positions, nk.slot_mapping, nk.inv_freq,
                                               *norms)):
        return False
    return _hopper(_index(q.device)) and cuda_rtc.available()


def stream_decode_supported(q: torch.Tensor, kv_cache: torch.Tensor, new_kv: DecodeNewKV,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor) -> bool:
    """Whether `stream_decode` takes this decode step (see the module docstring's limits)."""
    if not layout_supported(q, kv_cache, new_kv, block_tables, seq_lens):
        return False
    if q.shape[0] > STREAM_DECODE_MAX_BATCH:
        return False
    index = _index(q.device)
    d, group = q.shape[2], q.shape[1] // kv_cache.shape[3]
    if _smem_bytes(d, group) > _smem_optin(index):
        return False
    return _launchable(index, d, group, q.dtype)


def stream_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                  seq_lens: torch.Tensor, scale: float, new_kv: DecodeNewKV,
                  out: Optional[torch.Tensor] = None, *,
                  trigger_early: bool = False) -> torch.Tensor:
    """`decode_attention(q, kv_cache, block_tables, seq_lens, scale, new_kv=new_kv)` for a
    few sequences (the caller checks `stream_decode_supported`). Returns `[B, Hq, D]`.

    `trigger_early` (with PDL): let the next kernel launch as this one starts, not after
    its wait, so the next kernel's pre-wait phase (a GEMV's weight loads) overlaps all of
    this one. The caller promises that the next kernel reads nothing before its wait that
    this kernel or its predecessors back to the nearest one that triggers after its own
    wait write (kernels/pdl.py)."""
    if not stream_decode_supported(q, kv_cache, new_kv, block_tables, seq_lens):
        raise ValueError("stream_decode does not take this call (see stream_decode_supported)")
    batch, hq, d = q.shape
    hkv = kv_cache.shape[3]
    group = hq // hkv
    nk = new_kv
    if out is None:
        out = torch.empty((batch, hq, d), dtype=q.dtype, device=q.device)
    else:
        assert out.shape == (batch, hq, d) and out.is_contiguous() and out.dtype == q.dtype
    pdl = pdl_enabled(q)
    mod = cuda_rtc.compile_module(_source(d, group, q.dtype), _module_name(d, group, q.dtype),
                                  q.device)
    kernel = mod.kernel("stream_decode", carveout=100)
    args = kernel_args(q, kv_cache, block_tables, seq_lens, scale, nk, out, pdl, trigger_early)
    cuda_rtc.launch(kernel, (SPLITS, hkv, batch), _NUM_THREADS, _smem_bytes(d, group), args, pdl)
    return out


def kernel_args(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                seq_lens: torch.Tensor, scale: float, new_kv: DecodeNewKV, out: torch.Tensor,
                pdl: bool, trigger_early: bool) -> list:
    """The launch arguments of both CUDA attention kernels (this and `batch_decode`, which
    share the signature), flags included."""
    nk = new_kv
    flags = ((1 if nk.q_norm_weight is not None else 0) | (2 if nk.k_norm_weight is not None else 0)
             | (4 if pdl else 0) | (8 if pdl and trigger_early else 0))
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    null = ctypes.c_void_p(0)
    ll, ptr = ctypes.c_longlong, ctypes.c_void_p

    def p(t: Optional[torch.Tensor]) -> ctypes.c_void_p:
        return ptr(t.data_ptr()) if t is not None else null

    return [p(q), ll(q.stride(0)), ll(q.stride(1)),
            p(nk.k), ll(nk.k.stride(0)), ll(nk.k.stride(1)),
            p(nk.v), ll(nk.v.stride(0)), ll(nk.v.stride(1)),
            p(k_cache), p(v_cache), ll(k_cache.stride(0)), ll(k_cache.stride(1)),
            ll(k_cache.stride(2)),
            p(block_tables), ll(block_tables.stride(0)), p(seq_lens),
            p(nk.positions), p(nk.slot_mapping), p(nk.inv_freq), p(nk.q_norm_weight),
            p(nk.k_norm_weight),
            ctypes.c_float(nk.eps), ctypes.c_float(float(scale) * _LOG2E), p(out),
            ctypes.c_int(kv_cache.shape[2]), ctypes.c_int(flags)]
