"""The small-M Triton GEMM (`skinny_gemm`, with its RMSNorm prologue and bias / SiLU-and-mul /
in-place residual epilogues) against its torch reference.

Without CUDA the kernel runs under the Triton interpreter (TRITON_INTERPRET=1, set before
the kernel module is imported) on tiny float32/float16 shapes with non-power-of-two N and K,
both inner-product paths and forced multi-trip K loops. The `gpu` tests run the compiled
kernel over the Qwen3-0.6B and Llama-3-8B layer shapes for M = 1..64, and in a CUDA graph.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from paged_backend.kernels.activation import silu_and_mul_ref  # noqa: E402
from paged_backend.kernels.rms_norm import rms_norm_ref  # noqa: E402
from paged_backend.kernels.skinny_gemm import (  # noqa: E402
    MAX_M,
    skinny_gemm,
    skinny_gemm_config,
    skinny_gemm_ref,
)

# The small CPU cases need the interpreter, which is only switched on without CUDA.
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter cases run on CPU")

# (rtol, atol relative to max |ref|). Kernel and reference both accumulate in float32 from
# the same rounded inputs: they differ by float32 summation order plus a one-ulp flip where
# an output (or a prologue value) rounds the other way: <= 2^-10 (fp16) / 2^-7 (bf16) of it.
CPU_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 1e-3)}
GPU_TOL = {torch.float16: (2e-3, 1e-3), torch.bfloat16: (1.6e-2, 8e-3)}
# Relative Frobenius error: keeps the bulk tight where the elementwise bound is loose.
MEAN_TOL = {torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}

# Prologue / epilogue combinations: (norm, silu_mul, bias, add_to).
VARIANTS = {
    "plain": (False, False, False, False),
    "bias": (False, False, True, False),
    "norm": (True, False, False, False),
    "norm_bias": (True, False, True, False),
    "silu": (False, True, False, False),
    "norm_silu": (True, True, False, False),
    "norm_bias_silu": (True, True, True, False),
    "add": (False, False, False, True),
    "norm_bias_add": (True, False, True, True),
}


def close(actual: torch.Tensor, expected: torch.Tensor, tol) -> None:
    rtol, atol_rel = tol
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    scale = expected.float().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol_rel * scale)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.float(), expected.float()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def make_inputs(m: int, n: int, k: int, variant: str, dtype: torch.dtype, device: str = "cpu",
                seed: int = 0, row_pad: int = 0, weight: Optional[torch.Tensor] = None):
    """(x, weight, kwargs) for `skinny_gemm(x, weight, **kwargs)`; x may have a padded row
    stride. The weight has n rows (the output has n / 2 columns with silu_mul). A given
    `weight` is used as is (the big GPU weights are made once per shape)."""
    norm, silu, has_bias, add = VARIANTS[variant]
    gen = torch.Generator().manual_seed(seed)
    base = (1.5 * torch.randn(m, k + row_pad, generator=gen)).to(device=device, dtype=dtype)
    x = base[:, :k]
    if weight is None:
        weight = (torch.randn(n, k, generator=gen) / k ** 0.5).to(device=device, dtype=dtype)
    kwargs: dict = {}
    if has_bias:
        kwargs["bias"] = (0.5 * torch.randn(n, generator=gen)).to(device=device, dtype=dtype)
    if norm:
        kwargs["norm_weight"] = (1.0 + 0.1 * torch.randn(k, generator=gen)).to(device=device,
                                                                                dtype=dtype)
        kwargs["eps"] = 1e-5
    if silu:
        kwargs["silu_mul"] = True
    if add:
        kwargs["add_to"] = torch.randn(m, n, generator=gen).to(device=device, dtype=dtype)
    return x, weight, kwargs


def check(m: int, n: int, k: int, variant: str, dtype: torch.dtype, tol, device: str = "cpu",
          seed: int = 0, row_pad: int = 0, weight: Optional[torch.Tensor] = None,
          **config) -> None:
    x, weight, kwargs = make_inputs(m, n, k, variant, dtype, device, seed, row_pad, weight)
    x_before = x.clone()
    add_to = kwargs.pop("add_to", None)
    expected = skinny_gemm_ref(x, weight, **kwargs,
                               add_to=None if add_to is None else add_to.clone())
    out = skinny_gemm(x, weight, **kwargs, add_to=add_to, **config)
    if add_to is not None:
        assert out is add_to  # updated in place
    close(out, expected, tol)
    assert rel_err(out, expected) < MEAN_TOL[dtype]
    assert torch.equal(x, x_before)


# ---------------------------------------------------------------- CPU (interpreter)


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("m", [1, 3, 16, 33])
@pytest.mark.parametrize("n,k", [(100, 72), (74, 24)])  # ragged N; 37 outputs with silu_mul
def test_skinny_gemm_interpreter(n, k, m, variant, dtype):
    check(m, n, k, variant, dtype, CPU_TOL[dtype], seed=m + n)


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("variant", ["plain", "norm_bias_add", "norm_bias_silu"])
@pytest.mark.parametrize("m,n,k,config", [
    (1, 100, 72, dict(block_n=8, block_k=32, num_stages=2)),  # 3 K trips, ragged K and N
    (3, 64, 128, dict(block_n=16, block_k=32, num_stages=3)),  # even K and N, unmasked loads
    (2, 40, 96, dict(use_dot=True, block_k=32)),  # tensor-core path for M <= 4
    (16, 48, 80, dict(use_dot=False, block_n=4, block_k=32)),  # broadcast path for M = 16
    (33, 50, 200, dict(block_n=16, block_k=64, num_stages=4)),  # BLOCK_M = 64, ragged K
    (64, 32, 64, dict(block_n=32, block_k=16)),  # M = MAX_M, even everything
    # Persistent programs walking several tiles (a ragged last one) of several K steps.
    (1, 102, 72, dict(block_n=4, block_k=32, num_programs=3)),
    (5, 130, 64, dict(block_n=16, block_k=16, num_programs=2, num_stages=3)),
    (3, 58, 40, dict(block_n=4, block_k=32, num_programs=1, num_stages=1)),
    # One K step per tile with a norm: the weight tile is loaded before the norm pass
    # (the SINGLE path), unmasked as in the model (K == BLOCK_K, N % BLOCK_N == 0), with
    # tl.dot and a ragged N, with BLOCK_M = 64 and padding rows, and with extra programs.
    (3, 64, 128, dict()),
    (16, 40, 64, dict(use_dot=True)),
    (33, 64, 64, dict()),
    (1, 100, 72, dict(num_programs=1000)),
])
def test_skinny_gemm_interpreter_configs(m, n, k, config, variant, dtype):
    check(m, n, k, variant, dtype, CPU_TOL[dtype], seed=k, row_pad=8 if m % 2 else 0, **config)


@cpu_only
def test_skinny_gemm_interpreter_empty_and_errors():
    w = torch.randn(8, 16)
    assert skinny_gemm(torch.randn(0, 16), w).shape == (0, 8)
    add_to = torch.randn(2, 8)
    before = add_to.clone()
    b = torch.randn(8)
    # K = 0: y is the bias, like F.linear.
    assert torch.equal(skinny_gemm(torch.randn(2, 0), torch.randn(8, 0), b, add_to=add_to),
                       before + b)
    with pytest.raises(AssertionError):
        skinny_gemm(torch.randn(MAX_M + 1, 16), w)
    with pytest.raises(AssertionError):
        skinny_gemm(torch.randn(2, 32), w)  # K mismatch
    with pytest.raises(AssertionError):
        skinny_gemm(torch.randn(2, 16), torch.randn(7, 16), silu_mul=True)  # odd gate/up rows
    with pytest.raises(AssertionError):
        skinny_gemm(torch.randn(2, 16), w, silu_mul=True, add_to=torch.randn(2, 4))
    with pytest.raises(AssertionError):
        skinny_gemm(torch.randn(2, 16), w, num_programs=-1)
    with pytest.raises(AssertionError):
        skinny_gemm(torch.randn(2, 32), w.half())  # dtype mismatch
    with pytest.raises(AssertionError):
        skinny_gemm(torch.randn(2, 16), w, add_to=torch.randn(8, 2).t())  # not contiguous


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_skinny_gemm_ref_is_the_unfused_sequence(dtype):
    """The reference's prologues/epilogue are the model's unfused ops (up to the one rounding
    the fused residual add saves)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=gen).to(dtype)
    w = (torch.randn(24, 64, generator=gen) / 8).to(dtype)
    nw = (1 + 0.1 * torch.randn(64, generator=gen)).to(dtype)
    b = torch.randn(24, generator=gen).to(dtype)
    res = torch.randn(5, 24, generator=gen).to(dtype)

    def linear(a: torch.Tensor) -> torch.Tensor:
        return F.linear(a.float(), w.float(), b.float()).to(dtype)

    tol = CPU_TOL[dtype]
    close(skinny_gemm_ref(x, w, b, norm_weight=nw), linear(rms_norm_ref(x, nw, 1e-6)), tol)
    close(skinny_gemm_ref(x, w, b, norm_weight=nw, silu_mul=True),
          silu_and_mul_ref(linear(rms_norm_ref(x, nw, 1e-6))), tol)
    out = skinny_gemm_ref(x, w, b, add_to=res.clone())
    close(out, (res.float() + linear(x).float()).to(dtype), (2 * tol[0], 2 * tol[1]))


