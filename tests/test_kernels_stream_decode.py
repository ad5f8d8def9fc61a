"""The CUDA decode-attention kernel for a few sequences (`stream_decode`) against the oracle
of the Triton decode kernel with `new_kv` (rotary ref, KV-write ref, decode ref).

The kernel is CUDA C++ compiled at run time, so it runs only on a Hopper-or-newer GPU
(`gpu` tests): head sizes 64/128, GQA groups 1-8, block sizes, contexts from 1 token
(only the new one) to 4096 (more tiles than the shared-memory ring holds), padding rows
and rows that must not be stored, a CUDA graph, the PDL contract, and the backend's
dispatch. On CPU the support check must turn CPU tensors away.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from paged_backend.kernels.decode_attention import DecodeNewKV  # noqa: E402
from paged_backend.kernels.stream_decode import (  # noqa: E402
    STREAM_DECODE_MAX_BATCH, stream_decode, stream_decode_supported)
from paged_backend.kernels.stream_gemv import STREAM_GEMV_ENV  # noqa: E402

from test_kernels_decode import GPU_TOL, check_decode_new_kv, make_case  # noqa: E402
from test_kernels_stream_gemv import needs_hopper  # noqa: E402


def _attend(q, cache, block_tables, seq_lens, scale, new_kv):
    assert stream_decode_supported(q, cache, new_kv, block_tables, seq_lens)
    return stream_decode(q, cache, block_tables, seq_lens, scale, new_kv)


def _attend_early(q, cache, block_tables, seq_lens, scale, new_kv):
    """As the backend calls it: the next kernel may launch as this one starts."""
    assert stream_decode_supported(q, cache, new_kv, block_tables, seq_lens)
    return stream_decode(q, cache, block_tables, seq_lens, scale, new_kv, trigger_early=True)


def cpu_decode_case():
    """A small decode step on CPU tensors: (q, kv_cache, block_tables, seq_lens, new_kv)."""
    q, kv_cache, block_tables, seq_lens = make_case([5], 2, 2, 64, 4, torch.float16)
    k = torch.zeros(1, 2, 64, dtype=torch.float16)
    nk = DecodeNewKV(k, k, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                     torch.ones(32))
    return q, kv_cache, block_tables, seq_lens, nk


def test_stream_decode_rejects_cpu_tensors():
    assert not stream_decode_supported(*cpu_decode_case())


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("lens", [[1], [2], [17], [384], [4095], [300, 1, 0, 2048], [33, 4096]])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("normed", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stream_decode_gpu(dtype, normed, head_dim, group, block_size, lens):
    num_kv_heads = 2 if group == 8 else 4
    check_decode_new_kv(lens, num_kv_heads, group, head_dim, block_size, dtype, splits=[None],
                        atol=GPU_TOL[dtype], normed=normed, device="cuda", theta=500000.0,
                        seed=head_dim + group + len(lens), attend=_attend)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("attend", [_attend, _attend_early], ids=["trigger_after_wait",
                                                                  "trigger_early"])
def test_stream_decode_gpu_odd_block_size_and_unstored_rows(attend):
    """Block size 6 (tokens straddle blocks unevenly); a live row with slot -1 attends to its
    new token without storing it; a padding row's valid slot is not stored."""
    check_decode_new_kv([23, 200, 0], 2, 2, 128, 6, torch.bfloat16, splits=[None],
                        atol=GPU_TOL[torch.bfloat16], normed=True, device="cuda",
                        slot_overrides={1: -1, 2: 5}, attend=attend)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("block_size", [1, 16, 128])
