"""The one-token GEMVs of a decoder stack: stream_gemv (CUDA) against skinny_gemm (Triton).

Builds `--layers` layers of a shape's four one-token GEMMs with random weights
(Qwen3-0.6B: norm+qkv, o+residual, norm+gate_up+SiLU, down+residual), checks
each kernel's output against the torch reference once, then times, per
kernel, a CUDA graph of the whole chain (layers x 4 GEMVs, each reading its
own weights from HBM, as in a decode step without attention), replayed
`--replays` times: microseconds per layer and the weight stream in TB/s.
`--no-pdl` adds the stream kernel with PDL off (its weights then load only
after the previous kernel ends).

    python benchmarks/stream_gemv.py              # ~30 s on an H100
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

SHAPES = {  # hidden, q+k+v width, attention output width, intermediate
    "qwen3-0.6b": (1024, 4096, 2048, 3072),
    "qwen2.5-0.5b": (896, 1152, 896, 4864),
}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen3-0.6b", choices=list(SHAPES))
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--replays", type=int, default=200)
    ap.add_argument("--no-pdl", action="store_true", help="also time stream_gemv without PDL")
    ap.add_argument("--variants", nargs="*", default=[],
                    choices=["warps4", "warps16", "rg2", "rg8", "o_triton"],
                    help="also time the chain with a variant of the CUDA kernel (experiments)")
    ap.add_argument("--skip-types", action="store_true", help="skip the per-GEMV table")
    return ap.parse_args()


def main() -> None:
    a = parse_args()
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from paged_backend.kernels import pdl
    from paged_backend.kernels.skinny_gemm import skinny_gemm, skinny_gemm_ref
    from paged_backend.kernels.stream_gemv import stream_gemv, stream_gemv_supported

    hidden, qkv_n, attn_n, inter = SHAPES[a.shape]
    dt, dev = torch.bfloat16, "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, device=dev)).to(dt)

    layers = [dict(qkv=randn(qkv_n, hidden, scale=hidden ** -0.5),
                   o=randn(hidden, attn_n, scale=attn_n ** -0.5),
                   gate_up=randn(2 * inter, hidden, scale=hidden ** -0.5),
                   down=randn(hidden, inter, scale=inter ** -0.5),
                   ln1=(1 + 0.1 * torch.randn(hidden, generator=gen, device=dev)).to(dt),
                   ln2=(1 + 0.1 * torch.randn(hidden, generator=gen, device=dev)).to(dt))
              for _ in range(a.layers)]
    weight_bytes = sum(t.numel() * t.element_size() for ly in layers
                       for key, t in ly.items() if key in ("qkv", "o", "gate_up", "down"))
    stream = randn(1, hidden)
    attn_out = randn(1, attn_n)

    # One check of each call against the reference.
    ly = layers[0]
    calls = [
        ("qkv+norm", (stream, ly["qkv"]), dict(norm_weight=ly["ln1"], eps=1e-6)),
        ("o+add", (attn_out, ly["o"]), dict(add_to=stream.clone())),
        ("gate_up+norm+silu", (stream, ly["gate_up"]), dict(norm_weight=ly["ln2"], eps=1e-6,
                                                            silu_mul=True)),
        ("down+add", (randn(1, inter), ly["down"]), dict(add_to=stream.clone())),
    ]
    for name, (x, w), kw in calls:
        assert stream_gemv_supported(x, w, kw.get("silu_mul", False), kw.get("norm_weight")), name
        ref_kw = dict(kw)
        if "add_to" in kw:
            ref_kw["add_to"] = kw["add_to"].clone()
            kw = dict(kw, add_to=kw["add_to"].clone())
        ref = skinny_gemm_ref(x, w, **ref_kw).float()
        got = stream_gemv(x, w, **kw).float()
        err = ((got - ref).norm() / ref.norm()).item()
        print(f"check {name:18s} rel err {err:.2e}  max abs {(got - ref).abs().max().item():.3e}")
        assert err < 4e-3, (name, err)

    def chain(gemm):
        s = stream.clone()

        def run():
            for ly in layers:
                qkv = gemm(s, ly["qkv"], None, norm_weight=ly["ln1"], eps=1e-6)
                # o's input stands in for attention's output (it reads qkv's buffer shape-free)
                gemm(attn_out, ly["o"], None, add_to=s)
                act = gemm(s, ly["gate_up"], None, norm_weight=ly["ln2"], eps=1e-6,
                           silu_mul=True)
                gemm(act, ly["down"], None, add_to=s)
                del qkv
        return run

    def time_chain(run) -> float:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(a.replays):
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            graph.replay()
            t1.record()
            t1.synchronize()
            times.append(t0.elapsed_time(t1) * 1e3)
        return statistics.median(times)

    def one_type(gemm, key):
        s = stream.clone()
        x = {"qkv": s, "o": attn_out, "gate_up": s, "down": randn(1, inter)}[key]
        kw = {"qkv": dict(norm_weight=layers[0]["ln1"], eps=1e-6), "o": dict(add_to=s),
              "gate_up": dict(norm_weight=layers[0]["ln2"], eps=1e-6, silu_mul=True),
              "down": dict(add_to=s.clone())}[key]

        def run():
            for ly in layers:
                gemm(x, ly[key], None, **kw)
        return run

    for key in () if a.skip_types else ("qkv", "o", "gate_up", "down"):
        nbytes = sum(ly[key].numel() * 2 for ly in layers)
        for name, gemm in (("skinny", skinny_gemm), ("stream", stream_gemv)):
            us = time_chain(one_type(gemm, key)) / a.layers
            print(f"{key:8s} {name:7s} {us:6.2f} us/call {nbytes / a.layers / us / 1e6:5.2f} TB/s")

    rows = []
    for name, gemm in (("skinny_gemm (Triton)", skinny_gemm), ("stream_gemv (CUDA)", stream_gemv)):
        rows.append((name, time_chain(chain(gemm))))
    from paged_backend.kernels import cuda_rtc
    import paged_backend.kernels.stream_gemv as sg
    source, warps = sg._SOURCE, sg._NUM_WARPS
    for v in a.variants:
        gemm = stream_gemv
        if v.startswith("warps"):
            sg._NUM_WARPS = int(v[5:])
            sg._SOURCE = source.replace("#define NWARPS 8", f"#define NWARPS {sg._NUM_WARPS}")
        elif v.startswith("rg"):
            sg._SOURCE = source.replace("#define RG 4", f"#define RG {v[2:]}")
        elif v == "o_triton":
            def gemm(x, w, b, **kw):
                return (skinny_gemm if w.shape[1] == attn_n else stream_gemv)(x, w, b, **kw)
        cuda_rtc._modules.clear()
        rows.append((f"stream_gemv variant {v}", time_chain(chain(gemm))))
        sg._SOURCE, sg._NUM_WARPS = source, warps
        cuda_rtc._modules.clear()
    if a.no_pdl:
        os.environ[pdl.PDL_ENV] = "0"
        pdl._device_supports_pdl.cache_clear()
        rows.append(("skinny_gemm, PDL off", time_chain(chain(skinny_gemm))))
        rows.append(("stream_gemv, PDL off", time_chain(chain(stream_gemv))))
    print(f"\n{a.shape}: {a.layers} layers x 4 GEMVs, {weight_bytes / 1e6:.0f} MB of weights, "
          f"{torch.cuda.get_device_name()}")
    print("| kernel | us per chain | us per layer | TB/s |\n| --- | --- | --- | --- |")
    for name, us in rows:
        print(f"| {name} | {us:.1f} | {us / a.layers:.2f} | {weight_bytes / us / 1e6:.2f} |")


if __name__ == "__main__":
    main()
