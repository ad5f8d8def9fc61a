"""Probe: would a persistent Triton kernel beat the one-token kernel chain? (not used by the engine)

Streams the GEMV weights of a qwen3-0.6b decode step at M=1 (28 layers of qkv 4096x1024,
o 1024x2048, gate/up 6144x1024, down 1024x3072; bf16, 880 MB) from ONE launch of one
program per SM, with a grid barrier after each phase and an empty "attention" phase
(5 barriers per layer), and prints the GPU time per step of each variant:

- `barrier`: the barriers alone;
- `gemv`: each program computes its rows of every phase, K in chunks;
- `gemv+l2`: also prefetches its next phase's rows into L2 before each barrier;
- `preload`: loads its next phase's whole tile into registers before each barrier;
- `runahead W`: every phase prefetches into L2 the bytes W ahead of its own weights
  (one flat buffer in execution order), so memory runs ahead of the compute.

The grid barrier spins on a global counter, so every program must be resident at once:
one program per SM, nothing else on the GPU. On the H100 (BENCHMARKS.md, 2026-11-26) none
of the variants beat the engine's chain of separate kernels.

    python benchmarks/persistent_probe.py
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl

# qwen3-0.6b: hidden size, q+k+v rows, attention output width, gate+up rows
H = tl.constexpr(1024)
NQKV = tl.constexpr(4096)
QS = tl.constexpr(2048)
I2 = tl.constexpr(2 * 3072)


@triton.jit
def _barrier(counter_ptr, target):
    """Every program waits until `target` arrivals at `counter_ptr` (monotonic counter)."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    cur = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    while cur < target:
        cur = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _prefetch_rows(w_ptr, row0, nrows, N, K, R: tl.constexpr, LINES: tl.constexpr):
    """L2 prefetch of rows [row0, row0 + nrows) of a row-major [N, K] bf16 weight."""
    rows = tl.minimum(row0 + tl.minimum(tl.arange(0, R), nrows - 1), N - 1)
    ks = tl.minimum(tl.arange(0, LINES) * 64, K - 1)
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l",
                              [w_ptr + rows[:, None].to(tl.int64) * K + ks[None, :]],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_bytes(base_ptr, start, nbytes, pid, G, CH: tl.constexpr):
    """L2 prefetch (evict-last) of bytes [start, start + nbytes), dealt to the programs."""
    for c in range(pid * CH, nbytes // 128, G * CH):
        offs = start + (c + tl.arange(0, CH)).to(tl.int64) * 128
        tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;",
                                  "=r,l", [base_ptr + offs], dtype=tl.int32, is_pure=False,
                                  pack=1)


