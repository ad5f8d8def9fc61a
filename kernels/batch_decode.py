"""Decode attention for batches of sequences: per-warp `cp.async` rings and tensor-core MMAs (Hopper).

`batch_decode` computes what `decode_attention(..., new_kv=DecodeNewKV(...))`
computes (kernels/decode_attention.py: normalize and rotate q and the new k,
store the new k and v at the token's slot, attend over the whole context);
results differ by float32 summation order and by where P is rounded (per warp
and 16-token chunk here, per split and 64-token tile there; the new token's
weight is not rounded here). It exists for the bandwidth of decode steps of
many sequences (bench-64's 16-64), where the Triton split kernel reads the
cache at ~2.2 TB/s: its K/V gathers land in registers one tile at a time, so a
program's loads stop while it computes. On the H100 this kernel reads it at
2.5-2.8 TB/s at 8-64 sequences (benchmarks/decode_attention.py --new-kv;
bench-64 +8-10%, bench-256 +9% for Qwen3-0.6B, BENCHMARKS.md).

Grid `(SPLITS, Hkv, B)`; with SPLITS > 1 the programs of one (sequence, KV
head) form a thread-block cluster and merge their results through distributed
shared memory, as `stream_decode` does (no scratch, no second kernel). The
cached positions (all `seq_len` of them, or `seq_len - 1` when the new token
is stored this step) are cut into chunks of 16 tokens; split `s` owns a
contiguous run of chunks, and its warp `w` the chunks `w, w + NWARPS, ...` of
that run. Every warp is on its own: it streams its chunks through a private
ring of STAGES shared-memory slots (16-byte `cp.async` copies gathered through
the block table, rows XOR-swizzled so that `ldmatrix` reads hit distinct
banks, rows past the end zero-filled) and keeps STAGES - 1 chunks in flight
while it computes one, with `__syncwarp` as its only barrier. A chunk is two
MMA passes on the tensor cores (`mma.m16n8k16`, float32 accumulators): the
group's query heads are the 16 rows of the A operand (rows past the group are
zero), K the B operand of the scores, and the probabilities, rounded to the
dtype as in the Triton kernel, go from the score accumulators straight into
the A operand of P @ V. The online softmax is per warp, in base 2.

The step's own token never goes through the cache read: the program that owns
it (the last split) rotates k, stores k and v at the slot after the PDL wait,
and adds the token as one more partial (max = its score, sum = 1, acc = v)
when it merges its warps. So the first STAGES chunks of every warp are issued
before `griddepcontrol.wait`, as in `stream_decode`, and the same PDL
precondition holds (kernels/pdl.py): the block table, seq_lens, positions,
slots, the cached context and the rotary and norm constants are read before
the wait. A row whose slot is negative stores nothing and reads all `seq_len`
positions from the cache, as the Triton kernel does; a row with `seq_len == 0`
gets zeros.

Limits, checked by `batch_decode_supported` (callers keep the Triton path):
those of `stream_decode.layout_supported` (bf16/fp16, head_dim 64 or 128, at most 8
query heads per KV head, the cache, index and norm-weight layouts), up to
65,535 sequences (the grid's z), a compute-capability-9+ GPU where the kernel
compiles with the chosen splits, warps and ring depth, whose shared memory
fits and whose cluster can launch, and PAGED_BACKEND_STREAM_GEMV not "0".
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch

from . import cuda_rtc
from .decode_attention import DecodeNewKV
from .pdl import pdl_enabled
from .stream_decode import ATTENTION_HELPERS, kernel_args, layout_supported

logger = logging.getLogger(__name__)

NWARPS = 4
STAGES = 3  # chunks in a warp's ring; STAGES - 1 stay in flight while it computes one
CHUNK = 16  # tokens a warp takes at a time (the N of the score MMA, the K of P @ V)
MAX_SPLITS = 8  # the portable cluster size

_BODY = r"""
#define NT (NWARPS * 32)
#define CH 16                      // tokens a chunk
#define CPR (HEAD_DIM / 8)         // 16-byte pieces a row
#define ROWB (HEAD_DIM * 2)        // bytes a row
#define KSTEPS (HEAD_DIM / 16)     // k steps of the score MMA
#define DTILES (HEAD_DIM / 8)      // n tiles of P @ V
#define EPL (HEAD_DIM / 32)
#define NPART (NWARPS + 1)         // the warps' partials and the new token's

