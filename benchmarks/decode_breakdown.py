"""What each part of a batched decode step costs inside its CUDA graph (Llama-family shapes).

Builds the engine on a shape of the bench dir with random weights, writes a decode step
straight into the static buffers of each `--buckets` graph (distinct blocks per
sequence, context lengths uniform in [--lo, --hi], so attention reads the whole cache
from memory, unlike a batch of one repeated prompt) and times graph replays. With
`--variants`, each variant runs in a fresh process with parts of the layer taken out of
the captured graph before capture, their outputs replaced by uninitialised tensors (so
the numbers are timings only):

- `attention`: the decode-attention kernel (rotary, KV store and attention);
- `qkv`, `o`, `gate_up`, `down`: that projection (`gate_up` with its SiLU-and-mul);
- `norms`: the RMSNorm kernels (with their residual adds).

Bucket 1 runs the one-token fused layer: there only `attention` can be taken out.

The difference between a variant and the full step is what the removed part costs in
place, launch gaps and overlap included.

    python benchmarks/decode_breakdown.py --bench-dir ../shared/bench \\
        --variants "" attention qkv,o,gate_up,down attention,qkv,o,gate_up,down
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

PARTS = ("attention", "qkv", "o", "gate_up", "down", "norms")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--bench-dir", default="../shared/bench")
    ap.add_argument("--buckets", type=int, nargs="+", default=[64, 32, 16, 8])
    ap.add_argument("--lo", type=int, default=500, help="shortest context")
    ap.add_argument("--hi", type=int, default=1500, help="longest context")
    ap.add_argument("--replays", type=int, default=200)
    ap.add_argument("--variants", nargs="+", default=[""],
                    help="comma-separated parts to remove, one variant each ('' = none)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one variant
    return ap.parse_args(argv)


def remove_parts(parts: set[str]) -> None:
    """Patch the layer classes so that `parts` launch nothing in decode forwards (<= 512 rows)."""
    import torch

    from paged_backend.layers import linear, norm, triton_attention
    from paged_backend.models import llama

    def blank(x, n):
        return torch.empty(x.shape[:-1] + (n,), dtype=x.dtype, device=x.device)

    def small(x):
        return x.is_cuda and x.shape[0] <= 512

    if "norms" in parts:
        real_norm = norm.RMSNorm.forward

        def norm_forward(self, x, residual=None):
            if not small(x):
                return real_norm(self, x, residual)
            return x if residual is None else (x, residual)
        norm.RMSNorm.forward = norm_forward
    if "attention" in parts:
        backend = triton_attention.TritonAttentionBackend
        real_decode = backend.decode_with_new_kv

        def decode(self, q, new_kv, kv_cache, meta, scale, trigger_early=False):
            if not triton_attention._pure_decode(meta):
                return real_decode(self, q, new_kv, kv_cache, meta, scale, trigger_early)
            return torch.empty_like(q)
        backend.decode_with_new_kv = decode
    if "gate_up" in parts:
        real_mlp = llama.LlamaMLP.forward

        def mlp(self, x):
            if not small(x):
                return real_mlp(self, x)
            return self.down_proj(blank(x, self.intermediate_size))
        llama.LlamaMLP.forward = mlp
    real_col, real_row = linear.ColumnParallelLinear.forward, linear.RowParallelLinear.forward

    def col(self, x):  # the fused qkv projection (the LM head and gate/up are not patched here)
        if "qkv" in parts and small(x) and len(self.output_sizes) == 3:
            return blank(x, self.weight.shape[0])
        return real_col(self, x)

    def row(self, x):  # o_proj takes the attention heads, down_proj the intermediate size
        which = "o" if getattr(self, "_breakdown_o", False) else "down"
        if which in parts and small(x):
            return blank(x, self.weight.shape[0])
        return real_row(self, x)
    linear.ColumnParallelLinear.forward = col
    linear.RowParallelLinear.forward = row
    real_init = llama.LlamaAttention.__init__

    def attn_init(self, *a, **k):
        real_init(self, *a, **k)
        self.o_proj._breakdown_o = True
    llama.LlamaAttention.__init__ = attn_init


def run_one(a: argparse.Namespace) -> dict:
    """Time every bucket's graph with the variant's parts removed; returns {bucket: us}."""
    parts = {p for p in a.one.split(",") if p}
    unknown = parts - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    remove_parts(parts)
    sys.path.insert(0, os.path.abspath(a.bench_dir))
    import torch
    from models import hf_config

    from paged_backend import LLM, SamplingParams

    d = tempfile.mkdtemp()
    hf_config(a.shape).save_pretrained(d)
    llm = LLM(d, load_format="dummy", skip_tokenizer_init=True, max_model_len=a.hi + 64,
              max_num_seqs=max(a.buckets))
    llm.generate([{"prompt_token_ids": list(range(1, 100))}] * 4,
                 SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    runner = llm.llm_engine.runner
    graphs, bs = runner.graphs, runner.block_size
    if graphs is None:
        raise SystemExit("no CUDA graphs (enforce_eager?)")
    rng = random.Random(0)
    nb = -(-a.hi // bs)
    if max(a.buckets) * nb + 1 > runner.num_blocks:
        raise SystemExit("the KV cache is too small for these buckets and contexts")
    out = {}
    for b in a.buckets:
        if b not in graphs.buckets:
            raise SystemExit(f"{b} is not a graph bucket ({graphs.buckets})")
        if parts - {"attention"} and b == 1:  # LlamaDecoderLayer._forward_skinny
            raise SystemExit("bucket 1 runs the one-token fused layer, whose projections and "
                             "norms these patches do not reach")
        ctx = [rng.randint(a.lo, a.hi) for _ in range(b)]
        tables = torch.arange(b * nb, dtype=torch.int32).view(b, nb) + 1
        pos = torch.tensor([c - 1 for c in ctx], dtype=torch.int64)
        slots = tables[torch.arange(b), pos // bs].long() * bs + pos % bs
        # The bucket's layout of the flat int64 buffer: ids, positions, slots.
        graphs.i64[:b] = torch.tensor([rng.randint(1, 9000) for _ in range(b)])
        graphs.i64[b:2 * b] = pos
        graphs.i64[2 * b:3 * b] = slots
        graphs.seq_lens[:b] = torch.tensor(ctx, dtype=torch.int32)
        graphs.block_tables.zero_()
        graphs.block_tables[:b, :nb] = tables
        graphs.replay(b)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(a.replays):
            graphs.replay(b)
        end.record()
        end.synchronize()
        kv = sum(ctx) * runner.kv_bytes_per_block(len(runner.kv_caches), runner.num_kv_heads,
                                                  runner.kv_cache.shape[-1], 1, runner.dtype)
        out[b] = (start.elapsed_time(end) * 1e3 / a.replays, kv)
    return out


def main() -> None:
    a = parse_args()
    if a.one is not None:
        print("RESULT " + json.dumps(run_one(a)))
        return
    rows = []
    for v in a.variants:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", v, "--shape", a.shape,
               "--bench-dir", a.bench_dir, "--lo", str(a.lo), "--hi", str(a.hi),
               "--replays", str(a.replays), "--buckets", *map(str, a.buckets)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
        if res.returncode != 0 or not line:
            sys.exit(f"variant {v!r} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
        rows.append((v, json.loads(line[0][len("RESULT "):])))
    import torch
    print(f"# {torch.cuda.get_device_name()}, {a.shape}, bf16 dummy weights, contexts "
          f"U[{a.lo}, {a.hi}], {a.replays} replays; us per decode-graph replay")
    print("| removed | " + " | ".join(f"bucket {b}" for b in a.buckets) + " |")
    print("| --- |" + " --- |" * len(a.buckets))
    base = dict(rows[0][1]) if rows[0][0] == "" else None
    for v, r in rows:
        cells = []
        for b in a.buckets:
            t, kv = r[str(b)]
            cell = f"{t:,.1f}"
            if base is not None and v:
                cell += f" ({t - base[str(b)][0]:+,.1f})"
            elif not v:
                cell += f" ({kv / 1e9:.2f} GB KV)"
            cells.append(cell)
        print(f"| {v or 'nothing'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
