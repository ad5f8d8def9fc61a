"""Micro-benchmark of the small-M Triton GEMM (kernels/skinny_gemm.py) against cuBLAS.

For each decode-layer GEMM of Qwen3-0.6B and Llama-3-8B and each M it times, per call:
  linear   F.linear alone (cuBLAS)
  skinny   skinny_gemm alone (same math)
  unfused  the sequence the fused kernel replaces, with the repo's Triton kernels:
           rms_norm + F.linear (qkv, LM head), rms_norm + F.linear + silu_and_mul
           (gate_up), F.linear + add_ (o_proj, down)
  fused    skinny_gemm with that prologue / epilogue
Each is a CUDA graph of `--calls` back-to-back calls, replayed `reps` times (median per
replay). Call i reads weight copy i % copies, with enough copies (up to `--calls`) to span
~3x the 50 MB L2, so every call streams its weight from HBM as in a real layer stack.
GB/s = weight bytes / time. `--sweep` times a grid of launch configs for the plain or
fused kernel instead (slow: a compile per config, about a minute per entry; narrow it
with --shapes / --m).

    python benchmarks/skinny_gemm.py                      # ~1-2 min on an H100
    python benchmarks/skinny_gemm.py --shapes llama3_down --m 1 8 --sweep fused
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time

# name -> (N, K, fused variant)
SHAPES = {
    "qwen3_qkv": (4096, 1024, "norm"),
    "qwen3_o": (1024, 2048, "add"),
    "qwen3_gate_up": (6144, 1024, "norm_silu"),
    "qwen3_down": (1024, 3072, "add"),
    "llama3_qkv": (6144, 4096, "norm"),
    "llama3_o": (4096, 4096, "add"),
    "llama3_gate_up": (28672, 4096, "norm_silu"),
    "llama3_down": (4096, 14336, "add"),
    # The LM head of a one-token step, with the final RMSNorm in front.
    "qwen3_lm_head": (151936, 1024, "norm"),
    "llama3_lm_head": (128256, 4096, "norm"),
}
M_VALUES = [1, 2, 4, 8, 16, 32, 64]
L2_SPAN_BYTES = 150 * 2 ** 20
EPS = 1e-6


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--m", nargs="+", type=int, default=M_VALUES, help="token counts (<= 64)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--calls", type=int, default=20, help="back-to-back calls per graph")
    ap.add_argument("--target-ms", type=float, default=10.0,
                    help="GPU time spent timing each entry (sets the replay count)")
    ap.add_argument("--sweep", choices=["plain", "fused"], default=None,
                    help="time a grid of launch configs of this kernel instead of the table")
    ap.add_argument("--top", type=int, default=5, help="configs listed per entry with --sweep")
    return ap.parse_args()


def time_graph(fn, calls: int, target_ms: float) -> float:
    """Median microseconds per call of `fn(i)`, i = 0..calls-1, captured in one CUDA graph."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        for i in range(calls):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    reps = max(5, min(200, int(target_ms / 1e3 / max(time.perf_counter() - t0, 1e-6))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    per_replay = statistics.median(s.elapsed_time(e) for s, e in events)
    del graph
    return per_replay * 1e3 / calls


class Case:
    """Inputs of one (shape, M) entry and the four ways of running it."""

    def __init__(self, name: str, m: int, dtype, calls: int):
        import torch

        self.name, self.m = name, m
        self.n, self.k, self.variant = SHAPES[name]
        gen = torch.Generator(device="cuda").manual_seed(m)
        n, k = self.n, self.k
        self.weight_bytes = n * k * torch.finfo(dtype).bits // 8
        copies = max(1, min(calls, math.ceil(L2_SPAN_BYTES / self.weight_bytes)))
        w = (torch.randn(n, k, generator=gen, device="cuda") / k ** 0.5).to(dtype)
        self.weights = [w] + [w.clone() for _ in range(copies - 1)]
        self.x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
        self.x_in = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
        self.norm_weight = (1 + 0.1 * torch.randn(k, generator=gen, device="cuda")).to(dtype)
        self.residual = torch.randn(m, n, generator=gen, device="cuda").to(dtype)

    def weight(self, i: int):
        return self.weights[i % len(self.weights)]

    def fused_kwargs(self) -> dict:
        if self.variant == "norm":
            return {"norm_weight": self.norm_weight, "eps": EPS}
        if self.variant == "norm_silu":
            return {"norm_weight": self.norm_weight, "eps": EPS, "silu_mul": True}
        return {"add_to": self.residual}

    def linear(self, i: int) -> None:
        import torch.nn.functional as F

        F.linear(self.x, self.weight(i))

    def skinny(self, i: int, **config) -> None:
        from paged_backend.kernels.skinny_gemm import skinny_gemm

        skinny_gemm(self.x, self.weight(i), **config)

    def unfused(self, i: int) -> None:
        import torch.nn.functional as F

        from paged_backend.kernels.activation import silu_and_mul
        from paged_backend.kernels.rms_norm import rms_norm

        if self.variant == "norm":
            F.linear(rms_norm(self.x_in, self.norm_weight, EPS), self.weight(i))
        elif self.variant == "norm_silu":
            silu_and_mul(F.linear(rms_norm(self.x_in, self.norm_weight, EPS), self.weight(i)))
        else:
            self.residual.add_(F.linear(self.x_in, self.weight(i)))

    def fused(self, i: int, **config) -> None:
        from paged_backend.kernels.skinny_gemm import skinny_gemm

        skinny_gemm(self.x_in, self.weight(i), **self.fused_kwargs(), **config)

    def fused_rel_err(self) -> float:
        """Relative Frobenius error of the fused kernel vs the float32 reference."""
        from paged_backend.kernels.skinny_gemm import skinny_gemm, skinny_gemm_ref

        kwargs = self.fused_kwargs()
        add_to = kwargs.pop("add_to", None)
        ref = skinny_gemm_ref(self.x_in, self.weights[0], **kwargs,
                              add_to=None if add_to is None else add_to.clone())
        out = skinny_gemm(self.x_in, self.weights[0], **kwargs,
                          add_to=None if add_to is None else add_to.clone())
        return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def config_str(case: Case, fused: bool, dtype) -> str:
    import torch

    from paged_backend.kernels.skinny_gemm import skinny_gemm_config

    silu = fused and case.variant.endswith("silu")
    cfg = skinny_gemm_config(case.m, case.n // 2 if silu else case.n, case.k,
                             torch.finfo(dtype).bits // 8,
                             norm=fused and case.variant.startswith("norm"),
                             silu_mul=silu,
                             num_sms=torch.cuda.get_device_properties(0).multi_processor_count)
    path = "dot" if cfg.use_dot else "bcast"
    return (f"{path} {cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} "
            f"s{cfg.num_stages}")


