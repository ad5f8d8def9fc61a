"""Micro-benchmark of the paged decode-attention kernel (kernels/decode_attention.py).

Builds `--layers` KV caches (each far larger than the 50 MB L2) holding `--batch`
sequences whose context lengths are uniform in [`--min-len`, `--max-len`] (seeded),
in shuffled blocks, and times one decode-attention call per layer in a CUDA graph
(median over replays, `benchmarks/skinny_gemm.py`'s timer). GB/s counts the K and V bytes the call must read. With
`--sweep` it times a grid of split counts, KV tile sizes, warps and pipeline depths
(one compile per config) and lists the fastest; otherwise the engine's defaults.
With `--new-kv` every call also rotates and stores the step's token (`DecodeNewKV`, as the
engine's decode steps run), and the CUDA `batch_decode` (kernels/batch_decode.py) is timed
next to the Triton kernel over its splits, warps and ring depths, its output checked
against the Triton kernel's.

    python benchmarks/decode_attention.py --batch 64 --min-len 200 --max-len 2000 --sweep
"""

from __future__ import annotations

import argparse
import itertools
import sys


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[64])
    ap.add_argument("--min-len", type=int, default=200)
    ap.add_argument("--max-len", type=int, default=2000)
    ap.add_argument("--num-kv-heads", type=int, default=8)
    ap.add_argument("--group", type=int, default=2, help="query heads per KV head")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=4096,
                    help="the default split count is chosen for this bound, as in a CUDA graph")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--target-ms", type=float, default=20.0,
                    help="GPU time spent timing each entry (sets the replay count)")
    ap.add_argument("--layout", choices=["nhd", "hnd"], default="nhd",
                    help="cache memory order within a block: slot-major (the engine's "
                         "[block, slot, head, D]) or head-major ([block, head, slot, D], as a "
                         "permuted view of the same logical shape)")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--new-kv", action="store_true",
                    help="fused rotary + KV store of the new token; also time batch_decode")
    ap.add_argument("--top", type=int, default=8)
    return ap.parse_args()


def main() -> None:
    a = parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("benchmarks/decode_attention.py needs a CUDA GPU")
    from paged_backend.kernels.decode_attention import choose_num_splits, decode_attention
    from skinny_gemm import time_graph  # benchmarks/skinny_gemm.py: fn(i) over i in one graph

    dev, dt = "cuda", torch.bfloat16
    hkv, d, bs = a.num_kv_heads, a.head_dim, a.block_size
    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name}, bf16, Hkv {hkv}, group {a.group}, D {d}, block {bs} ({a.layout}), "
          f"lengths U[{a.min_len}, {a.max_len}], {a.layers} layers per graph")
    for batch in a.batch:
        gen = torch.Generator().manual_seed(batch)
        lens = torch.randint(a.min_len, a.max_len + 1, (batch,), generator=gen)
        nblk = [-(-int(n) // bs) for n in lens]
        total = sum(nblk)
        max_blocks = max(nblk)
        caches, tables = [], []
        for _ in range(a.layers):
            if a.layout == "nhd":
                caches.append(torch.randn(2, total + 1, bs, hkv, d, device=dev, dtype=dt))
            else:
                caches.append(torch.randn(2, total + 1, hkv, bs, d, device=dev,
                                          dtype=dt).permute(0, 1, 3, 2, 4))
            perm = torch.randperm(total, generator=gen) + 1
            bt = torch.zeros(batch, max_blocks, dtype=torch.int32)
            used = 0
            for b, n in enumerate(nblk):
                bt[b, :n] = perm[used:used + n].int()
                used += n
            tables.append(bt.to(dev))
        seq_lens = lens.int().to(dev)
        q = torch.randn(batch, hkv * a.group, d, device=dev, dtype=dt)
        out = torch.empty_like(q)
        kv_bytes = int(lens.sum()) * hkv * d * 2 * 2
        default_splits = choose_num_splits(batch, hkv, a.max_model_len)

        new_kv = [None] * a.layers
        if a.new_kv:
            from paged_backend.kernels.decode_attention import DecodeNewKV
            kn = torch.randn(batch, hkv, d, device=dev, dtype=dt)
            vn = torch.randn(batch, hkv, d, device=dev, dtype=dt)
            pos = (lens - 1).to(dev)
            w = torch.rand(d, device=dev).to(dt) + 0.5
            inv_freq = 1.0 / (1e6 ** (torch.arange(0, d, 2, device=dev).float() / d))
            for i in range(a.layers):
                last = [int(tables[i][b, (int(n) - 1) // bs]) * bs + (int(n) - 1) % bs
                        for b, n in enumerate(lens)]
                new_kv[i] = DecodeNewKV(kn, vn, pos, torch.tensor(last, device=dev), inv_freq,
                                        w, w, 1e-6)

        def call(i, **kw):
            decode_attention(q, caches[i], tables[i], seq_lens, d ** -0.5, out=out,
                             new_kv=new_kv[i], **kw)

        t = time_graph(lambda i: call(i, num_splits=default_splits), a.layers, a.target_ms)
        print(f"batch {batch}: {kv_bytes / 1e6:.1f} MB of KV; default (splits {default_splits}) "
              f"{t:.2f} us, {kv_bytes / t / 1e3:.0f} GB/s", flush=True)
        if a.new_kv:
            from paged_backend.kernels.batch_decode import batch_decode, choose_splits
            ref = out.clone()
            rows = []
            for splits, warps, stages in itertools.product([1, 2, 4, 8], [4, 8], [2, 3, 4]):
                kw = dict(splits=splits, nwarps=warps, stages=stages)
                bout = torch.empty_like(q)

                def bcall(i, kw=kw, bout=bout):
                    batch_decode(q, caches[i], tables[i], seq_lens, d ** -0.5, new_kv[i],
                                 out=bout, **kw)
                try:
                    call(a.layers - 1, num_splits=default_splits)
                    ref = out.clone()
                    bcall(a.layers - 1)
                    err = (bout.float() - ref.float()).abs().max().item()
                    t = time_graph(bcall, a.layers, a.target_ms / 3)
                except Exception as exc:  # e.g. out of shared memory
                    print(f"  skip {kw}: {type(exc).__name__}: {exc}", file=sys.stderr)
                    continue
                rows.append((t, kw, err))
            rows.sort(key=lambda r: r[0])
            print(f"  batch_decode (default splits {choose_splits(batch, hkv)}):")
            for t, kw, err in rows[:a.top]:
                print(f"    {t:8.2f} us {kv_bytes / t / 1e3:6.0f} GB/s  {kw}  max|diff| {err:.2e}",
                      flush=True)
        if not a.sweep:
            continue
        results = []
        for splits, block_n, warps, stages in itertools.product(
                [1, 2, 3, 4, 6, 8], [32, 64, 128], [4, 8], [2, 3, 4]):
            kw = dict(num_splits=splits, block_n=block_n, num_warps=warps, num_stages=stages)
            try:
                t = time_graph(lambda i, kw=kw: call(i, **kw), a.layers, a.target_ms / 3)
            except Exception as exc:  # e.g. out of shared memory
                print(f"  skip {kw}: {type(exc).__name__}", file=sys.stderr)
                continue
            results.append((t, kw))
        results.sort(key=lambda r: r[0])
        for t, kw in results[:a.top]:
            print(f"    {t:8.2f} us {kv_bytes / t / 1e3:6.0f} GB/s  {kw}", flush=True)


if __name__ == "__main__":
    main()