struct Smem {
  u16 kv[NWARPS][STAGES][2][CH][HEAD_DIM];  // a ring per warp: K and V of a chunk a slot
  u16 q[GROUP][HEAD_DIM];                   // normalized, rotated query heads
  u16 knew[HEAD_DIM], vnew[HEAD_DIM];       // the new token (its owner only)
  float wm[NPART][GROUP], wl[NPART][GROUP];
#if SPLITS > 1
  float part_m[SPLITS][GROUP], part_l[SPLITS][GROUP];
  float part_acc[SPLITS][SLICE];
#endif
};
static_assert(sizeof(Smem) == SMEM_BYTES, "batch_decode.py's _smem_bytes is out of date");
static_assert(NWARPS * GROUP * HEAD_DIM * 4 <= sizeof(((Smem*)0)->kv), "warp partials reuse the rings");
static_assert(GROUP <= 8, "the query heads are rows 0-7 of the MMA");

__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
               :: "r"(dst), "l"(src), "r"(bytes) : "memory");
}

__device__ __forceinline__ void ldsm4(unsigned a, unsigned* r) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

__device__ __forceinline__ void ldsm4_t(unsigned a, unsigned* r) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

// c += A * B for one m16n8k16 tile; A's rows 8-15 are zero (a1 = a3 = 0).
__device__ __forceinline__ void mma(float* c, unsigned a0, unsigned a2, unsigned b0, unsigned b1) {
#if IS_BF16
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
#else
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
#endif
               "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned pack2(float lo, float hi) {  // rounded to the dtype
  unsigned r;
#if IS_BF16
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
  return r;
}

extern "C" __global__ void
#if SPLITS > 1
__cluster_dims__(SPLITS, 1, 1)
#endif
__launch_bounds__(NT)
batch_decode(ATTENTION_PARAMS) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;  // MMA fragment row (query head) and column pair
#if SPLITS > 1
  unsigned split;
  asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(split));
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
#else
  const unsigned split = 0;
#endif
  const int kvh = blockIdx.y, b = blockIdx.z;
  if ((flags & F_PDL) && (flags & F_EARLY))
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");

  // Before the PDL wait: only data that no kernel of this step writes before this one
  // (kernels/pdl.py): the block table, seq_lens, slots, the cached context, constants.
  const int L = seq_lens[b];
  const bool store_new = L > 0 && slots[b] >= 0;
  const int ncache = store_new ? L - 1 : L;   // positions read from the cache
  const bool owner = store_new && split == SPLITS - 1;
  const int nchunks = (ncache + CH - 1) / CH;
  const int per = (nchunks + SPLITS - 1) / SPLITS;
  const int cbeg = min((int)split * per, nchunks), cend = min(cbeg + per, nchunks);
  const int nmine = cend - cbeg > warp ? (cend - cbeg - warp + NWARPS - 1) / NWARPS : 0;
  const int* bt_row = bt + (long long)b * s_btb;
  const long long head_off = (long long)kvh * s_head;

  // Chunk i of this warp into ring slot i % STAGES: a lane finds row (lane % 16)'s cache
  // offset, then 32 lanes copy 512 bytes (two or four rows) an instruction (16-byte
  // pieces, swizzled).
  auto load_chunk = [&](int i) {
    if (i < nmine) {
      const int t0 = (cbeg + warp + i * NWARPS) * CH;
      const int p = t0 + (lane & (CH - 1));
      long long roff = 0;
      if (p < ncache)
        roff = (long long)bt_row[p / block_size] * s_blk + (long long)(p % block_size) * s_slot;
      const int nval = min(CH, ncache - t0);
      const unsigned kdst = smem_u32(&sm.kv[warp][i % STAGES][0][0][0]);
      const unsigned vdst = smem_u32(&sm.kv[warp][i % STAGES][1][0][0]);
#pragma unroll
      for (int it = 0; it < CH * CPR / 32; ++it) {
        const int e = it * 32 + lane, r = e / CPR, c = e % CPR;
        const long long ro = __shfl_sync(0xffffffffu, roff, r);
        const unsigned so = r * ROWB + ((c ^ (r & 7)) << 4);
        const bool ok = r < nval;
        const long long off = ok ? ro + head_off + c * 8 : 0;
        cp_async16(kdst + so, kc + off, ok ? 16 : 0);
        cp_async16(vdst + so, vc + off, ok ? 16 : 0);
      }
    }
    asm volatile("cp.async.commit_group;" ::: "memory");  // one group a chunk, even empty
  };
