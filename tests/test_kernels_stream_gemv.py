"""The one-token CUDA GEMV (`stream_gemv`) against the skinny GEMM's torch reference.

The kernel is CUDA C++ compiled at run time, so it runs only on a Hopper-or-newer GPU
(`gpu` tests): every prologue / epilogue variant over the Qwen3-0.6B layer shapes and
ragged ones (row counts that do not divide over the SMs, fewer rows than SMs, K-split
row groups, K not a multiple of 256), a chain of them in a CUDA graph with PDL, and the
engine's dispatch. On CPU the dispatch policy is checked: it never takes CPU tensors.
"""

from __future__ import annotations

import contextlib
import functools
import os

import pytest
import torch

# The kernels package imports triton; without CUDA the other kernel tests need its
# interpreter, which must be chosen before the first import (whichever module comes first).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from paged_backend.kernels.skinny_gemm import skinny_gemm_ref  # noqa: E402
from paged_backend.kernels.stream_gemv import (  # noqa: E402
    STREAM_GEMV_ENV,
    exclusive_smem,
    stream_gemv,
    stream_gemv_supported,
)

# (norm, silu_mul, bias, add_to) variants and tolerances: the skinny GEMM's (same numerics).
from test_kernels_skinny_gemm import GPU_TOL as TOL  # noqa: E402
from test_kernels_skinny_gemm import MEAN_TOL, VARIANTS  # noqa: E402


def hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


needs_hopper = pytest.mark.skipif(not hopper(), reason="needs a Hopper-or-newer GPU")


def make_inputs(n: int, k: int, variant: str, dtype: torch.dtype, seed: int = 0):
    norm, silu, has_bias, add = VARIANTS[variant]
    gen = torch.Generator().manual_seed(seed)
    x = (1.5 * torch.randn(1, k, generator=gen)).to("cuda", dtype)
    weight = (torch.randn(n, k, generator=gen) / k ** 0.5).to("cuda", dtype)
    kw: dict = {}
    if has_bias:
        kw["bias"] = (0.5 * torch.randn(n, generator=gen)).to("cuda", dtype)
    if norm:
        kw["norm_weight"] = (1 + 0.1 * torch.randn(k, generator=gen)).to("cuda", dtype)
        kw["eps"] = 1e-5
    if silu:
        kw["silu_mul"] = True
    if add:
        kw["add_to"] = torch.randn(1, n, generator=gen).to("cuda", dtype)
    return x, weight, kw


def check(n: int, k: int, variant: str, dtype: torch.dtype, seed: int = 0) -> None:
    x, weight, kw = make_inputs(n, k, variant, dtype, seed)
    assert stream_gemv_supported(x, weight, kw.get("silu_mul", False), kw.get("norm_weight"))
    check_against_ref(stream_gemv, x, weight, kw, dtype)


def check_against_ref(kernel, x: torch.Tensor, weight: torch.Tensor, kw: dict,
                      dtype: torch.dtype) -> None:
    """`kernel(x, weight, **kw)` against `skinny_gemm_ref`: max and mean errors within the
    skinny GEMM's tolerances, `add_to` updated in place, x untouched."""
    x_before = x.clone()
    ref_kw = dict(kw)
    if "add_to" in kw:
        ref_kw["add_to"] = kw["add_to"].clone()
    expected = skinny_gemm_ref(x, weight, **ref_kw)
    out = kernel(x, weight, **kw)
    if "add_to" in kw:
        assert out is kw["add_to"]
    assert out.shape == expected.shape and out.dtype == expected.dtype
    rtol, atol_rel = TOL[dtype]
    scale = expected.float().abs().max().item()
    torch.testing.assert_close(out.float(), expected.float(), rtol=rtol, atol=atol_rel * scale)
    err = ((out.float() - expected.float()).norm() / expected.float().norm()).item()
    assert err < MEAN_TOL[dtype], err
    assert torch.equal(x, x_before)


@functools.cache
def _slow_writer():
    import triton
    import triton.language as tl

    @triton.jit
    def slow_writer(x_dst, x_src, add_dst, add_src, n_x, n_add, spin, BLOCK: tl.constexpr):
        tl.extra.cuda.gdc_launch_dependents()  # the successor may start right away
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for _ in range(spin):  # a dependent chain: tens of microseconds
            acc = acc * 0.5 + 1.0
        one = acc * 0.5  # exactly 1.0 by now: the copies below store src unchanged
        offs = tl.arange(0, BLOCK)
        v = tl.load(x_src + offs, mask=offs < n_x)
        tl.store(x_dst + offs, (v.to(tl.float32) * one).to(v.dtype), mask=offs < n_x)
        a = tl.load(add_src + offs, mask=offs < n_add)
        tl.store(add_dst + offs, (a.to(tl.float32) * one).to(a.dtype), mask=offs < n_add)
    return slow_writer