def test_config_heuristic_limits():
    """Every default config is launchable: tl.dot minimums, power-of-two blocks, M <= BLOCK_M."""
    for m in (1, 2, 3, 4, 5, 8, 16, 17, 32, 33, 64):
        for n, k in ((4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (28672, 4096),
                     (4096, 14336), (37, 24)):
            for flags in ({}, {"norm": True}, {"silu_mul": True}, {"use_dot": True},
                          {"use_dot": m > 16, "silu_mul": True}):
                cfg = skinny_gemm_config(m, n, k, 2, **flags)
                assert cfg.block_m >= m
                assert cfg.use_dot == flags.get("use_dot", m > 4)
                for v in (cfg.block_m, cfg.block_n, cfg.block_k):
                    assert v & (v - 1) == 0
                if cfg.use_dot:
                    assert min(cfg.block_m, cfg.block_n, cfg.block_k) >= 16
                assert 1 <= cfg.num_stages <= 4
    # A K tile that would leave a half-masked last step is halved once to divide K (qwen3's
    # down at M=1: 2 x 2048 -> 3 x 1024); powers of two and ragged K keep their tiles.
    assert skinny_gemm_config(1, 1024, 3072, 2).block_k == 1024
    assert skinny_gemm_config(1, 1024, 2048, 2).block_k == 2048
    assert skinny_gemm_config(1, 37, 100, 2).block_k == 128


# ---------------------------------------------------------------- GPU

# name -> (N, K) of the weight, and the fused variants that layer uses in a decode step.
GPU_SHAPES = {
    "qwen3_qkv": ((4096, 1024), ["norm", "norm_bias"]),
    "qwen3_o": ((1024, 2048), ["add"]),
    "qwen3_gate_up": ((6144, 1024), ["norm", "norm_silu"]),
    "qwen3_down": ((1024, 3072), ["add"]),
    "llama3_qkv": ((6144, 4096), ["norm"]),
    "llama3_o": ((4096, 4096), ["add"]),
    "llama3_gate_up": ((28672, 4096), ["norm_silu"]),
    "llama3_down": ((4096, 14336), ["add"]),
}
GPU_CASES = [(name, variant) for name, (_, fused) in GPU_SHAPES.items()
             for variant in ["plain"] + fused]
GPU_M = [1, 2, 4, 8, 16, 32, 64]


@functools.lru_cache(maxsize=2)
def gpu_weight(n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    return (torch.randn(n, k, generator=gen, device="cuda") / k ** 0.5).to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m", GPU_M)
@pytest.mark.parametrize("name,variant", GPU_CASES)
def test_skinny_gemm_gpu(name, variant, m, dtype):
    (n, k), _ = GPU_SHAPES[name]
    check(m, n, k, variant, dtype, GPU_TOL[dtype], device="cuda", seed=m,
          row_pad=64 if m % 2 else 0, weight=gpu_weight(n, k, dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("config", [dict(use_dot=True), dict(use_dot=False, block_n=16),
                                    dict(block_n=64, block_k=128, num_stages=3, num_warps=8)])
def test_skinny_gemm_gpu_config_overrides(config):
    for variant in ("plain", "norm_bias_add", "norm_bias_silu"):
        check(8, 1000, 1000, variant, torch.bfloat16, GPU_TOL[torch.bfloat16], device="cuda",
              row_pad=16, **config)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["plain", "norm_bias_add", "norm_bias_silu"])
@pytest.mark.parametrize("m,n,config", [
    (1, 2, {}),  # one output column (Triton specializes N == 1 to a constant)
    (3, 1, {}),
    (1, 1030, dict(num_programs=100)),  # persistent, ragged last tile, broadcast path
    (8, 1030, dict(num_programs=7)),  # persistent, tl.dot path
])
def test_skinny_gemm_gpu_edge_shapes(m, n, config, variant):
    if variant.endswith("silu") and n % 2:
        pytest.skip("silu_mul needs an even number of weight rows")
    check(m, n, 512, variant, torch.bfloat16, GPU_TOL[torch.bfloat16], device="cuda", seed=n,
          **config)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 33])
@pytest.mark.parametrize("variant", ["plain", "norm_bias_add", "norm_bias_silu"])
def test_skinny_gemm_gpu_float32(variant, m):
    """float32 runs exact fp32 products on both paths (tl.dot with input_precision="ieee")."""
    check(m, 1000, 1024, variant, torch.float32, CPU_TOL[torch.float32], device="cuda", seed=m)


@pytest.mark.gpu
def test_skinny_gemm_cuda_graph():
    """A decoder layer's norm+gate_up+SiLU-mul and down(+residual) captured once, replayed on
    new inputs."""
    dtype, m, hidden, inter = torch.bfloat16, 8, 1024, 3072
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, device="cuda")).to(dtype)

    w_gate_up = randn(2 * inter, hidden, scale=hidden ** -0.5)
    w_down = randn(hidden, inter, scale=inter ** -0.5)
    nw = (1 + 0.1 * torch.randn(hidden, generator=gen, device="cuda")).to(dtype)
    x, residual = randn(m, hidden), randn(m, hidden)

    def step():
        act = skinny_gemm(x, w_gate_up, norm_weight=nw, eps=1e-6, silu_mul=True)
        skinny_gemm(act, w_down, add_to=residual)
        return act

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        act = step()
    x.copy_(randn(m, hidden))
    residual.copy_(randn(m, hidden))
    residual_in = residual.clone()
    graph.replay()
    torch.cuda.synchronize()
    tol = GPU_TOL[dtype]
    close(act, skinny_gemm_ref(x, w_gate_up, norm_weight=nw, eps=1e-6, silu_mul=True), tol)
    close(residual, skinny_gemm_ref(act, w_down, add_to=residual_in), tol)