def run_table(args, dtype) -> None:
    header = (f"{'shape':15} {'M':>3} {'MB':>6} | {'linear':>7} {'GB/s':>5} | {'skinny':>7} "
              f"{'GB/s':>5} | {'fusion':8} {'unfused':>7} {'fused':>7} {'GB/s':>5} "
              f"{'speedup':>7} {'relerr':>7} | skinny config / fused config")
    print(header)
    print("-" * len(header))
    for name in args.shapes:
        for m in args.m:
            case = Case(name, m, dtype, args.calls)
            gb = case.weight_bytes / 1e3  # bytes per us -> GB/s
            t_lin = time_graph(case.linear, args.calls, args.target_ms)
            t_sk = time_graph(case.skinny, args.calls, args.target_ms)
            t_unf = time_graph(case.unfused, args.calls, args.target_ms)
            t_fus = time_graph(case.fused, args.calls, args.target_ms)
            err = case.fused_rel_err()
            print(f"{name:15} {m:3d} {case.weight_bytes / 2 ** 20:6.1f} | {t_lin:7.2f} "
                  f"{gb / t_lin:5.0f} | {t_sk:7.2f} {gb / t_sk:5.0f} | {case.variant:8} "
                  f"{t_unf:7.2f} {t_fus:7.2f} {gb / t_fus:5.0f} {t_unf / t_fus:6.2f}x "
                  f"{err:7.1e} | {config_str(case, False, dtype)} / "
                  f"{config_str(case, True, dtype)}", flush=True)
            del case


def sweep_configs(m: int):
    """Candidate overrides: both paths up to M = 16, a grid of tiles, pipeline depths, warps."""
    for use_dot in ([False, True] if m <= 16 else [True]):
        block_m = max(16, 1 << (m - 1).bit_length()) if use_dot else 1 << (m - 1).bit_length()
        block_ns = [16, 32, 64] if use_dot else [4, 8, 16, 32]
        for block_n, block_k, stages, warps in itertools.product(
                block_ns, [128, 256, 512, 1024], [2, 4], [4, 8]):
            values = block_m * block_k if use_dot else block_m * block_n * block_k
            if values > 64 * 32 * warps or block_n * block_k * 2 > 65536:
                continue  # would spill, or stages beyond shared memory
            yield dict(use_dot=use_dot, block_n=block_n, block_k=block_k, num_stages=stages,
                       num_warps=warps)


def run_sweep(args, dtype) -> None:
    for name in args.shapes:
        for m in args.m:
            case = Case(name, m, dtype, args.calls)
            fn = case.fused if args.sweep == "fused" else case.skinny
            gb = case.weight_bytes / 1e3
            default = time_graph(fn, args.calls, args.target_ms)
            results = []
            for cfg in sweep_configs(m):
                try:
                    t = time_graph(lambda i, c=cfg: fn(i, **c), args.calls, args.target_ms / 4)
                except Exception as exc:  # e.g. out of shared memory for this tile
                    print(f"  skip {cfg}: {type(exc).__name__}", file=sys.stderr)
                    continue
                results.append((t, cfg))
            results.sort(key=lambda r: r[0])
            print(f"{name} M={m} {args.sweep}: default {default:.2f} us ({gb / default:.0f} GB/s,"
                  f" {config_str(case, args.sweep == 'fused', dtype)})", flush=True)
            for t, cfg in results[:args.top]:
                print(f"    {t:7.2f} us {gb / t:5.0f} GB/s  {cfg}", flush=True)
            del case


def main() -> None:
    args = parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("benchmarks/skinny_gemm.py needs a CUDA GPU")
    assert all(1 <= m <= 64 for m in args.m), "M must be in 1..64"
    dtype = getattr(torch, args.dtype)
    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name}, {props.multi_processor_count} SMs, {args.dtype}, "
          f"{args.calls} calls per graph, times in us per call", flush=True)
    start = time.perf_counter()
    with torch.no_grad():
        (run_sweep if args.sweep else run_table)(args, dtype)
    print(f"# total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