def slow_write(x: torch.Tensor, x_src: torch.Tensor, add_to: torch.Tensor,
               add_src: torch.Tensor) -> None:
    """Copy x_src into x and add_src into add_to from one program that first lets its PDL
    successor launch, then spins for tens of microseconds (the PDL-wait tests' predecessor)."""
    import triton
    block = triton.next_power_of_2(max(x.numel(), add_to.numel()))
    _slow_writer()[(1,)](x, x_src, add_to, add_src, x.numel(), add_to.numel(), 20000,
                         BLOCK=block)


@contextlib.contextmanager
def pdl_off(monkeypatch):
    """PDL switched off (PAGED_BACKEND_PDL=0) inside the block, its cached probe reset on
    both sides."""
    from paged_backend.kernels import pdl

    monkeypatch.setenv(pdl.PDL_ENV, "0")
    pdl._device_supports_pdl.cache_clear()
    try:
        yield
    finally:
        monkeypatch.delenv(pdl.PDL_ENV)
        pdl._device_supports_pdl.cache_clear()


QWEN3 = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)}


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", list(QWEN3))
def test_stream_gemv_qwen3_shapes(shape, variant, dtype):
    n, k = QWEN3[shape]
    check(n, k, variant, dtype, seed=n + k)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("variant", ["plain", "norm_bias_add", "norm_bias_silu", "silu"])
@pytest.mark.parametrize("n,k", [
    (2, 8),  # one row per program, K one lane's 8-value vector
    (100, 264),  # fewer rows than SMs; K not a multiple of 256
    (1030, 520),  # ragged rows per program, K-split groups
    (9000, 72),  # more row groups than warps
    (2 * 139, 4104),  # odd output count with silu_mul; large K
])
def test_stream_gemv_ragged_shapes(n, k, variant):
    check(n, k, variant, torch.bfloat16, seed=n)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("early", [False, True], ids=["trigger_after_wait", "trigger_early"])