#pragma unroll
  for (int i = 0; i < STAGES; ++i) load_chunk(i);

  float cs[EPL], sn[EPL], qnw[EPL], knw[EPL];
  rotary_setup(L > 0 ? (float)pos[b] : 0.f, inv_freq, qw, kw, flags, lane, cs, sn, qnw, knw);

  pdl_wait(flags);

  // Rotary: a warp a query head; the owner's last warp also k, stored with v at the slot.
  for (int h = warp; h < GROUP; h += NWARPS) {
    float x[EPL];
    load_norm_rotate(q + (long long)b * s_qb + (long long)(kvh * GROUP + h) * s_qh, x,
                     flags & F_QNORM, qnw, eps, cs, sn, lane);
#pragma unroll
    for (int e = 0; e < EPL; ++e) sm.q[h][lane * EPL + e] = from_f<IS_BF16>(x[e]);
  }
  if (owner && warp == NWARPS - 1) {
    const u16* vsrc = vn + (long long)b * s_vnb + (long long)kvh * s_vnh + lane * EPL;
    float x[EPL];
    load_norm_rotate(kn + (long long)b * s_knb + (long long)kvh * s_knh, x, flags & F_KNORM,
                     knw, eps, cs, sn, lane);
    const long long slot = slots[b];
    const long long off = (slot / block_size) * s_blk + (slot % block_size) * s_slot +
                          head_off + lane * EPL;
#pragma unroll
    for (int e = 0; e < EPL; ++e) {
      const u16 kr = from_f<IS_BF16>(x[e]), vr = vsrc[e];
      sm.knew[lane * EPL + e] = kr;
      sm.vnew[lane * EPL + e] = vr;
      kc[off + e] = kr;
      vc[off + e] = vr;
    }
  }
  __syncthreads();

  // The query heads as A fragments (rows g < GROUP; a1 = a3 = 0 are the rows 8-15).
  unsigned qa[KSTEPS][2];
#pragma unroll
  for (int ks = 0; ks < KSTEPS; ++ks) {
    qa[ks][0] = g < GROUP ? *(const unsigned*)&sm.q[g][ks * 16 + 2 * t4] : 0u;
    qa[ks][1] = g < GROUP ? *(const unsigned*)&sm.q[g][ks * 16 + 8 + 2 * t4] : 0u;
  }
  float acc[DTILES][4];