@triton.jit
def _gemv(x_ptr, w_ptr, out_ptr, row0, nrows, K, R: tl.constexpr, BK: tl.constexpr):
    """out[row0 + r] = w[row0 + r, :K] . x[:K] for r < nrows, K in chunks of BK."""
    rows = tl.arange(0, R)
    rmask = rows < nrows
    acc = tl.zeros([R], tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + ks).to(tl.float32)
        w = tl.load(w_ptr + (row0 + rows)[:, None].to(tl.int64) * K + ks[None, :],
                    mask=rmask[:, None], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    tl.store(out_ptr + row0 + rows, acc.to(out_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _load_tile(w_ptr, row0, nrows, K, R: tl.constexpr, KB: tl.constexpr):
    rows = tl.arange(0, R)
    ks = tl.arange(0, KB)
    m = (rows < nrows)[:, None] & (ks < K)[None, :]
    return tl.load(w_ptr + (row0 + rows)[:, None].to(tl.int64) * K + ks[None, :], mask=m,
                   other=0.0)


@triton.jit
def _apply_tile(w, x_ptr, out_ptr, row0, nrows, K, R: tl.constexpr, KB: tl.constexpr):
    rows = tl.arange(0, R)
    ks = tl.arange(0, KB)
    x = tl.load(x_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
    acc = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    tl.store(out_ptr + row0 + rows, acc.to(out_ptr.dtype.element_ty), mask=rows < nrows)


@triton.jit
def _step_kernel(x_ptr, qkv_ptr, act_ptr, flat_ptr, bytes_ptr, counter_ptr, L, W,
                 MODE: tl.constexpr, CH: tl.constexpr):
    """One decode step's GEMVs. MODE 0 barrier, 1 gemv, 2 gemv+l2, 3 preload, 4 runahead.

    Weights of layer l in `flat_ptr` (bf16): qkv [NQKV, H], o [H, QS], gate/up [I2, H],
    down [H, I2 / 2], one after the other, layer after layer; `bytes_ptr` is the same buffer
    as bytes."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    SQ: tl.constexpr = NQKV * H
    SO: tl.constexpr = H * QS
    SG: tl.constexpr = I2 * H
    SD: tl.constexpr = H * (I2 // 2)
    LS: tl.constexpr = SQ + SO + SG + SD
    total = L.to(tl.int64) * LS * 2
    rq, ro, rg, rd = tl.cdiv(NQKV, G), tl.cdiv(H, G), tl.cdiv(I2, G), tl.cdiv(H, G)
    nq = tl.maximum(tl.minimum(rq, NQKV - pid * rq), 0)
    no = tl.maximum(tl.minimum(ro, H - pid * ro), 0)
    ng = tl.maximum(tl.minimum(rg, I2 - pid * rg), 0)
    nd = tl.maximum(tl.minimum(rd, H - pid * rd), 0)
    nb = 0
    if MODE == 3:
        tq = _load_tile(flat_ptr, pid * rq, nq, H, 32, H)
    if MODE == 4:
        _prefetch_bytes(bytes_ptr, 0, W, pid, G, CH)
    for l in range(0, L):
        base = l.to(tl.int64) * LS
        wq = flat_ptr + base
        wo = wq + SQ
        wg = wo + SO
        wd = wg + SG
        # qkv
        if MODE == 4:
            _prefetch_bytes(bytes_ptr, tl.minimum(base * 2 + W, total),
                            tl.minimum(SQ * 2, tl.maximum(total - base * 2 - W, 0)), pid, G, CH)
        if MODE == 3:
            _apply_tile(tq, x_ptr, qkv_ptr, pid * rq, nq, H, 32, H)
            to = _load_tile(wo, pid * ro, no, QS, 8, QS)
        elif MODE >= 1:
            if MODE == 2 and l == 0:
                _prefetch_rows(wq, pid * rq, rq, NQKV, H, 32, 16)
            _gemv(x_ptr, wq, qkv_ptr, pid * rq, nq, H, 32, 256)
            if MODE == 2:
                _prefetch_rows(wo, pid * ro, ro, H, QS, 8, 32)
        nb += 1
        _barrier(counter_ptr, nb * G)
        nb += 1
        _barrier(counter_ptr, nb * G)  # where attention would be
        # o_proj
        if MODE == 4:
            off = (base + SQ) * 2
            _prefetch_bytes(bytes_ptr, tl.minimum(off + W, total),
                            tl.minimum(SO * 2, tl.maximum(total - off - W, 0)), pid, G, CH)
        if MODE == 3:
            _apply_tile(to, qkv_ptr, x_ptr, pid * ro, no, QS, 8, QS)
            tg = _load_tile(wg, pid * rg, ng, H, 64, H)
        elif MODE >= 1:
            _gemv(qkv_ptr, wo, x_ptr, pid * ro, no, QS, 8, 1024)
            if MODE == 2:
                _prefetch_rows(wg, pid * rg, rg, I2, H, 64, 16)
        nb += 1
        _barrier(counter_ptr, nb * G)
        # gate/up
        if MODE == 4:
            off = (base + SQ + SO) * 2
            _prefetch_bytes(bytes_ptr, tl.minimum(off + W, total),
                            tl.minimum(SG * 2, tl.maximum(total - off - W, 0)), pid, G, CH)
        if MODE == 3:
            _apply_tile(tg, x_ptr, act_ptr, pid * rg, ng, H, 64, H)
            td = _load_tile(wd, pid * rd, nd, I2 // 2, 8, 4096)
        elif MODE >= 1:
            _gemv(x_ptr, wg, act_ptr, pid * rg, ng, H, 64, 128)
            if MODE == 2:
                _prefetch_rows(wd, pid * rd, rd, H, I2 // 2, 8, 64)
        nb += 1
        _barrier(counter_ptr, nb * G)
        # down
        if MODE == 4:
            off = (base + SQ + SO + SG) * 2
            _prefetch_bytes(bytes_ptr, tl.minimum(off + W, total),
                            tl.minimum(SD * 2, tl.maximum(total - off - W, 0)), pid, G, CH)
        if MODE == 3:
            _apply_tile(td, act_ptr, x_ptr, pid * rd, nd, I2 // 2, 8, 4096)
            tq = _load_tile(flat_ptr + ((l + 1) % L) * LS, pid * rq, nq, H, 32, H)
        elif MODE >= 1:
            _gemv(act_ptr, wd, x_ptr, pid * rd, nd, I2 // 2, 8, 1024)
            if MODE == 2 and l + 1 < L:
                _prefetch_rows(wq + LS, pid * rq, rq, NQKV, H, 32, 16)
        nb += 1
        _barrier(counter_ptr, nb * G)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--windows-mb", type=int, nargs="+", default=[0, 4, 8, 16, 32])
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/persistent_probe.py needs a CUDA GPU")
    dev = torch.device("cuda")
    h, nqkv, qs, i2 = H.value, NQKV.value, QS.value, I2.value
    per_layer = nqkv * h + h * qs + i2 * h + h * i2 // 2
    flat = torch.randn(a.layers * per_layer, device=dev, dtype=torch.bfloat16) * 0.02
    x = torch.randn(h, device=dev).to(torch.bfloat16)
    qkv = torch.zeros(nqkv, device=dev, dtype=torch.bfloat16)
    act = torch.zeros(i2, device=dev, dtype=torch.bfloat16)
    counter = torch.zeros(1, device=dev, dtype=torch.int32)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    variants = [("barrier", 0, 0), ("gemv", 1, 0), ("gemv+l2", 2, 0), ("preload", 3, 0)]
    variants += [(f"runahead {w} MB", 4, w << 20) for w in a.windows_mb]
    print(f"# {torch.cuda.get_device_name()}, {sms} programs, {a.layers} layers, "
          f"{a.layers * per_layer * 2 / 1e6:.0f} MB of weights, {5 * a.layers} barriers per step")
    print("| variant | warps | us per step (median) | min |")
    print("| --- | --- | --- | --- |")
    for name, mode, window in variants:
        for warps in a.warps:
            def run():
                counter.zero_()
                _step_kernel[(sms,)](x, qkv, act, flat, flat.view(torch.uint8), counter, a.layers, window, MODE=mode,
                                     CH=64, num_warps=warps)
            run()
            torch.cuda.synchronize()
            times = []
            for _ in range(a.reps):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
            times.sort()
            print(f"| {name} | {warps} | {times[len(times) // 2]:.1f} | {times[0]:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