# ------------------------------------------------------- the model's small-batch path

def _model_logits(arch: str, path, dtype: torch.dtype, device: str, skinny: bool, monkeypatch,
                  calls: Optional[dict] = None) -> list[torch.Tensor]:
    """Logits of a 7-token prefill and two decode steps, with the skinny path on or off."""
    import paged_backend.kernels.skinny_gemm as sg
    from paged_backend.layers import fused_kernels
    from paged_backend.models.loader import load_hf_config, load_model, resolve_model
    from test_kernels_fused import run_model
    from tiny_models import make_tiny_checkpoint

    make_tiny_checkpoint(arch, str(path))
    src = resolve_model(str(path))
    cfg = load_hf_config(src)
    model = load_model(src, cfg, dtype, device)
    with monkeypatch.context() as mp:
        if not skinny:  # the path is on by default on CUDA
            mp.setenv(fused_kernels.SKINNY_GEMM_ENV, "0")
        else:
            mp.setattr(fused_kernels, "use_skinny_gemm",
                       lambda x: x.shape[0] <= fused_kernels.SKINNY_MAX_TOKENS)
            silu_rows = fused_kernels.SKINNY_SILU_MAX_TOKENS
            mp.setattr(fused_kernels, "use_skinny_silu",
                       lambda x, w: x.dim() == 2 and x.shape[0] <= silu_rows)
            if calls is not None:
                real = sg.skinny_gemm

                def counted(*args, **kwargs):
                    calls["skinny_gemm"] += 1
                    return real(*args, **kwargs)
                mp.setattr(sg, "skinny_gemm", counted)
        return run_model(model, cfg, [5, 17, 99, 3, 250, 41, 7], 2, device, dtype)