def test_stream_gemv_layers_in_cuda_graph(early):
    """Two layers' four GEMVs captured once with PDL, replayed on new inputs: each kernel
    reads what the one before it wrote (its weights load before the PDL wait). With
    `trigger_early` and `exclusive` on o, as the model sets them, the gate/up GEMV launches
    as o starts, and the results are the same. (QKV's `trigger_early` is set too, but here
    a torch copy without PDL follows it; tests/test_kernels_stream_decode.py runs it before
    decode attention as the model does.)"""
    dt, hidden, inter, qkv_n = torch.bfloat16, 1024, 3072, 4096
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, device="cuda")).to(dt)

    layers = random_layers(randn, hidden, inter, qkv_n, norms=True)
    stream = torch.zeros(1, hidden, dtype=dt, device="cuda")

    def run(gemm, s):
        opts = {"trigger_early": True, "exclusive": True} if early and gemm is stream_gemv else {}
        qopts = {"trigger_early": True} if early and gemm is stream_gemv else {}
        outs = []
        for ly in layers:
            qkv = gemm(s, ly["qkv"], None, norm_weight=ly["ln1"], eps=1e-6, **qopts)
            gemm(qkv[:, : qkv_n // 2].contiguous(), ly["o"], None, add_to=s, **opts)
            act = gemm(s, ly["gate_up"], None, norm_weight=ly["ln2"], eps=1e-6, silu_mul=True)
            gemm(act, ly["down"], None, add_to=s)
            outs.append(qkv)
        return outs

    for got_all, want_all in replay_against_ref(run, stream_gemv, stream, randn):
        for got, want in zip(got_all, want_all, strict=True):
            torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def random_layers(randn, hidden: int, inter: int, qkv_n: int, norms: bool,
                  n_layers: int = 2) -> list[dict]:
    """Scaled random weights of `n_layers` decoder layers (qkv, o, gate_up, down; with
    `norms` the two RMSNorm weights ln1 and ln2 too) for the graph-chain tests."""
    layers = []
    for _ in range(n_layers):
        ly = dict(qkv=randn(qkv_n, hidden, scale=hidden ** -0.5),
                  o=randn(hidden, qkv_n // 2, scale=(qkv_n // 2) ** -0.5),
                  gate_up=randn(2 * inter, hidden, scale=hidden ** -0.5),
                  down=randn(hidden, inter, scale=inter ** -0.5))
        if norms:
            ly.update(ln1=1 + 0.1 * randn(hidden), ln2=1 + 0.1 * randn(hidden))
        layers.append(ly)
    return layers


def replay_against_ref(run, kernel, stream: torch.Tensor, randn, rounds: int = 3):
    """Capture `run(kernel, stream)` (a list of outputs; it updates the residual `stream` in
    place) in a CUDA graph once, then for each of `rounds` fresh inputs replay it and yield
    (the graph's outputs + [stream], `run(skinny_gemm_ref, ...)`'s on the same input)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(kernel, stream)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run(kernel, stream)
    for _ in range(rounds):
        start = randn(*stream.shape)
        stream.copy_(start)
        graph.replay()
        ref_stream = start.clone()
        ref_outs = run(skinny_gemm_ref, ref_stream)
        torch.cuda.synchronize()
        yield outs + [stream], ref_outs + [ref_stream]


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("early", [False, True], ids=["trigger_after_wait", "trigger_early"])
def test_stream_gemv_waits_for_the_kernel_before_it(early):
    """PDL contract: a kernel that lets its successor launch at once, then spends a while
    before writing x and add_to, must still be seen complete: stream_gemv reads x and
    add_to only after its wait (its weights may load before)."""
    from paged_backend.kernels.pdl import pdl_enabled

    x_true, weight, kw = make_inputs(1024, 2048, "norm_bias_add", torch.bfloat16, seed=9)
    assert pdl_enabled(x_true)
    add_true = kw.pop("add_to")
    expected = skinny_gemm_ref(x_true, weight, **kw, add_to=add_true.clone())
    for _ in range(3):
        x = torch.zeros_like(x_true)
        add_to = torch.zeros_like(add_true)
        slow_write(x, x_true, add_to, add_true)
        stream_gemv(x, weight, **kw, add_to=add_to, trigger_early=early)
        torch.testing.assert_close(add_to.float(), expected.float(), rtol=1.6e-2, atol=2e-2)


@pytest.mark.parametrize("per_sm", [233472, 167936, 102400, 65536])
def test_exclusive_smem_keeps_one_program_per_sm(per_sm):
    """An `exclusive` program's shared memory: two of them (with the 1 KB each block
    reserves) overflow the SM, one beside any program within the support limit fits."""
    from paged_backend.kernels.stream_gemv import STREAM_MAX_SMEM, _BLOCK_RESERVED, smem_limit

    excl = exclusive_smem(per_sm)
    limit = smem_limit(per_sm - _BLOCK_RESERVED, per_sm)  # the support check's bound
    assert 0 < limit <= STREAM_MAX_SMEM
    assert 2 * (excl + _BLOCK_RESERVED) > per_sm
    assert (excl + _BLOCK_RESERVED) + (limit + _BLOCK_RESERVED) <= per_sm
    assert 2 * (limit + _BLOCK_RESERVED) <= per_sm  # two ordinary programs still fit


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("variant", ["add", "norm_bias_add", "norm_bias_silu"])
def test_stream_gemv_exclusive_matches(variant):
    """`exclusive=True` only pads shared memory: the same output, bit for bit, with the
    padded size within what the device gives a block."""
    from paged_backend.kernels.stream_gemv import _smem_per_sm

    x, weight, kw = make_inputs(1024, 2048, variant, torch.bfloat16, seed=3)
    kw2 = dict(kw)
    if "add_to" in kw:
        kw2["add_to"] = kw["add_to"].clone()
    plain = stream_gemv(x, weight, **kw)
    padded = stream_gemv(x, weight, **kw2, exclusive=True)
    assert torch.equal(plain, padded)
    props = torch.cuda.get_device_properties(0)
    assert exclusive_smem(_smem_per_sm(0)) <= props.shared_memory_per_block_optin


@pytest.mark.gpu
@needs_hopper
def test_one_token_gemm_dispatch(monkeypatch):
    """The engine's one-token GEMM runs stream_gemv where supported and the Triton kernel
    otherwise (two rows, a bias of another dtype, the env switch), with the same results."""
    from paged_backend.layers import fused_kernels

    x, weight, kw = make_inputs(1024, 2048, "norm_bias_add", torch.bfloat16)
    expected = skinny_gemm_ref(x, weight, **dict(kw, add_to=kw["add_to"].clone()))
    calls = []
    import paged_backend.kernels.stream_gemv as sg
    real = sg.stream_gemv
    monkeypatch.setattr(sg, "stream_gemv", lambda *a, **k: calls.append(
        (k["exclusive"], k["trigger_early"])) or real(*a, **k))

    def run(**over):
        args = dict(kw, add_to=kw["add_to"].clone(), **over)
        return fused_kernels.one_token_gemm(x, weight, **args)

    torch.testing.assert_close(run().float(), expected.float(), rtol=1.6e-2, atol=1e-2)
    assert calls == [(False, False)]
    # Both keywords reach stream_gemv, and are dropped on the Triton path (two rows).
    torch.testing.assert_close(run(exclusive=True, trigger_early=True).float(),
                               expected.float(), rtol=1.6e-2, atol=1e-2)
    assert calls == [(False, False), (True, True)]
    calls.pop()
    two = fused_kernels.one_token_gemm(x.repeat(2, 1), weight, kw["bias"],
                                       norm_weight=kw["norm_weight"], eps=kw["eps"],
                                       exclusive=True, trigger_early=True)
    assert calls == [(False, False)] and two.shape == (2, 1024)
    # A float32 bias (the Triton kernel reads it in fp32) is not the CUDA kernel's.
    torch.testing.assert_close(run(bias=kw["bias"].float()).float(), expected.float(),
                               rtol=1.6e-2, atol=1e-2)
    assert calls == [(False, False)]
    monkeypatch.setenv(STREAM_GEMV_ENV, "0")
    torch.testing.assert_close(run().float(), expected.float(), rtol=1.6e-2, atol=1e-2)
    assert calls == [(False, False)]


@pytest.mark.gpu
@needs_hopper
def test_stream_gemv_without_pdl_and_within_bounds(monkeypatch):
    """With PDL off the kernel runs without griddepcontrol; stores stay inside `out`
    (guard values around an add_to row are untouched)."""
    with pdl_off(monkeypatch):
        for variant in ("norm_bias_add", "norm_bias_silu", "plain"):
            check(1030, 520, variant, torch.bfloat16, seed=7)
    x, weight, kw = make_inputs(1030, 520, "add", torch.bfloat16, seed=8)
    buf = torch.full((3, 1030), 7.0, dtype=torch.bfloat16, device="cuda")
    buf[1:2] = kw["add_to"]
    expected = skinny_gemm_ref(x, weight, add_to=kw["add_to"].clone())
    stream_gemv(x, weight, add_to=buf[1:2])
    torch.testing.assert_close(buf[1:2].float(), expected.float(), rtol=1.6e-2, atol=2e-2)
    assert bool((buf[0] == 7).all()) and bool((buf[2] == 7).all())


def test_stream_gemv_policy(monkeypatch):
    """Which calls the CUDA kernel takes: never CPU tensors, two rows, float32, K not a
    multiple of 8, a misaligned x or norm weight, mismatched dtypes, a bias of another dtype,
    an add_to that is not contiguous or overlaps x, or with silu_mul; the env switch."""
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    assert not stream_gemv_supported(x, w)  # CPU
    if not hopper():
        return
    x, w = x.cuda(), w.cuda()
    assert stream_gemv_supported(x, w)
    assert stream_gemv_supported(x, w, silu_mul=True)
    assert not stream_gemv_supported(x.repeat(2, 1), w)
    assert not stream_gemv_supported(x.float(), w.float())
    assert not stream_gemv_supported(x.half(), w)
    assert not stream_gemv_supported(torch.randn(1, 60, device="cuda", dtype=torch.bfloat16),
                                     w[:, :60].contiguous())
    base = torch.randn(1, 72, device="cuda", dtype=torch.bfloat16)
    assert not stream_gemv_supported(base[:, 1:65], w)  # x not 16-byte aligned
    nw = torch.ones(72, device="cuda", dtype=torch.bfloat16)
    assert stream_gemv_supported(x, w, norm_weight=nw[:64])
    assert not stream_gemv_supported(x, w, norm_weight=nw[1:65])  # misaligned
    assert not stream_gemv_supported(x, w, norm_weight=nw[:64].float())
    assert not stream_gemv_supported(x, w[:31], silu_mul=True)  # odd gate/up rows
    assert not stream_gemv_supported(x, torch.randn(300000, 64, device="cuda",
                                                    dtype=torch.bfloat16))  # span too big
    bias = torch.zeros(32, device="cuda", dtype=torch.bfloat16)
    assert stream_gemv_supported(x, w, bias=bias)
    assert not stream_gemv_supported(x, w, bias=bias.float())
    add = torch.zeros(1, 32, device="cuda", dtype=torch.bfloat16)
    assert stream_gemv_supported(x, w, add_to=add)
    assert not stream_gemv_supported(x, w, add_to=torch.zeros(32, 2, device="cuda",
                                                              dtype=torch.bfloat16).T[:1])
    assert not stream_gemv_supported(x, w, silu_mul=True, add_to=add[:, :16])
    both = torch.zeros(1, 96, device="cuda", dtype=torch.bfloat16)
    assert not stream_gemv_supported(both[:, :64], w, add_to=both[:, 56:88])  # overlap
    with pytest.raises(ValueError):
        stream_gemv(x.repeat(2, 1), w)
    monkeypatch.setenv(STREAM_GEMV_ENV, "0")
    assert not stream_gemv_supported(x, w)