@pytest.mark.parametrize("group", [2, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stream_decode_gpu_ring_edges_sharp_softmax(dtype, head_dim, group, block_size):
    """A softmax scale 16x the usual makes attention nearly an argmax, so one stale or
    misplaced row of any tile shows (as an O(1) error: the tolerance only allows for the
    outputs now being single V rows of magnitude ~3, rounded to the dtype). Lengths put the new token in ring slot 1 (520, 1000),
    at row 0 of a tile loaded after the wait (1032), and stream many tiles (4095, 4096)."""
    num_kv_heads = 2 if group == 4 else 4
    for lens in ([520], [1000], [1032], [4095, 2048, 1000, 4096]):
        check_decode_new_kv(lens, num_kv_heads, group, head_dim, block_size, dtype,
                            splits=[None], atol=4 * GPU_TOL[dtype], normed=True,
                            device="cuda", theta=500000.0, seed=len(lens), attend=_attend,
                            scale=16 * head_dim ** -0.5)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("group", [3, 5, 6, 7])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_stream_decode_gpu_odd_groups(head_dim, group):
    """GQA groups that are not powers of two (Llama-3.2-3B: 3, Qwen2.5-1.5B: 6, -7B: 7)."""
    check_decode_new_kv([1, 300, 1032, 4095], 2, group, head_dim, 16, torch.bfloat16,
                        splits=[None], atol=GPU_TOL[torch.bfloat16], normed=True, device="cuda",
                        seed=group, attend=_attend)


@pytest.mark.gpu
@needs_hopper
def test_stream_decode_gpu_without_pdl_into_out_q_norm_only(monkeypatch):
    """PDL off (no griddepcontrol), the result written into a given `out`, only q normed."""

    def attend(q, cache, block_tables, seq_lens, scale, new_kv, out):
        assert stream_decode_supported(q, cache, new_kv, block_tables, seq_lens)
        return stream_decode(q, cache, block_tables, seq_lens, scale, new_kv, out=out)

    check_without_pdl_into_out(monkeypatch, attend, [33, 700])


def check_without_pdl_into_out(monkeypatch, attend, lens):
    """`attend(q, cache, block_tables, seq_lens, scale, new_kv, out)` with PDL off writes a
    NaN-filled `out` and returns it, against the oracle (only q normed)."""
    from paged_backend.kernels import pdl

    monkeypatch.setenv(pdl.PDL_ENV, "0")
    pdl._device_supports_pdl.cache_clear()
    try:
        assert not pdl.pdl_enabled(torch.zeros(1, device="cuda"))

        def attend_out(q, cache, block_tables, seq_lens, scale, new_kv):
            assert new_kv.q_norm_weight is not None and new_kv.k_norm_weight is None
            out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
            got = attend(q, cache, block_tables, seq_lens, scale, new_kv, out)
            assert got is out
            return got

        check_decode_new_kv(lens, 4, 2, 128, 16, torch.bfloat16, splits=[None],
                            atol=GPU_TOL[torch.bfloat16], normed="q", device="cuda",
                            attend=attend_out)
    finally:
        monkeypatch.delenv(pdl.PDL_ENV)
        pdl._device_supports_pdl.cache_clear()


@pytest.mark.gpu
@needs_hopper
def test_stream_decode_supported_rejects():
    """What the kernel does not take: head_dim 256, 16 query heads per KV head, float32,
    int32 positions, a strided seq_lens, five sequences, a cache without a V half."""
    qkv, q, kv_cache, bt, sl, nk = _qwen_like_case([10])
    assert stream_decode_supported(q, kv_cache, nk, bt, sl)
    from dataclasses import replace
    assert not stream_decode_supported(q, kv_cache, replace(nk, positions=nk.positions.int()),
                                       bt, sl)
    assert not stream_decode_supported(q, kv_cache, nk, bt, torch.stack([sl, sl], 1)[:, 0])
    assert not stream_decode_supported(q, kv_cache[:1], nk, bt, sl)
    assert not stream_decode_supported(q.float(), kv_cache.float(), replace(
        nk, k=nk.k.float(), v=nk.v.float(), q_norm_weight=None, k_norm_weight=None), bt, sl)
    q5 = q.expand(5, -1, -1)
    assert not stream_decode_supported(q5, kv_cache, nk, bt.expand(5, -1), sl.expand(5))
    q16 = torch.zeros(1, 128, 128, dtype=q.dtype, device="cuda")
    assert not stream_decode_supported(q16, kv_cache, nk, bt, sl)
    c256 = torch.zeros(2, 4, 16, 8, 256, dtype=q.dtype, device="cuda")
    q256 = torch.zeros(1, 16, 256, dtype=q.dtype, device="cuda")
    assert not stream_decode_supported(q256, c256, nk, bt, sl)


def _qwen_like_case(lens, seed=0):
    """q/k/v views of one fused QKV row block (Qwen3-0.6B's heads), a cache, a DecodeNewKV."""
    hkv, group, d, bs = 8, 2, 128, 16
    _, kv_cache, block_tables, seq_lens = make_case(lens, hkv, group, d, bs, torch.bfloat16,
                                                    "cuda", seed)
    gen = torch.Generator().manual_seed(seed + 1)
    qkv = torch.randn(len(lens), (group + 2) * hkv * d, generator=gen).to("cuda", torch.bfloat16)
    q, k, v = qkv.view(len(lens), -1, d).split([group * hkv, hkv, hkv], dim=1)
    positions = (seq_lens.long() - 1).clamp(min=0)
    slots = torch.tensor([int(block_tables[b, (n - 1) // bs]) * bs + (n - 1) % bs
                          for b, n in enumerate(lens)], device="cuda")
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    w = (torch.rand(d, generator=gen) + 0.5).to("cuda", torch.bfloat16)
    return qkv, q, kv_cache, block_tables, seq_lens, DecodeNewKV(k, v, positions, slots,
                                                                 inv_freq, w, w, 1e-6)


def write_late(dst, src):
    """Copy `src` into `dst` with a kernel that lets the next launch start at once (PDL
    trigger first) and writes only after a long spin: a kernel launched next that read
    `dst` before its own wait would see zeros."""
    import triton
    import triton.language as tl

    global _slow_writer
    if _slow_writer is None:
        @triton.jit
        def slow_writer(dst, src, n, spin, BLOCK: tl.constexpr):
            tl.extra.cuda.gdc_launch_dependents()
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for _ in range(spin):
                acc = acc * 0.5 + 1.0
            one = acc * 0.5
            offs = tl.arange(0, BLOCK)
            v = tl.load(src + offs, mask=offs < n)
            tl.store(dst + offs, (v.to(tl.float32) * one).to(v.dtype), mask=offs < n)
        _slow_writer = slow_writer
    n = dst.numel()
    _slow_writer[(1,)](dst, src, n, 20000, BLOCK=triton.next_power_of_2(n))


_slow_writer = None


def run_backend_decode(backend, lens, **kw):
    """`backend.decode_with_new_kv` on a Qwen3-0.6B-like pure-decode step of `lens`, checked
    (output and cache) against the Triton decode kernel with `new_kv`."""
    from paged_backend.layers.attention import AttentionMetadata

    qkv, q, kv_cache, bt, sl, nk = _qwen_like_case(lens, seed=3)
    n = len(lens)
    meta = AttentionMetadata(
        num_tokens=n, query_start_loc=torch.arange(n + 1, dtype=torch.int32, device="cuda"),
        seq_lens=sl, slot_mapping=nk.slot_mapping, block_tables=bt, max_query_len=1,
        max_seq_len=max(lens), block_size=16,
        query_start_loc_cpu=list(range(n + 1)), seq_lens_cpu=list(lens))
    cache = kv_cache.clone()
    out = backend.decode_with_new_kv(q, nk, cache, meta, 128 ** -0.5, **kw)
    ref_cache = kv_cache.clone()
    ref = backend._decode(q, ref_cache, bt, sl, 128 ** -0.5, new_kv=nk)
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=2e-2)
    torch.testing.assert_close(cache, ref_cache, rtol=1e-2, atol=2e-2, equal_nan=True)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("early", [False, True], ids=["trigger_after_wait", "trigger_early"])
def test_stream_decode_waits_for_the_kernel_before_it(early):
    """PDL contract: a predecessor that lets the kernel launch at once and writes q, k, v
    late must still be seen complete (only the cached context loads before the wait),
    also when the kernel itself triggers its successor at its start."""
    check_waits_for_late_writer(stream_decode, [300], early)


def check_waits_for_late_writer(attend, lens, early):
    """`attend(q, cache, block_tables, seq_lens, scale, new_kv, trigger_early=early)` right
    after `write_late` fills its q, k, v: it must see them complete, three times over."""
    from paged_backend.kernels.decode_attention import decode_attention
    from paged_backend.kernels.pdl import pdl_enabled

    qkv_true, _, kv_cache, block_tables, seq_lens, nk_true = _qwen_like_case(lens)
    assert pdl_enabled(qkv_true)
    cache_ref = kv_cache.clone()
    n = len(lens)
    q_t, _, _ = qkv_true.view(n, -1, 128).split([16, 8, 8], dim=1)
    expected = decode_attention(q_t, cache_ref, block_tables, seq_lens, 128 ** -0.5,
                                new_kv=nk_true)
    for _ in range(3):
        qkv = torch.zeros_like(qkv_true)
        q, k, v = qkv.view(n, -1, 128).split([16, 8, 8], dim=1)
        nk = DecodeNewKV(k, v, *[getattr(nk_true, f) for f in (
            "positions", "slot_mapping", "inv_freq", "q_norm_weight", "k_norm_weight", "eps")])
        cache = kv_cache.clone()
        write_late(qkv, qkv_true)
        out = attend(q, cache, block_tables, seq_lens, 128 ** -0.5, nk, trigger_early=early)
        torch.testing.assert_close(out.float(), expected.float(), rtol=0, atol=2e-2)
        torch.testing.assert_close(cache, cache_ref, rtol=1e-2, atol=2e-2, equal_nan=True)


@pytest.mark.gpu
@needs_hopper
def test_gemv_after_an_early_triggering_stream_decode():
    """With `trigger_early` the output projection launches as attention starts and streams
    its weights in; its wait must still see this run's attention output (and attention
    this run's q, k, v), with the QKV projection before attention triggering early too, as
    the model runs them: eagerly and in a CUDA graph, on new inputs every time, so that a
    read of the previous run's intermediates would show."""
    from paged_backend.kernels.decode_attention import decode_attention
    from paged_backend.kernels.stream_gemv import stream_gemv

    _, _, kv_cache, block_tables, seq_lens, nk = _qwen_like_case([1500])
    scale = 128 ** -0.5
    consts = [getattr(nk, f) for f in ("positions", "slot_mapping", "inv_freq", "q_norm_weight",
                                       "k_norm_weight", "eps")]
    gen = torch.Generator().manual_seed(7)
    w_o = (torch.randn(1024, 2048, generator=gen) * 0.02).to("cuda", torch.bfloat16)
    w_qkv = (torch.randn(4096, 1024, generator=gen) * 0.05).to("cuda", torch.bfloat16)
    x = torch.zeros(1, 1024, dtype=torch.bfloat16, device="cuda")  # static input

    def reference():
        cache = kv_cache.clone()
        qkv = (x.float() @ w_qkv.float().t()).to(torch.bfloat16)
        q, k, v = qkv.view(1, -1, 128).split([16, 8, 8], dim=1)
        att = decode_attention(q, cache, block_tables, seq_lens, scale,
                               new_kv=DecodeNewKV(k, v, *consts))
        return att.view(1, -1).float() @ w_o.float().t(), cache

    def layer(cache):
        qkv = stream_gemv(x, w_qkv, trigger_early=True)
        q, k, v = qkv.view(1, -1, 128).split([16, 8, 8], dim=1)
        att = stream_decode(q, cache, block_tables, seq_lens, scale, DecodeNewKV(k, v, *consts),
                            trigger_early=True)
        return stream_gemv(att.view(1, -1), w_o, exclusive=True, trigger_early=True)

    def check(out, cache):
        ref, ref_cache = reference()
        # Rounding: one bf16 ulp apart in q/k/v, then o rounded (|o| up to ~5): < 5e-2.
        # Another run's intermediates would be O(1) off.
        torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=5e-2)
        torch.testing.assert_close(cache, ref_cache, rtol=1e-2, atol=2e-2, equal_nan=True)

    for _ in range(3):
        x.copy_(torch.randn(1, 1024, generator=gen).to(torch.bfloat16))
        cache = kv_cache.clone()
        check(layer(cache), cache)
    cache = kv_cache.clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(cache)
    for _ in range(3):
        x.copy_(torch.randn(1, 1024, generator=gen).to(torch.bfloat16))
        cache.copy_(kv_cache)
        graph.replay()
        check(out, cache)


@pytest.mark.gpu
@needs_hopper
def test_stream_decode_in_a_cuda_graph():
    """Captured once, replayed with new lengths, positions and slots: the grid and shared
    memory do not depend on the context length (the ring streams any number of tiles)."""
    check_graph_replays(stream_decode, [4000, 7, 1500], [[1, 2, 3], [0, 6, 64], [2500, 7, 1]])


def check_graph_replays(attend, first, later):
    """`attend(q, cache, block_tables, seq_lens, scale, new_kv, trigger_early=...)` captured
    once in a CUDA graph over static seq_lens, positions and slots, then replayed with the
    lengths `first` and each of `later` (within each row's blocks, which `first` sizes),
    output and cache checked against the Triton kernel each time."""
    from paged_backend.kernels.decode_attention import decode_attention

    qkv, q, kv_cache, block_tables, seq_lens, nk = _qwen_like_case(first)
    scale = 128 ** -0.5
    n = len(first)
    static_lens = torch.full((n,), 5, dtype=torch.int32, device="cuda")
    static_pos = torch.zeros(n, dtype=torch.long, device="cuda")
    static_slots = torch.full((n,), -1, dtype=torch.long, device="cuda")
    gnk = DecodeNewKV(nk.k, nk.v, static_pos, static_slots, nk.inv_freq, nk.q_norm_weight,
                      nk.k_norm_weight, nk.eps)
    cache = kv_cache.clone()
    attend(q, cache, block_tables, static_lens, scale, gnk)  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attend(q, cache, block_tables, static_lens, scale, gnk, trigger_early=True)
    for lens in (first, *later):
        lens_t = torch.tensor(lens, dtype=torch.int32, device="cuda")
        pos = (lens_t.long() - 1).clamp(min=0)
        slots = torch.tensor([int(block_tables[b, (m - 1) // 16]) * 16 + (m - 1) % 16 if m else -1
                              for b, m in enumerate(lens)], device="cuda")
        cache.copy_(kv_cache)
        static_lens.copy_(lens_t)
        static_pos.copy_(pos)
        static_slots.copy_(slots)
        graph.replay()
        ref_cache = kv_cache.clone()
        ref = decode_attention(q, ref_cache, block_tables, lens_t, scale, new_kv=DecodeNewKV(
            nk.k, nk.v, pos, slots, nk.inv_freq, nk.q_norm_weight, nk.k_norm_weight, nk.eps))
        torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=2e-2)
        torch.testing.assert_close(cache, ref_cache, rtol=1e-2, atol=2e-2, equal_nan=True)


@pytest.mark.gpu
@needs_hopper
def test_backend_dispatch(monkeypatch):
    """The Triton backend's pure-decode path runs stream_decode for at most
    STREAM_DECODE_MAX_BATCH sequences, another kernel for more (batch_decode: its own
    dispatch test) or with the switch off (the Triton kernels), with the same results."""
    import paged_backend.layers.triton_attention as ta

    calls = []
    backend = ta.TritonAttentionBackend()
    real = backend._stream_decode
    backend._stream_decode = lambda *a, **k: calls.append(k.get("trigger_early")) or real(*a, **k)

    def run(lens, **kw):
        run_backend_decode(backend, lens, **kw)

    run([100] * STREAM_DECODE_MAX_BATCH, trigger_early=True)  # the caller's choice reaches
    assert calls == [True]                                    # the kernel
    run([100] * STREAM_DECODE_MAX_BATCH)
    assert calls == [True, False]
    run([100] * (STREAM_DECODE_MAX_BATCH + 1), trigger_early=True)
    assert calls == [True, False]
    monkeypatch.setenv(STREAM_GEMV_ENV, "0")
    run([100], trigger_early=True)
    assert calls == [True, False]