@cpu_only
@pytest.mark.parametrize("arch", ["llama3_rope", "qwen3", "qwen2"])
def test_model_skinny_path_interpreter(arch, tmp_path, monkeypatch):
    """The Llama family's small-batch paths give the regular path's logits: one-token forwards
    with norms, SiLU-mul and residual adds fused into four GEMMs per layer, and up to
    SKINNY_SILU_MAX_TOKENS tokens with the gate/up GEMM's SiLU-mul epilogue."""
    expected = _model_logits(arch, tmp_path / "a", torch.float32, "cpu", False, monkeypatch)
    calls = {"skinny_gemm": 0}
    got = _model_logits(arch, tmp_path / "b", torch.float32, "cpu", True, monkeypatch, calls)
    # The 7-token prefill (SKINNY_MAX_TOKENS = 1 < 7 <= SKINNY_SILU_MAX_TOKENS) runs one
    # skinny GEMM per layer (gate/up), each decode forward four: (1 + 2 * 4) x 2 layers.
    from paged_backend.layers import fused_kernels
    assert fused_kernels.SKINNY_MAX_TOKENS == 1 and fused_kernels.SKINNY_SILU_MAX_TOKENS >= 7
    assert calls["skinny_gemm"] == (1 + 2 * 4) * 2
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama3_rope", "qwen3", "qwen2"])
def test_model_skinny_path_gpu(arch, tmp_path, monkeypatch):
    expected = _model_logits(arch, tmp_path / "a", torch.bfloat16, "cuda", False, monkeypatch)
    got = _model_logits(arch, tmp_path / "b", torch.bfloat16, "cuda", True, monkeypatch)
    for g, e in zip(got, expected, strict=True):
        err = (g.float() - e.float()).abs().max() / e.float().abs().max()
        assert err < 5e-2, err