#pragma unroll
  for (int n = 0; n < DTILES; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  float m_run = NEG_INF, l_run = 0.f;  // row g's; l_run is this thread's share of the sum
  // ldmatrix row addresses (before the slot's base): K for the scores (matrices: tokens
  // 0-7 / 8-15 x the k step's low / high 8 dims), V transposed (tokens 0-7 / 8-15 x two
  // dimension tiles).
  const int k_row = ((lane >> 4) << 3) + (lane & 7), k_hi = (lane >> 3) & 1;
  const int v_row = (((lane >> 3) & 1) << 3) + (lane & 7), v_hi = lane >> 4;

  for (int i = 0; i < nmine; ++i) {
    asm volatile("cp.async.wait_group %0;" :: "n"(STAGES - 1) : "memory");
    __syncwarp();
    const unsigned kb = smem_u32(&sm.kv[warp][i % STAGES][0][0][0]);
    const unsigned vb = smem_u32(&sm.kv[warp][i % STAGES][1][0][0]);
    float s0[4] = {0.f, 0.f, 0.f, 0.f}, s1[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      unsigned r[4];
      ldsm4(kb + k_row * ROWB + (((2 * ks + k_hi) ^ (k_row & 7)) << 4), r);
      mma(s0, qa[ks][0], qa[ks][1], r[0], r[1]);
      mma(s1, qa[ks][0], qa[ks][1], r[2], r[3]);
    }
    // Row g's scores of tokens 2 t4, 2 t4 + 1 (s0) and 8 + 2 t4, 9 + 2 t4 (s1).
    const int nval = min(CH, ncache - (cbeg + warp + i * NWARPS) * CH);
    float sc[4] = {s0[0], s0[1], s1[0], s1[1]};
    float mx = NEG_INF;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int tok = (u >> 1) * 8 + 2 * t4 + (u & 1);
      sc[u] = tok < nval ? sc[u] * scale_log2 : NEG_INF;
      mx = fmaxf(mx, sc[u]);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m_run, mx);  // finite: token 0 of a chunk is valid
    const float alpha = exp2f(m_run - m_new);
    float p[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) p[u] = exp2f(sc[u] - m_new);
    l_run = l_run * alpha + (p[0] + p[1] + p[2] + p[3]);
    m_run = m_new;
#pragma unroll
    for (int n = 0; n < DTILES; ++n) { acc[n][0] *= alpha; acc[n][1] *= alpha; }
    const unsigned pa0 = pack2(p[0], p[1]), pa2 = pack2(p[2], p[3]);
#pragma unroll
    for (int n = 0; n < DTILES; n += 2) {
      unsigned r[4];
      ldsm4_t(vb + v_row * ROWB + (((n + v_hi) ^ (v_row & 7)) << 4), r);
      mma(acc[n], pa0, pa2, r[0], r[1]);
      mma(acc[n + 1], pa0, pa2, r[2], r[3]);
    }
    __syncwarp();  // every lane is done with the slot: refill it
    load_chunk(i + STAGES);
  }
  asm volatile("cp.async.wait_all;" ::: "memory");
  __syncthreads();  // the rings are idle: the warps' partial accumulators go there

  float* wacc = reinterpret_cast<float*>(&sm.kv[0][0][0][0][0]);  // [NWARPS][GROUP][HEAD_DIM]
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 1);
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 2);
  if (g < GROUP) {
    if (t4 == 0) { sm.wm[warp][g] = m_run; sm.wl[warp][g] = l_run; }
#pragma unroll
    for (int n = 0; n < DTILES; ++n)
      *(float2*)&wacc[(warp * GROUP + g) * HEAD_DIM + n * 8 + 2 * t4] = make_float2(acc[n][0], acc[n][1]);
  }
  // The new token's partial (its owner's): its score (a warp a head), sum 1, acc = v.
  for (int h = warp; h < GROUP; h += NWARPS) {
    float s = 0.f;
    if (owner) {
#pragma unroll
      for (int e = 0; e < EPL; ++e)
        s += to_f<IS_BF16>(sm.q[h][lane * EPL + e]) * to_f<IS_BF16>(sm.knew[lane * EPL + e]);
      s = warp_sum(s);
    }
    if (lane == 0) {
      sm.wm[NWARPS][h] = owner ? s * scale_log2 : NEG_INF;
      sm.wl[NWARPS][h] = owner ? 1.f : 0.f;
    }
  }
  __syncthreads();

  // Merge the warps (and the new token): thread per output value.
