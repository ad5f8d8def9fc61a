"""The small-batch CUDA GEMM (`stream_gemm`) against the skinny GEMM's torch reference.

The kernel is CUDA C++ compiled at run time, so it runs only on a Hopper-or-newer GPU
(`gpu` tests): every epilogue over the Qwen3-0.6B layer shapes at 1-64 rows (each of the
three token-tile layouts, rows that do not fill a tile), ragged shapes (column counts that
are not a multiple of 8 or leave SMs idle, K blocks fewer than a program's warps), x with a
row stride, a chain of them in a CUDA graph with PDL, and the PDL wait. On CPU the support
policy is checked: it never takes CPU tensors.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from paged_backend.kernels.skinny_gemm import skinny_gemm_ref  # noqa: E402
from paged_backend.kernels.stream_gemm import stream_gemm, stream_gemm_supported  # noqa: E402
from paged_backend.kernels.stream_gemv import STREAM_GEMV_ENV  # noqa: E402

from test_kernels_skinny_gemm import GPU_TOL as TOL  # noqa: E402
from test_kernels_skinny_gemm import MEAN_TOL  # noqa: E402
from test_kernels_stream_gemv import (check_against_ref, random_layers,  # noqa: E402
                                      pdl_off, replay_against_ref, slow_write)


def hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


needs_hopper = pytest.mark.skipif(not hopper(), reason="needs a Hopper-or-newer GPU")

# (silu_mul, bias, add_to)
VARIANTS = {
    "plain": (False, False, False),
    "bias": (False, True, False),
    "silu": (True, False, False),
    "bias_silu": (True, True, False),
    "add": (False, False, True),
    "bias_add": (False, True, True),
}


def make_inputs(m: int, n: int, k: int, variant: str, dtype: torch.dtype, seed: int = 0,
                row_pad: int = 0):
    silu, has_bias, add = VARIANTS[variant]
    gen = torch.Generator().manual_seed(seed)
    x = (1.5 * torch.randn(m, k + row_pad, generator=gen)).to("cuda", dtype)[:, :k]
    weight = (torch.randn(n, k, generator=gen) / k ** 0.5).to("cuda", dtype)
    kw: dict = {}
    if has_bias:
        kw["bias"] = (0.5 * torch.randn(n, generator=gen)).to("cuda", dtype)
    if silu:
        kw["silu_mul"] = True
    if add:
        kw["add_to"] = torch.randn(m, n, generator=gen).to("cuda", dtype)
    return x, weight, kw


def check(m: int, n: int, k: int, variant: str, dtype: torch.dtype = torch.bfloat16,
          seed: int = 0, row_pad: int = 0) -> None:
    x, weight, kw = make_inputs(m, n, k, variant, dtype, seed, row_pad)
    assert stream_gemm_supported(x, weight, kw.get("silu_mul", False), kw.get("bias"),
                                 kw.get("add_to"))
    check_against_ref(stream_gemm, x, weight, kw, dtype)


QWEN3 = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)}


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("m", [1, 2, 8, 13, 16, 17, 32, 33, 64])
@pytest.mark.parametrize("shape", list(QWEN3))
def test_stream_gemm_qwen3_shapes(shape, m, variant, dtype):
    n, k = QWEN3[shape]
    check(m, n, k, variant, dtype, seed=n + k + m, row_pad=64 if m % 2 else 0)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 3, 8, 16, 17, 33, 64])
@pytest.mark.parametrize("n,k", [*QWEN3.values(), (2, 64), (1030, 512), (9000, 128)])
def test_stream_gemm_sixteen_warps(monkeypatch, n, k, m, dtype):
    """16-warp programs at 1-64 rows (`WIDE_WARPS_MAX_M`, `WIDE_ROW_WARPS_MAX_M` forced to
    64): qwen3 and ragged shapes, with and without bias and add_to (SiLU-and-mul keeps 8
    warps). Where 16 warps' partial sums outgrow shared memory the call is refused (e.g.
    (9000, 128) from 17 rows) and skipped here; the qwen3 shapes are always taken."""
    from paged_backend.kernels import stream_gemm as sg_module

    monkeypatch.setattr(sg_module, "WIDE_WARPS_MAX_M", 64)
    monkeypatch.setattr(sg_module, "WIDE_ROW_WARPS_MAX_M", 64)
    assert sg_module.warps(m, n, k, False) == 16 and sg_module.warps(m, n // 2, k, True) == 8
    for variant in ("plain", "bias_add", "bias_silu"):
        x, weight, kw = make_inputs(m, n, k, variant, dtype, seed=n + k + m,
                                    row_pad=64 if m % 2 else 0)
        if stream_gemm_supported(x, weight, kw.get("silu_mul", False), kw.get("bias"),
                                 kw.get("add_to")):
            check_against_ref(stream_gemm, x, weight, kw, dtype)
        else:
            assert (n, k) not in QWEN3.values(), (n, k, m, variant)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("variant", ["plain", "bias_silu", "bias_add"])
@pytest.mark.parametrize("m", [3, 24, 50])
@pytest.mark.parametrize("n,k", [
    (2, 64),  # one program, one K block a warp at most (most warps have none)
    (100, 192),  # fewer column groups than SMs; N not a multiple of 8; 6 K blocks
    (1030, 512),  # ragged columns per program
    (2 * 139, 1088),  # odd output count with silu_mul; K blocks not a multiple of 8
    (9000, 128),  # many groups a program
])
def test_stream_gemm_ragged_shapes(n, k, m, variant):
    check(m, n, k, variant, seed=n + m)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("early", [False, True], ids=["trigger_after_wait", "trigger_early"])
def test_stream_gemm_chain_in_cuda_graph(early):
    """Two layers' QKV and gate/up GEMMs (with cuBLAS o / down between, as in the model)
    captured once with PDL and replayed on new inputs: each kernel reads what the one
    before it wrote (its weights load before the PDL wait)."""
    dt, hidden, inter, qkv_n, m = torch.bfloat16, 1024, 3072, 4096, 48
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, device="cuda")).to(dt)

    layers = random_layers(randn, hidden, inter, qkv_n, norms=False)
    stream = torch.zeros(m, hidden, dtype=dt, device="cuda")

    def run(gemm, s):
        opts = {"trigger_early": True} if early and gemm is stream_gemm else {}
        outs = []
        for ly in layers:
            qkv = gemm(s, ly["qkv"], None, **opts)
            s.add_(torch.nn.functional.linear(qkv[:, : qkv_n // 2], ly["o"]))
            act = gemm(s, ly["gate_up"], None, silu_mul=True, **opts)
            s.add_(torch.nn.functional.linear(act, ly["down"]))
            outs.append(qkv)
        return outs

    for got_all, want_all in replay_against_ref(run, stream_gemm, stream, randn):
        # Two layers of bf16 roundings that differ by an ulp here and there (the kernels
        # sum in another order) drift apart by a few ulps; a stale x would be off by O(1).
        for got, want in zip(got_all, want_all, strict=True):
            torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=0.25)
            err = ((got.float() - want.float()).norm() / want.float().norm()).item()
            assert err < 5e-3, err


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("early", [False, True], ids=["trigger_after_wait", "trigger_early"])
def test_stream_gemm_waits_for_the_kernel_before_it(early):
    """PDL contract: a kernel that lets its successor launch at once, then spends a while
    before writing x and add_to, must still be seen complete: stream_gemm reads x and
    add_to only after its wait (its weights may load before)."""
    from paged_backend.kernels.pdl import pdl_enabled

    x_true, weight, kw = make_inputs(4, 1024, 2048, "bias_add", torch.bfloat16, seed=9)
    assert pdl_enabled(x_true)
    add_true = kw.pop("add_to")
    expected = skinny_gemm_ref(x_true, weight, **kw, add_to=add_true.clone())
    for _ in range(3):
        x = torch.zeros_like(x_true)
        add_to = torch.zeros_like(add_true)
        slow_write(x, x_true, add_to, add_true)
        stream_gemm(x, weight, **kw, add_to=add_to, trigger_early=early)
        torch.testing.assert_close(add_to.float(), expected.float(), rtol=1.6e-2, atol=2e-2)


@pytest.mark.gpu
@needs_hopper
def test_stream_gemm_without_pdl_and_within_bounds(monkeypatch):
    """With PDL off the kernel runs without griddepcontrol; stores stay inside `out`
    (guard rows around an add_to block are untouched)."""
    with pdl_off(monkeypatch):
        for variant in ("bias_add", "bias_silu", "plain"):
            check(40, 1030, 512, variant, seed=7)
    x, weight, kw = make_inputs(5, 1030, 512, "add", torch.bfloat16, seed=8)
    buf = torch.full((7, 1030), 7.0, dtype=torch.bfloat16, device="cuda")
    buf[1:6] = kw["add_to"]
    expected = skinny_gemm_ref(x, weight, add_to=kw["add_to"].clone())
    stream_gemm(x, weight, add_to=buf[1:6])
    torch.testing.assert_close(buf[1:6].float(), expected.float(), rtol=1.6e-2, atol=2e-2)
    assert bool((buf[0] == 7).all()) and bool((buf[6] == 7).all())


def test_stream_gemm_policy(monkeypatch):
    """Which calls the CUDA kernel takes: never CPU tensors, more than 64 rows, float32, K
    not a multiple of 64, a misaligned x or x row stride, mismatched dtypes, a bias of
    another dtype, an add_to that overlaps x or comes with silu_mul; the env switch."""
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    assert not stream_gemm_supported(x, w)  # CPU
    if not hopper():
        return
    x, w = x.cuda(), w.cuda()
    assert stream_gemm_supported(x, w)
    assert stream_gemm_supported(x, w, silu_mul=True)
    assert stream_gemm_supported(x.repeat(16, 1), w)
    assert not stream_gemm_supported(x.repeat(17, 1), w)  # 68 rows
    assert not stream_gemm_supported(x.float(), w.float())
    assert not stream_gemm_supported(x.half(), w)
    w96 = torch.randn(32, 96, device="cuda", dtype=torch.bfloat16)
    assert not stream_gemm_supported(torch.randn(4, 96, device="cuda", dtype=torch.bfloat16), w96)
    base = torch.randn(4, 72, device="cuda", dtype=torch.bfloat16)
    assert not stream_gemm_supported(base[:, 1:65], w)  # x not 16-byte aligned
    assert not stream_gemm_supported(torch.randn(4, 68, device="cuda",
                                                 dtype=torch.bfloat16)[:, :64], w)  # row stride
    assert not stream_gemm_supported(x, w, bias=torch.zeros(32, device="cuda"))
    assert not stream_gemm_supported(x, w[:31], silu_mul=True)  # odd gate/up rows
    out = torch.zeros(4, 32, device="cuda", dtype=torch.bfloat16)
    assert stream_gemm_supported(x, w, add_to=out)
    assert not stream_gemm_supported(x, w, silu_mul=True, add_to=out[:, :16].contiguous())
    assert not stream_gemm_supported(x, w, add_to=x.view(-1)[:128].view(4, 32))  # overlaps x
    rows = torch.zeros(4, 128, device="cuda", dtype=torch.bfloat16)
    strided = rows[:, :64]  # 4 rows 256 bytes apart; its last row ends at byte 896
    assert not stream_gemm_supported(strided, w, add_to=rows.view(-1)[384:512].view(4, 32))
    assert not stream_gemm_supported(torch.zeros(4, 0, device="cuda", dtype=torch.bfloat16),
                                     torch.zeros(32, 0, device="cuda", dtype=torch.bfloat16))  # K = 0
    assert not stream_gemm_supported(x, torch.randn(300000, 64, device="cuda",
                                                    dtype=torch.bfloat16))  # span too large
    monkeypatch.setenv(STREAM_GEMV_ENV, "0")
    assert not stream_gemm_supported(x, w)


def test_linear_layers_use_stream_gemm(monkeypatch):
    """The linear layers hand `stream_gemm` column-parallel forwards of up to
    STREAM_GEMM_MAX_TOKENS rows and row-parallel ones of up to STREAM_GEMM_ROW_MAX_TOKENS; a
    QKV layer (`skinny=True`) hands the Triton skinny GEMM larger ones up to
    SKINNY_COLUMN_MAX_TOKENS; cuBLAS takes the rest, and everything when the kernels are
    switched off (stream_gemm alone switched off sends small forwards to cuBLAS, not to the
    skinny GEMM), for CPU tensors, for weights over the skinny cap and where autograd records;
    what they return matches F.linear."""
    import torch.nn.functional as F

    from paged_backend.kernels import skinny_gemm as skinny_module
    from paged_backend.kernels import stream_gemm as sg_module
    from paged_backend.layers import fused_kernels
    from paged_backend.layers.linear import ColumnParallelLinear, RowParallelLinear

    col_cap, row_cap = fused_kernels.STREAM_GEMM_MAX_TOKENS, fused_kernels.STREAM_GEMM_ROW_MAX_TOKENS
    assert 1 <= row_cap <= col_cap <= sg_module.MAX_M
    qkv_cap = max(col_cap, min(fused_kernels.SKINNY_COLUMN_MAX_TOKENS, skinny_module.MAX_M))
    assert not fused_kernels.use_stream_gemm(torch.randn(4, 64, dtype=torch.bfloat16),
                                             torch.randn(32, 64, dtype=torch.bfloat16))
    assert not fused_kernels.use_skinny_plain(torch.randn(40, 64, dtype=torch.bfloat16),
                                              torch.randn(32, 64, dtype=torch.bfloat16), None,
                                              32, 64)
    if not hopper():
        return
    calls = []
    real, real_skinny = sg_module.stream_gemm, skinny_module.skinny_gemm
    monkeypatch.setattr(sg_module, "stream_gemm",
                        lambda *a, **k: calls.append(("stream", a[0].shape[0])) or real(*a, **k))
    monkeypatch.setattr(skinny_module, "skinny_gemm", lambda *a, **k: calls.append(
        ("skinny", a[0].shape[0])) or real_skinny(*a, **k))
    torch.manual_seed(0)
    qkv = ColumnParallelLinear(256, [128, 64, 64], bias=True, skinny=True).cuda().to(torch.bfloat16)
    col = ColumnParallelLinear(256, 256).cuda().to(torch.bfloat16)
    row = RowParallelLinear(512, 256).cuda().to(torch.bfloat16)
    for layer in (qkv, col, row):
        torch.nn.init.normal_(layer.weight, std=0.05)
        if layer.bias is not None:
            torch.nn.init.normal_(layer.bias)

    def run(layer, m):
        x = torch.randn(m, layer.weight.shape[1], device="cuda", dtype=torch.bfloat16)
        calls.clear()
        with torch.inference_mode():  # as the model runner calls them
            got = layer(x)
        want = F.linear(x.float(), layer.weight.float(),
                        None if layer.bias is None else layer.bias.float())
        torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.02)
        return list(calls)

    for layer, cap, skinny_cap in ((qkv, col_cap, qkv_cap), (col, col_cap, col_cap),
                                   (row, row_cap, row_cap)):
        for m in sorted({1, 4, cap, cap + 1, skinny_cap, skinny_cap + 1}):
            want_calls = ([("stream", m)] if m <= cap else
                          [("skinny", m)] if m <= skinny_cap else [])
            assert run(layer, m) == want_calls, (layer, m, calls)
    small = torch.empty(64, 256, device="cuda", dtype=torch.bfloat16)
    big = torch.empty(fused_kernels.SKINNY_SILU_MAX_WEIGHT_BYTES // (2 * 256) + 8, 256,
                      device="cuda", dtype=torch.bfloat16)  # over the weight cap: cuBLAS
    x = torch.randn(qkv_cap, 256, device="cuda", dtype=torch.bfloat16)
    assert qkv_cap <= col_cap or fused_kernels.use_skinny_plain(x, small, None, col_cap, qkv_cap)
    assert not fused_kernels.use_skinny_plain(x, big, None, col_cap, qkv_cap)
    assert not fused_kernels.use_skinny_plain(x, small, small[0, :63], col_cap, qkv_cap)  # bias
    del big
    for m in (4, qkv_cap):
        x = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
        calls.clear()
        with torch.enable_grad():  # parameters require grad: autograd needs F.linear
            assert qkv(x).requires_grad and calls == []
    monkeypatch.setenv(fused_kernels.STREAM_GEMM_ENV, "0")
    assert run(qkv, 4) == []
    assert run(qkv, qkv_cap) == ([("skinny", qkv_cap)] if qkv_cap > col_cap else [])
    monkeypatch.setenv(fused_kernels.SKINNY_GEMM_ENV, "0")
    assert run(qkv, qkv_cap) == []


def test_overlap_check_spans_strided_rows():
    """The add_to/x overlap check counts a row-strided x's whole span (its later rows too),
    not just numel bytes from its start."""
    from paged_backend.kernels.stream_gemv import _overlaps

    rows = torch.zeros(4, 128, dtype=torch.bfloat16)
    x = rows[:, :64]  # 4 rows 256 bytes apart, ending at byte 896
    assert _overlaps(rows.view(-1)[384:512], x)  # bytes 768-1024: x's last row
    assert not _overlaps(rows.view(-1)[448:512], x)  # bytes 896-1024: after it
    assert _overlaps(x[:1], x) and not _overlaps(rows[:, 64:].contiguous(), x)


def test_skinny_plain_policy(monkeypatch):
    """`use_skinny_plain`'s limits, checked on CPU tensors with the device checks faked true:
    only rows above the stream_gemm cap and up to its own, a weight within the cap, a bias
    of the weight's rows, not where autograd records, not when switched off or without PDL."""
    from paged_backend.kernels import pdl
    from paged_backend.layers import fused_kernels as fk

    pdl_on = [True]
    monkeypatch.setattr(fk, "use_fused_kernels", lambda x: True)
    monkeypatch.setattr(pdl, "pdl_enabled", lambda t: pdl_on[0])
    w = torch.zeros(64, 256, dtype=torch.bfloat16)

    def takes(m, weight=w, bias=None, above=32, cap=64, dtype=torch.bfloat16):
        return fk.use_skinny_plain(torch.zeros(m, 256, dtype=dtype), weight, bias, above, cap)

    assert takes(33) and takes(64) and takes(5, above=4)
    assert not takes(32) and not takes(4) and not takes(65, cap=128)
    assert not takes(40, cap=39)
    assert not takes(40, dtype=torch.float32)
    assert takes(40, bias=torch.zeros(64, dtype=torch.bfloat16))
    assert not takes(40, bias=torch.zeros(63, dtype=torch.bfloat16))
    assert not takes(40, bias=torch.zeros(64, dtype=torch.float16))
    big = torch.zeros(fk.SKINNY_SILU_MAX_WEIGHT_BYTES // (2 * 256) + 1, 256, dtype=torch.bfloat16)
    assert not takes(40, weight=big)
    assert not takes(40, weight=torch.zeros(256, 64, dtype=torch.bfloat16).t())  # column-major
    with torch.enable_grad():
        assert not takes(40, weight=torch.zeros(64, 256, dtype=torch.bfloat16, requires_grad=True))
    with torch.no_grad():
        assert takes(40, weight=torch.zeros(64, 256, dtype=torch.bfloat16, requires_grad=True))
    pdl_on[0] = False
    assert not takes(40)
    pdl_on[0] = True
    monkeypatch.setenv(fk.SKINNY_GEMM_ENV, "0")
    assert not takes(40)