def test_skinny_silu_policy(monkeypatch):
    """The gate/up SiLU path takes 2-D, row-major bf16/fp16 batches of at most
    SKINNY_SILU_MAX_TOKENS rows and weights of x's dtype up to SKINNY_SILU_MAX_WEIGHT_BYTES
    (Llama-3-8B's stays on cuBLAS); anything else keeps cuBLAS."""
    from paged_backend.kernels.skinny_gemm import MAX_M
    from paged_backend.layers import fused_kernels as fk
    monkeypatch.setattr(fk, "use_fused_kernels", lambda x: True)
    bf16 = dict(dtype=torch.bfloat16, device="meta")
    small = torch.empty(2 * 3072, 1024, **bf16)  # qwen3-0.6b
    big = torch.empty(2 * 14336, 4096, **bf16)  # llama3-8b
    rows = fk.SKINNY_SILU_MAX_TOKENS
    assert rows <= MAX_M
    assert fk.use_skinny_silu(torch.empty(rows, 1024, **bf16), small)
    assert fk.use_skinny_silu(torch.empty(2, 1024, **bf16), small)
    assert not fk.use_skinny_silu(torch.empty(rows + 1, 1024, **bf16), small)
    assert not fk.use_skinny_silu(torch.empty(1, 2, 1024, **bf16), small)
    assert not fk.use_skinny_silu(torch.empty(8, 4096, **bf16), big)
    assert not fk.use_skinny_silu(torch.empty(1024, 8, **bf16).t(), small[:, :8])  # column-major
    assert not fk.use_skinny_silu(torch.empty(8, 1024, dtype=torch.float32, device="meta"),
                                  small.float())  # float32
    assert not fk.use_skinny_silu(torch.empty(8, 1024, dtype=torch.float16, device="meta"),
                                  small)  # dtype mismatch
    monkeypatch.setenv(fk.SKINNY_GEMM_ENV, "0")
    assert not fk.use_skinny_silu(torch.empty(8, 1024, **bf16), small)