#if SPLITS > 1
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
#endif
  for (int idx = tid; idx < GROUP * HEAD_DIM; idx += NT) {
    const int h = idx / HEAD_DIM, d = idx % HEAD_DIM;
    float mx = NEG_INF;
#pragma unroll
    for (int w = 0; w < NPART; ++w) mx = fmaxf(mx, sm.wm[w][h]);
    float tot = 0.f, o = 0.f;
    if (mx != NEG_INF) {
#pragma unroll
      for (int w = 0; w < NWARPS; ++w) {
        const float wgt = exp2f(sm.wm[w][h] - mx);  // a warp without chunks: 0
        tot += wgt * sm.wl[w][h];
        o += wgt * wacc[(w * GROUP + h) * HEAD_DIM + d];
      }
      if (owner) {
        const float wgt = exp2f(sm.wm[NWARPS][h] - mx);
        tot += wgt;
        o += wgt * to_f<IS_BF16>(sm.vnew[d]);
      }
    }
#if SPLITS > 1
    // Push this split's (max, sum) to every program, each acc value to its merger.
    if (d == 0) {
      for (int r = 0; r < SPLITS; ++r) {
        st_cluster(&sm.part_m[split][h], r, mx);
        st_cluster(&sm.part_l[split][h], r, tot);
      }
    }
    st_cluster(&sm.part_acc[split][idx % SLICE], idx / SLICE, o);
#else
    out[((long long)b * (gridDim.y * GROUP) + kvh * GROUP + h) * HEAD_DIM + d] =
        from_f<IS_BF16>(tot > 0.f ? o / tot : 0.f);
#endif
  }
#if SPLITS > 1
  asm volatile("barrier.cluster.arrive.release.aligned;\n"
               "barrier.cluster.wait.acquire.aligned;" ::: "memory");
  for (int t = tid; t < SLICE; t += NT)
    store_merged(t, split, &sm.part_m[0][0], &sm.part_l[0][0], &sm.part_acc[0][0], out,
                 (long long)b * (gridDim.y * GROUP) + kvh * GROUP);
