"""The CUDA decode-attention kernel for batches (`batch_decode`) against the oracle of the
Triton decode kernel with `new_kv` (rotary ref, KV-write ref, decode ref).

CUDA C++ compiled at run time, so it runs only on a Hopper-or-newer GPU (`gpu` tests):
head sizes 64/128, GQA groups 1-8, 1, 2, 4 and 8 splits, block sizes (1, odd, 16, 128),
contexts from 1 token (only the new one) to 4096, batches up to 256, padding rows and rows
that must not be stored, a softmax sharp enough that one misplaced row shows, a CUDA
graph, the PDL contract, and the backend's dispatch. On CPU the support check must turn
CPU tensors away.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from paged_backend.kernels.batch_decode import (  # noqa: E402
    batch_decode, batch_decode_supported, choose_splits)
from paged_backend.kernels.decode_attention import DecodeNewKV  # noqa: E402

from test_kernels_decode import GPU_TOL, check_decode_new_kv, make_case  # noqa: E402
from test_kernels_stream_decode import (  # noqa: E402
    _qwen_like_case, check_graph_replays, check_waits_for_late_writer,
    check_without_pdl_into_out, cpu_decode_case, run_backend_decode)
from test_kernels_stream_gemv import needs_hopper  # noqa: E402


def _attend_with(splits, **kw):
    def attend(q, cache, block_tables, seq_lens, scale, new_kv):
        assert batch_decode_supported(q, cache, new_kv, block_tables, seq_lens, splits,
                                      **{k: v for k, v in kw.items() if k != "trigger_early"})
        return batch_decode(q, cache, block_tables, seq_lens, scale, new_kv, splits=splits, **kw)
    return attend


def test_choose_splits():
    """More programs per (sequence, KV head) for small batches, one for large ones."""
    assert choose_splits(1, 8) == 8
    assert choose_splits(5, 8) == 4
    assert choose_splits(8, 8) == 2
    assert choose_splits(16, 8) == 2
    assert choose_splits(64, 8) == 2
    assert choose_splits(128, 8) == 1
    assert choose_splits(256, 2) == 2


def test_batch_decode_rejects_cpu_tensors():
    q, kv_cache, block_tables, seq_lens, nk = cpu_decode_case()
    assert not batch_decode_supported(q, kv_cache, nk, block_tables, seq_lens)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("lens", [[1], [2], [17], [384], [4095], [300, 1, 0, 2048], [33, 4096]])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("splits", [1, 2, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_batch_decode_gpu(dtype, splits, head_dim, group, block_size, lens):
    num_kv_heads = 2 if group == 8 else 4
    check_decode_new_kv(lens, num_kv_heads, group, head_dim, block_size, dtype, splits=[None],
                        atol=GPU_TOL[dtype], normed=splits != 2, device="cuda",
                        theta=500000.0, seed=head_dim + group + len(lens),
                        attend=_attend_with(splits))


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("splits", [1, 2, 4, 8])
@pytest.mark.parametrize("early", [False, True])
def test_batch_decode_gpu_odd_block_size_and_unstored_rows(splits, early):
    """Block size 6 (tokens straddle blocks unevenly); a live row with slot -1 reads its
    new token from the cache without storing it; a padding row's valid slot is not stored."""
    check_decode_new_kv([23, 200, 0, 1], 2, 2, 128, 6, torch.bfloat16, splits=[None],
                        atol=GPU_TOL[torch.bfloat16], normed=True, device="cuda",
                        slot_overrides={1: -1, 2: 5}, attend=_attend_with(splits,
                                                                          trigger_early=early))


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("block_size", [1, 16, 128])
@pytest.mark.parametrize("group", [2, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("splits", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_batch_decode_gpu_sharp_softmax(dtype, splits, head_dim, group, block_size):
    """A softmax scale 16x the usual makes attention nearly an argmax, so one stale,
    misplaced or mis-swizzled row of any chunk shows as an O(1) error (the tolerance only
    allows for outputs that are single V rows of magnitude ~3, rounded). Lengths end
    chunks and splits at every offset, and stream many chunks through each warp's ring."""
    num_kv_heads = 2 if group == 4 else 4
    for lens in ([520, 17, 16, 15], [1000, 33], [1032, 2, 64, 65], [4095, 2048, 1000, 4096]):
        check_decode_new_kv(lens, num_kv_heads, group, head_dim, block_size, dtype,
                            splits=[None], atol=4 * GPU_TOL[dtype], normed=True,
                            device="cuda", theta=500000.0, seed=len(lens) + block_size,
                            attend=_attend_with(splits), scale=16 * head_dim ** -0.5)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("group", [3, 5, 6, 7])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_batch_decode_gpu_odd_groups(head_dim, group):
    """GQA groups that are not powers of two (Llama-3.2-3B: 3, Qwen2.5-1.5B: 6, -7B: 7)."""
    check_decode_new_kv([1, 300, 1032, 4095], 2, group, head_dim, 16, torch.bfloat16,
                        splits=[None], atol=GPU_TOL[torch.bfloat16], normed=True, device="cuda",
                        seed=group, attend=_attend_with(2))


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("batch", [5, 64, 256])
def test_batch_decode_gpu_large_batches_default_splits(batch):
    """Engine-sized batches (random lengths up to 2048, some padding rows) with the default
    split count, against the Triton kernel with `new_kv`."""
    gen = torch.Generator().manual_seed(batch)
    lens = torch.randint(1, 2049, (batch,), generator=gen).tolist()
    lens[batch // 2] = 0
    check_decode_new_kv(lens, 8, 2, 128, 16, torch.bfloat16, splits=[None],
                        atol=GPU_TOL[torch.bfloat16], normed=True, device="cuda", seed=batch,
                        attend=_attend_with(None))


@pytest.mark.gpu
@needs_hopper
def test_batch_decode_gpu_without_pdl_into_out(monkeypatch):
    """PDL off (no griddepcontrol), the result written into a given `out`, only q normed."""

    def attend(q, cache, block_tables, seq_lens, scale, new_kv, out):
        return batch_decode(q, cache, block_tables, seq_lens, scale, new_kv, out=out)

    check_without_pdl_into_out(monkeypatch, attend, [33, 700, 5, 90])


@pytest.mark.gpu
@needs_hopper
def test_batch_decode_supported_rejects():
    """What the kernel does not take: head_dim 256, 16 query heads per KV head, float32,
    int32 positions, a cache without a V half, a split count that is not 1, 2, 4 or 8."""
    from dataclasses import replace

    qkv, q, kv_cache, bt, sl, nk = _qwen_like_case([10] * 6)
    assert batch_decode_supported(q, kv_cache, nk, bt, sl)
    assert not batch_decode_supported(q, kv_cache, replace(nk, positions=nk.positions.int()),
                                      bt, sl)
    assert not batch_decode_supported(q, kv_cache[:1], nk, bt, sl)
    assert not batch_decode_supported(q.float(), kv_cache.float(), replace(
        nk, k=nk.k.float(), v=nk.v.float(), q_norm_weight=None, k_norm_weight=None), bt, sl)
    q16 = torch.zeros(6, 128, 128, dtype=q.dtype, device="cuda")
    assert not batch_decode_supported(q16, kv_cache, nk, bt, sl)
    with pytest.raises(ValueError, match="splits"):
        batch_decode(q, kv_cache, bt, sl, 0.1, nk, splits=3)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("early", [False, True], ids=["trigger_after_wait", "trigger_early"])
def test_batch_decode_waits_for_the_kernel_before_it(early):
    """PDL contract: a predecessor that lets the kernel launch at once and writes q, k, v
    late must still be seen complete (only the cached context loads before the wait)."""
    check_waits_for_late_writer(batch_decode, [300, 40, 1200, 7, 513, 64, 65, 2], early)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("splits", [1, 2])
def test_batch_decode_in_a_cuda_graph(splits):
    """Captured once, replayed with new lengths, positions and slots: the grid and shared
    memory do not depend on the context length."""
    check_graph_replays(functools.partial(batch_decode, splits=splits),
                        [4000, 7, 1500, 33, 40, 16],  # the blocks each row may use below
                        [[1, 2, 3, 4, 5, 6], [0, 6, 64, 0, 17, 1], [2500, 7, 1, 30, 0, 9]])


@pytest.mark.gpu
@needs_hopper
def test_backend_dispatch(monkeypatch):
    """The Triton backend's pure-decode path runs batch_decode for more sequences than
    stream_decode takes, passing the caller's `trigger_early`, and the Triton kernels with
    the switch off, with the same results."""
    import paged_backend.layers.triton_attention as ta
    from paged_backend.kernels.stream_decode import STREAM_DECODE_MAX_BATCH
    from paged_backend.kernels.stream_gemv import STREAM_GEMV_ENV

    calls = []
    backend = ta.TritonAttentionBackend()
    real = backend._batch_decode
    backend._batch_decode = lambda *a, **k: calls.append((a[0].shape[0],
                                                          k.get("trigger_early"))) or real(*a, **k)

    def run(lens, **kw):
        run_backend_decode(backend, lens, **kw)

    run([100] * STREAM_DECODE_MAX_BATCH)  # stream_decode's
    assert calls == []
    run([100, 7, 300, 64, 1000] * 13, trigger_early=True)
    assert calls == [(65, True)]
    run([100] * (STREAM_DECODE_MAX_BATCH + 1))
    assert calls == [(65, True), (STREAM_DECODE_MAX_BATCH + 1, False)]
    monkeypatch.setenv(STREAM_GEMV_ENV, "0")
    run([100] * 8, trigger_early=True)
    assert len(calls) == 2


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("nwarps,stages", [(1, 1), (1, 4), (2, 1), (2, 2), (2, 4), (4, 1),
                                           (8, 1), (8, 2)])
def test_batch_decode_gpu_warps_and_ring_depths(nwarps, stages):
    """The tuning knobs change the ring accounting and how many warps share a sequence's
    chunks (and the accumulators' reuse of the rings); settings that fit must agree with
    the oracle (8 warps x 4 slots does not fit: the next test)."""
    check_decode_new_kv([1000, 33, 0, 4095, 17], 2, 4, 128, 16, torch.bfloat16,
                        splits=[None], atol=GPU_TOL[torch.bfloat16], normed=True,
                        device="cuda", seed=nwarps * 10 + stages,
                        attend=_attend_with(2, nwarps=nwarps, stages=stages))


@pytest.mark.gpu
@needs_hopper
def test_batch_decode_rejects_settings_that_do_not_fit():
    """A ring too big for shared memory (8 warps x 4 slots, head_dim 128, 8 query heads per
    KV head) is refused by the support check, and the call raises a ValueError."""
    _, kv_cache, bt, sl = make_case([40, 9], 2, 8, 128, 16, torch.bfloat16, "cuda", 0)
    q = torch.randn(2, 16, 128, device="cuda").to(torch.bfloat16)
    kn = torch.randn(2, 2, 128, device="cuda").to(torch.bfloat16)
    nk = DecodeNewKV(kn, kn, (sl.long() - 1), torch.full((2,), -1, device="cuda"),
                     torch.ones(64, device="cuda"))
    assert batch_decode_supported(q, kv_cache, nk, bt, sl, 2)
    assert not batch_decode_supported(q, kv_cache, nk, bt, sl, 2, nwarps=8, stages=4)
    assert not batch_decode_supported(q, kv_cache, nk, bt, sl, 2, nwarps=0)
    with pytest.raises(ValueError, match="batch_decode"):
        batch_decode(q, kv_cache, bt, sl, 0.1, nk, splits=2, nwarps=8, stages=4)


@pytest.mark.gpu
@needs_hopper
def test_batch_decode_gpu_strided_cache_and_block_table():
    """A cache whose KV heads are every other head of a wider tensor (head stride 2 D) and
    a block table that is a slice of wider rows give bit-for-bit the contiguous result."""
    lens = [300, 1, 77, 1500, 0, 16]
    qkv, q, kv_cache, bt, sl, nk = _qwen_like_case(lens, seed=4)
    scale = 128 ** -0.5
    cache_c = kv_cache.clone()
    out_c = batch_decode(q, cache_c, bt, sl, scale, nk)
    two, nblk, bs, hkv, d = kv_cache.shape
    wide = torch.zeros(two, nblk, bs, 2 * hkv, d, dtype=kv_cache.dtype, device="cuda")
    cache_s = wide[:, :, :, ::2]
    cache_s.copy_(kv_cache)
    bt_wide = torch.full((bt.shape[0], bt.shape[1] + 8), -7, dtype=torch.int32, device="cuda")
    bt_s = bt_wide[:, :bt.shape[1]]
    bt_s.copy_(bt)
    assert cache_s.stride(3) == 2 * d and bt_s.stride(0) == bt.shape[1] + 8
    assert batch_decode_supported(q, cache_s, nk, bt_s, sl)
    out_s = batch_decode(q, cache_s, bt_s, sl, scale, nk)
    assert torch.equal(out_s, out_c)
    # (unused cache rows hold NaN: equal_nan)
    torch.testing.assert_close(cache_s, cache_c, rtol=0, atol=0, equal_nan=True)
    assert (wide[:, :, :, 1::2] == 0).all()  # the heads in between are not written


@pytest.mark.gpu
@needs_hopper
def test_batch_decode_gpu_cache_past_two_billion_elements():
    """Blocks at the top of a cache of more than 2**31 elements (4.6 GB in bf16): offsets
    are 64-bit. The result must equal, bit for bit, that over a compact copy of the same
    blocks."""
    hkv, d, bs = 8, 128, 16
    nblk = 70_000
    assert 2 * nblk * bs * hkv * d > 2 ** 31
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2 ** 30:
        pytest.skip("needs ~12 GB of free GPU memory")
    lens = [900, 37, 2048]
    qkv, q, small, bt, sl, nk = _qwen_like_case(lens, seed=6)
    big = torch.empty(2, nblk, bs, hkv, d, dtype=small.dtype, device="cuda")
    used = torch.unique(bt.long())
    top = nblk - 1 - torch.arange(used.numel(), device="cuda")  # the last blocks
    big[:, top] = small[:, used]
    remap = torch.full((small.shape[1],), -1, dtype=torch.long, device="cuda")
    remap[used] = top
    bt_big = remap[bt.long()].int()
    slots_big = (remap[nk.slot_mapping // bs] * bs + nk.slot_mapping % bs)
    nk_big = DecodeNewKV(nk.k, nk.v, nk.positions, slots_big, nk.inv_freq, nk.q_norm_weight,
                         nk.k_norm_weight, nk.eps)
    scale = 128 ** -0.5
    out_small = batch_decode(q, small, bt, sl, scale, nk)
    out_big = batch_decode(q, big, bt_big, sl, scale, nk_big)
    assert torch.equal(out_big, out_small)
    # the new tokens stored alike (unused rows hold NaN: equal_nan)
    torch.testing.assert_close(big[:, top], small[:, used], rtol=0, atol=0, equal_nan=True)
    del big
