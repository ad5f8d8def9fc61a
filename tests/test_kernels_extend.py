"""Tests of the varlen paged Triton attention kernel (`paged_backend.kernels.extend_attention`).

On CPU the kernel runs under the Triton interpreter (tiny shapes only); the
`gpu` tests sweep realistic shapes on CUDA.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from paged_backend.kernels.extend_attention import extend_attention, extend_attention_ref  # noqa: E402
from paged_backend.layers.attention import AttentionMetadata  # noqa: E402
from paged_backend.layers.torch_attention import TorchAttentionBackend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_batch(pairs, block_size, num_kv_heads, group, head_dim, dtype, device=DEVICE, seed=0,
               extra_blocks=3, strided_q=False):
    """A mixed batch of `(cached_prefix_len, new_len)` pairs over a shuffled paged cache.

    Cache slots that no sequence owns (and the tails of last blocks) hold NaN,
    so reading any of them would show in the output.
    """
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_q_heads = num_kv_heads * group
    seq_lens = [p + n for p, n in pairs]
    q_lens = [n for _, n in pairs]
    nblocks = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(nblocks) + extra_blocks
    perm = list(range(num_blocks))
    rng.shuffle(perm)
    max_blocks = max(max(nblocks), 1) + 1  # one padding column
    tables = torch.zeros(len(pairs), max_blocks, dtype=torch.int32)
    kv_cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"),
                          dtype=dtype)
    slot_mapping, ctx_slots = [], []
    used = 0
    for b, (seq_len, q_len) in enumerate(zip(seq_lens, q_lens)):
        blocks = perm[used:used + nblocks[b]]
        used += nblocks[b]
        tables[b, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        slots = [blocks[t // block_size] * block_size + t % block_size for t in range(seq_len)]
        ctx_slots += slots
        slot_mapping += slots[seq_len - q_len:]
    flat = kv_cache.view(2, -1, num_kv_heads, head_dim)
    flat[:, ctx_slots] = torch.randn(2, len(ctx_slots), num_kv_heads, head_dim,
                                     generator=gen).to(dtype)
    num_tokens = sum(q_lens)
    if strided_q:  # q as a view into a wider [T, Hq + 2 * Hkv, D] qkv tensor
        qkv = torch.randn(num_tokens, num_q_heads + 2 * num_kv_heads, head_dim, generator=gen)
        q = qkv.to(dtype).to(device)[:, :num_q_heads]
    else:
        q = torch.randn(num_tokens, num_q_heads, head_dim, generator=gen).to(dtype).to(device)
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    meta = AttentionMetadata(
        num_tokens=num_tokens,
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=device),
        block_tables=tables.to(device),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        block_size=block_size,
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens,
    )
    return q, kv_cache.to(device), meta


def run_kernel(q, kv_cache, meta, scale, out=None):
    return extend_attention(q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                            meta.max_query_len, scale, out=out)


def run_ref(q, kv_cache, meta, scale):
    return extend_attention_ref(q, kv_cache, meta.block_tables, meta.seq_lens,
                                meta.query_start_loc, meta.max_query_len, scale)


def tolerances(dtype):
    return {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3),
            torch.bfloat16: (1.6e-2, 1.6e-2)}[dtype]


MIXED = [(0, 5), (7, 3), (12, 1), (0, 1), (3, 17)]

# (pairs, block_size, num_kv_heads, group, head_dim, dtype)
CPU_CASES = [
    pytest.param(MIXED, 4, 2, 1, 16, torch.float32, id="mixed-bs4-mha-d16-f32"),
    pytest.param(MIXED, 1, 1, 4, 32, torch.float32, id="mixed-bs1-gqa4-d32-f32"),
    pytest.param(MIXED, 16, 2, 2, 16, torch.float16, id="mixed-bs16-gqa2-d16-f16"),
    pytest.param([(5, 2), (4, 0), (0, 9)], 5, 1, 3, 16, torch.float32,
                 id="qlen0-bs5-gqa3-d16-f32"),
    pytest.param([(9, 1), (0, 1), (30, 1), (16, 1)], 4, 2, 4, 16, torch.float16,
                 id="decode-bs4-gqa4-d16-f16"),
    pytest.param([(40, 70), (65, 2), (62, 3)], 16, 1, 1, 16, torch.float32,
                 id="multitile-bs16-mha-d16-f32"),
]


@pytest.mark.parametrize("pairs,block_size,num_kv_heads,group,head_dim,dtype", CPU_CASES)
def test_extend_attention_small(pairs, block_size, num_kv_heads, group, head_dim, dtype):
    q, kv_cache, meta = make_batch(pairs, block_size, num_kv_heads, group, head_dim, dtype,
                                   strided_q=block_size == 4)
    scale = head_dim ** -0.5
    out = run_kernel(q, kv_cache, meta, scale)
    ref = run_ref(q, kv_cache, meta, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out.float()).all()
    atol, rtol = tolerances(dtype)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    backend = TorchAttentionBackend().attend(q, kv_cache, meta, scale)
    torch.testing.assert_close(out, backend, atol=atol, rtol=rtol)


def test_extend_attention_out_arg_and_larger_max_query_len():
    """`out` is filled in place; a `max_query_len` above the real maximum is harmless."""
    q, kv_cache, meta = make_batch([(3, 4), (0, 2)], 4, 1, 2, 16, torch.float32, seed=1)
    out = torch.full_like(q, 7.0)
    meta.max_query_len = 40
    res = run_kernel(q, kv_cache, meta, 0.3, out=out)
    assert res.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, run_ref(q, kv_cache, meta, 0.3), atol=1e-5, rtol=1e-5)


def test_reference_matches_torch_backend():
    q, kv_cache, meta = make_batch(MIXED, 3, 2, 2, 8, torch.float32, seed=2)
    ref = run_ref(q, kv_cache, meta, 0.25)
    torch.testing.assert_close(ref, TorchAttentionBackend().attend(q, kv_cache, meta, 0.25),
                               atol=1e-5, rtol=1e-5)


def test_rejects_bad_head_dim():
    q, kv_cache, meta = make_batch([(0, 2)], 4, 1, 1, 24, torch.float32)
    with pytest.raises(AssertionError):
        run_kernel(q, kv_cache, meta, 1.0)


# ----------------------------------------------------------------------------- GPU


def _random_pairs(rng, batch, max_prompt):
    pairs = []
    for _ in range(batch):
        kind = rng.random()
        if kind < 0.3:  # decode
            pairs.append((rng.randint(1, max_prompt), 1))
        elif kind < 0.6:  # fresh prefill
            pairs.append((0, rng.randint(2, max_prompt)))
        else:  # prefix hit / later chunk
            prefix = rng.randint(1, max_prompt)
            pairs.append((prefix, rng.randint(1, max(1, max_prompt - prefix))))
    return pairs


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_extend_attention_gpu_grid(head_dim, group, block_size, dtype):
    rng = random.Random(head_dim * 1000 + group * 10 + block_size)
    pairs = _random_pairs(rng, rng.randint(1, 16), 2048)
    q, kv_cache, meta = make_batch(pairs, block_size, 2, group, head_dim, dtype,
                                   seed=rng.randint(0, 10 ** 6))
    scale = head_dim ** -0.5
    out = run_kernel(q, kv_cache, meta, scale)
    torch.cuda.synchronize()
    ref = run_ref(q, kv_cache, meta, scale)
    atol, rtol = tolerances(dtype)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


@pytest.mark.gpu
@pytest.mark.parametrize("pairs", [
    pytest.param([(0, 2048)], id="prompt2048"),
    pytest.param([(1024, 1024), (2000, 48), (0, 1)], id="prefix-hits"),
    pytest.param([(rng_len, 1) for rng_len in range(100, 1700, 100)], id="decode16"),
    pytest.param([(0, 2048), (1500, 1), (17, 300), (512, 512)], id="mixed"),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_extend_attention_gpu_long(pairs, dtype):
    q, kv_cache, meta = make_batch(pairs, 16, 8, 4, 128, dtype, seed=3)
    scale = 128 ** -0.5
    out = run_kernel(q, kv_cache, meta, scale)
    ref = run_ref(q, kv_cache, meta, scale)
    atol, rtol = tolerances(dtype)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    backend = TorchAttentionBackend().attend(q, kv_cache, meta, scale)
    torch.testing.assert_close(out, backend, atol=atol, rtol=rtol)


@pytest.mark.gpu
def test_extend_attention_gpu_fp32():
    q, kv_cache, meta = make_batch(MIXED + [(300, 200)], 16, 2, 4, 64, torch.float32, seed=4)
    out = run_kernel(q, kv_cache, meta, 0.125)
    torch.testing.assert_close(out, run_ref(q, kv_cache, meta, 0.125), atol=1e-4, rtol=1e-4)