#endif
}
"""


def _smem_bytes(head_dim: int, group: int, splits: int, nwarps: int = NWARPS,
                stages: int = STAGES) -> int:
    ring = nwarps * stages * 2 * CHUNK * head_dim * 2
    size = ring + group * head_dim * 2 + 2 * head_dim * 2 + 2 * (nwarps + 1) * group * 4
    if splits > 1:
        slice_ = -(-group * head_dim // splits)
        size += 2 * splits * group * 4 + splits * slice_ * 4
    return size


def _source(head_dim: int, group: int, dtype: torch.dtype, splits: int,
            nwarps: int = NWARPS, stages: int = STAGES) -> str:
    defs = (f"#define HEAD_DIM {head_dim}\n#define GROUP {group}\n#define SPLITS {splits}\n"
            f"#define NWARPS {nwarps}\n#define STAGES {stages}\n"
            f"#define SMEM_BYTES {_smem_bytes(head_dim, group, splits, nwarps, stages)}\n"
            f"#define IS_BF16 {1 if dtype == torch.bfloat16 else 0}\n")
    return cuda_rtc.DEVICE_HELPERS + defs + ATTENTION_HELPERS + _BODY


def _module_name(head_dim: int, group: int, dtype: torch.dtype, splits: int,
                 nwarps: int = NWARPS, stages: int = STAGES) -> str:
    dt = "bf16" if dtype == torch.bfloat16 else "f16"
    return f"batch_decode_d{head_dim}_g{group}_{dt}_s{splits}_w{nwarps}_r{stages}"


@functools.cache
def _launchable(index: int, head_dim: int, group: int, dtype: torch.dtype, splits: int,
                nwarps: int = NWARPS, stages: int = STAGES) -> bool:
    """The kernel compiles on the device, its shared memory fits, and (with splits) one
    cluster of it can launch there."""
    src = _source(head_dim, group, dtype, splits, nwarps, stages)
    name = _module_name(head_dim, group, dtype, splits, nwarps, stages)
    smem = _smem_bytes(head_dim, group, splits, nwarps, stages)
    if smem > getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", 0):
        return False
    if not cuda_rtc.compiles(src, name, index):
        return False
    if splits == 1:
        return True
    kernel = cuda_rtc.compile_module(src, name, torch.device("cuda", index)).kernel(
        "batch_decode", carveout=100)
    try:
        n = cuda_rtc.max_active_clusters(kernel, (splits, 1, 1), nwarps * 32, smem)
    except RuntimeError as e:
        logger.warning("batch_decode cannot launch its clusters on cuda:%d: %s", index, e)
        return False
    return n > 0


def choose_splits(batch: int, num_kv_heads: int) -> int:
    """Programs per (sequence, KV head) for `batch * num_kv_heads` (sequence, KV head) pairs.

    On the H100 (benchmarks/decode_attention.py --new-kv, Hkv 8, BENCHMARKS.md): 2 splits
    were fastest or within 1% of it at batch 16, 32 and 64 (lengths U[150, 1800]) and
    beat 4 at batch 8 and 12 (U[1000, 2000]); 4 or 8 at batch 5. Clusters of 8 lose from
    batch 8 up (they wait for SMs), and in the engine 4 splits lost at bench-64."""
    pairs = batch * num_kv_heads
    if pairs >= 1024:
        return 1
    if pairs >= 64:
        return 2
    return 4 if pairs >= 32 else 8


def batch_decode_supported(q: torch.Tensor, kv_cache: torch.Tensor, new_kv: DecodeNewKV,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           splits: Optional[int] = None, nwarps: int = NWARPS,
                           stages: int = STAGES) -> bool:
    """Whether `batch_decode` takes this decode step with these splits (default
    `choose_splits`), warps and ring depth (see the module docstring's limits)."""
    if not layout_supported(q, kv_cache, new_kv, block_tables, seq_lens):
        return False
    if q.shape[0] > 65535 or not (1 <= nwarps <= 16 and stages >= 1):
        return False
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    hkv = kv_cache.shape[3]
    if splits is None:
        splits = choose_splits(q.shape[0], hkv)
    return _launchable(index, q.shape[2], q.shape[1] // hkv, q.dtype, splits, nwarps, stages)


def batch_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float, new_kv: DecodeNewKV,
                 out: Optional[torch.Tensor] = None, *, splits: Optional[int] = None,
                 trigger_early: bool = False, nwarps: int = NWARPS,
                 stages: int = STAGES) -> torch.Tensor:
    """`decode_attention(q, kv_cache, block_tables, seq_lens, scale, new_kv=new_kv)` for any
    number of sequences (the caller checks `batch_decode_supported`). Returns `[B, Hq, D]`.

    `splits` (1, 2, 4 or 8; default `choose_splits`) programs share a sequence's KV head.
    `trigger_early`: as `stream_decode`'s (the next kernel launches as this one starts).
    `nwarps` and `stages` are tuning knobs (warps a program, ring slots a warp)."""
    if splits is not None and splits not in (1, 2, 4, 8):
        raise ValueError(f"splits must be 1, 2, 4 or 8, got {splits}")
    if not batch_decode_supported(q, kv_cache, new_kv, block_tables, seq_lens, splits, nwarps,
                                  stages):
        raise ValueError("batch_decode does not take this call (see batch_decode_supported)")
    batch, hq, d = q.shape
    hkv = kv_cache.shape[3]
    group = hq // hkv
    if splits is None:
        splits = choose_splits(batch, hkv)
    if out is None:
        out = torch.empty((batch, hq, d), dtype=q.dtype, device=q.device)
    else:
        assert out.shape == (batch, hq, d) and out.is_contiguous() and out.dtype == q.dtype
    pdl = pdl_enabled(q)
    mod = cuda_rtc.compile_module(_source(d, group, q.dtype, splits, nwarps, stages),
                                  _module_name(d, group, q.dtype, splits, nwarps, stages),
                                  q.device)
    kernel = mod.kernel("batch_decode", carveout=100)
    args = kernel_args(q, kv_cache, block_tables, seq_lens, scale, new_kv, out, pdl,
                       trigger_early)
    cuda_rtc.launch(kernel, (splits, hkv, batch), nwarps * 32,
                    _smem_bytes(d, group, splits, nwarps, stages), args, pdl)
    return out
