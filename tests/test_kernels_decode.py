"""Triton KV-write and paged decode-attention kernels vs their torch references.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1,
set before the kernel modules are imported) on tiny float32/float16 shapes;
the `gpu` tests run the compiled kernels over realistic shapes.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from paged_backend.kernels.decode_attention import (  # noqa: E402
    DecodeNewKV, choose_num_splits, decode_attention, decode_attention_ref)
from paged_backend.kernels.kv_write import write_kv, write_kv_ref  # noqa: E402
from paged_backend.kernels.rotary import apply_rotary, apply_rotary_ref  # noqa: E402

# The small CPU cases need the interpreter, which is only switched on without CUDA.
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter cases run on CPU")

CPU_TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
GPU_TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2}


def make_case(seq_lens, num_kv_heads, group, head_dim, block_size, dtype, device="cpu",
              seed=0, extra_blocks=3):
    """Random q, a NaN-poisoned paged cache holding each sequence's context in shuffled blocks."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(seq_lens)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + extra_blocks
    max_blocks = max(1, max(blocks_per_seq))
    perm = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.zeros(batch, max_blocks, dtype=torch.int32)  # padded with 0, as the runner does
    kv_cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    used = 0
    for b, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq)):
        blocks = perm[used:used + nb]
        used += nb
        block_tables[b, :nb] = blocks.int()
        pos = torch.arange(n)
        kv_cache[:, blocks[pos // block_size], pos % block_size] = torch.randn(
            2, n, num_kv_heads, head_dim, generator=gen)
    q = torch.randn(batch, num_kv_heads * group, head_dim, generator=gen)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    return (q.to(device=device, dtype=dtype), kv_cache.to(device=device, dtype=dtype),
            block_tables.to(device), seq_lens_t.to(device))


def check_decode(seq_lens, num_kv_heads, group, head_dim, block_size, dtype, splits, atol,
                 device="cpu", block_n=None, seed=0):
    q, kv_cache, block_tables, seq_lens_t = make_case(
        seq_lens, num_kv_heads, group, head_dim, block_size, dtype, device, seed)
    scale = head_dim ** -0.5
    ref = decode_attention_ref(q, kv_cache, block_tables, seq_lens_t, scale)
    assert torch.isfinite(ref.float()).all()
    for s in splits:
        out = decode_attention(q, kv_cache, block_tables, seq_lens_t, scale, num_splits=s,
                               block_n=block_n)
        assert out.dtype == q.dtype and out.shape == q.shape
        err = (out.float() - ref.float()).abs().max().item()
        assert err <= atol, f"num_splits={s}: max abs err {err}"


def check_decode_new_kv(seq_lens, num_kv_heads, group, head_dim, block_size, dtype, splits,
                        atol, normed, device="cpu", block_n=None, seed=0, theta=10000.0,
                        slot_overrides=None, attend=None, scale=None):
    """`new_kv`: the kernel rotates q/k and caches the new token; oracle = rotary ref, KV-write
    ref, then the decode ref. Checks the output and the whole cache (no stray writes).

    The new token's slot is NaN-poisoned first, so a store that is missing, or lands after
    the owning program's tile loads, shows up in the output. `slot_overrides` {row: slot}
    replaces a row's slot (-1: a live row that must not be stored, as in the runner's
    warm-up; a valid slot on a seq_len-0 padding row must not be stored either). `attend`
    `(q, cache, block_tables, seq_lens, scale, new_kv)` replaces `decode_attention` (another
    kernel under the same oracle; `splits` is then ignored past its length). A `scale`
    well above `head_dim ** -0.5` makes the softmax nearly an argmax, so a wrong or stale
    K/V row anywhere in a long context changes the output by O(1). On the
    CPU the result must also equal, bit for bit, the two-kernel path (`apply_rotary` with
    its KV write, then `decode_attention` of the rotated q) in float16 (both round at the
    same points), and match it to 1e-6 in float32 (where the sums of squares and FMAs may
    round differently). The interpreter's bfloat16 is not usable (the plain decode kernel
    fails there too); the GPU tests cover it.
    """
    _, kv_cache, block_tables, seq_lens_t = make_case(
        seq_lens, num_kv_heads, group, head_dim, block_size, dtype, device, seed)
    batch, hq = len(seq_lens), num_kv_heads * group
    gen = torch.Generator().manual_seed(seed + 1)
    # q, k, v as strided views of one fused projection, as the model passes them.
    qkv = torch.randn(batch, hq + 2 * num_kv_heads, head_dim, generator=gen)
    qkv = qkv.to(device=device, dtype=dtype)
    q, k, v = qkv.split([hq, num_kv_heads, num_kv_heads], dim=1)
    positions = (seq_lens_t.long() - 1).clamp(min=0) + 0  # the new token's position
    slot_list = [int(block_tables[b, (n - 1) // block_size]) * block_size + (n - 1) % block_size
                 if n > 0 else -1 for b, n in enumerate(seq_lens)]
    for b, slot in (slot_overrides or {}).items():
        slot_list[b] = slot
    for b, (n, slot) in enumerate(zip(seq_lens, slot_list)):
        if n > 0 and slot >= 0:
            kv_cache[:, slot // block_size, slot % block_size] = float("nan")
    slots = torch.tensor(slot_list, device=device)
    # What must be stored: live rows with a slot.
    ref_slots = torch.tensor([sl if n > 0 else -1 for n, sl in zip(seq_lens, slot_list)],
                             device=device)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    qw = kw = None
    if normed:
        qw = (torch.rand(head_dim, generator=gen) + 0.5).to(device=device, dtype=dtype)
        kw = (torch.rand(head_dim, generator=gen) + 0.5).to(device=device, dtype=dtype)
        if normed == "q":  # q_norm only
            kw = None
    q_rot, k_rot = apply_rotary_ref(q, k, positions, inv_freq, qw, kw, eps=1e-6)
    kv_ref = kv_cache.clone()
    write_kv_ref(k_rot, v, kv_ref, ref_slots)
    scale = head_dim ** -0.5 if scale is None else scale
    ref = decode_attention_ref(q_rot, kv_ref, block_tables, seq_lens_t, scale)
    assert torch.isfinite(ref.float()).all()
    q_before = q.clone()
    two_kernel_tol = None if device != "cpu" else (1e-6 if dtype == torch.float32 else 0.0)
    for s in splits:
        cache = kv_cache.clone()
        new_kv = DecodeNewKV(k, v, positions, slots, inv_freq, qw, kw, 1e-6)
        if attend is not None:
            out = attend(q, cache, block_tables, seq_lens_t, scale, new_kv)
        else:
            out = decode_attention(q, cache, block_tables, seq_lens_t, scale, num_splits=s,
                                   block_n=block_n, new_kv=new_kv)
        err = (out.float() - ref.float()).abs().max().item()
        assert err <= atol, f"num_splits={s}: max abs err {err}"
        # The cache equals the reference's (NaN poison untouched elsewhere), up to the
        # float32 rounding of cos/sin (which may flip a 16-bit rounding: one ulp).
        torch.testing.assert_close(cache, kv_ref, atol=atol,
                                   rtol=0 if dtype == torch.float32 else 1e-2, equal_nan=True)
        assert torch.equal(q, q_before)  # q is read, never rotated in place
        if two_kernel_tol is not None and attend is None:
            cache2 = kv_cache.clone()
            q2, k2 = q.clone(), k.clone()
            apply_rotary(q2, k2, positions, inv_freq, qw, kw, eps=1e-6, v=v, kv_cache=cache2,
                         slot_mapping=ref_slots)
            out2 = decode_attention(q2, cache2, block_tables, seq_lens_t, scale, num_splits=s,
                                    block_n=block_n)
            torch.testing.assert_close(cache, cache2, atol=two_kernel_tol, rtol=0,
                                       equal_nan=True)
            torch.testing.assert_close(out, out2, atol=two_kernel_tol, rtol=0)


# ---------------------------------------------------------------- CPU (interpreter)


@cpu_only
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_interpreter(block_size, group, dtype):
    head_dim = 16 if group != 2 else 32
    num_kv_heads = 2 if group < 4 else 1
    seq_lens = {1: [70, 1, 33], 4: [17], 16: [5, 64]}[block_size]
    check_decode(seq_lens, num_kv_heads, group, head_dim, block_size, dtype,
                 splits=[1, 3, None], atol=CPU_TOL[dtype], block_n=16, seed=block_size * 7 + group)


@cpu_only
def test_decode_interpreter_short_contexts_many_splits():
    # More splits than tiles (empty splits), contexts of 1, exactly one tile, one past it.
    check_decode([1, 16, 17], 1, 2, 16, 4, torch.float32, splits=[2, 8], atol=1e-5, block_n=16)


@cpu_only
def test_decode_interpreter_default_tile_and_auto_splits():
    check_decode([40, 3], 2, 2, 16, 8, torch.float32, splits=[None], atol=1e-5)  # block_n 64


@cpu_only
def test_decode_interpreter_block_size_not_power_of_two():
    check_decode([23, 9], 1, 2, 16, 6, torch.float32, splits=[1, 2], atol=1e-5, block_n=16)


@cpu_only
def test_decode_interpreter_strided_q_out_and_empty_sequence():
    q, kv_cache, block_tables, seq_lens = make_case([9, 20], 1, 2, 16, 4, torch.float32)
    seq_lens[1] = 0  # a padding sequence: zero output, no NaN
    qkv = torch.randn(2, 3, 2, 16)
    qkv[:, 0] = q
    q_view = qkv[:, 0]  # non-contiguous [B, Hq, D] view
    ref = decode_attention_ref(q, kv_cache, block_tables, seq_lens, 0.3)
    for s in (1, 2):
        out_buf = torch.full((2, 2, 4, 16), 7.0)
        out = out_buf[:, :, 1]
        res = decode_attention(q_view, kv_cache, block_tables, seq_lens, 0.3, out=out,
                               num_splits=s, block_n=16)
        assert res.data_ptr() == out.data_ptr()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        assert (out[1] == 0).all()
        assert (out_buf[:, :, 0] == 7.0).all() and (out_buf[:, :, 2:] == 7.0).all()


@cpu_only
@pytest.mark.parametrize("normed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_new_kv_interpreter(dtype, normed):
    # A new token opening a block, one mid-tile, one at the first position, one padding row,
    # one in the third of four tiles; splits 1 (one program caches), 3 (the new token of the
    # 50-token row in split 1 or 2) and more splits than tiles.
    check_decode_new_kv([9, 20, 1, 0, 50], 2, 2, 16, 4, dtype, splits=[1, 3, 8],
                        atol=CPU_TOL[dtype] * 4, normed=normed, block_n=16, seed=3)


@cpu_only
def test_decode_new_kv_interpreter_guards():
    """No store for a live row without a slot (the runner's warm-up) nor for a padding row
    that carries a slot; the other rows are stored as usual."""
    check_decode_new_kv([9, 20, 0, 33], 2, 2, 16, 4, torch.float32, splits=[1, 3],
                        atol=4e-5, normed=True, block_n=16, seed=5,
                        slot_overrides={1: -1, 2: 1})


@cpu_only
def test_decode_new_kv_interpreter_odd_block_size_and_group():
    check_decode_new_kv([23, 33], 1, 4, 32, 6, torch.float32, splits=[1, 2, None],
                        atol=4e-5, normed=True, block_n=16, seed=4)


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_kv_interpreter(dtype):
    num_blocks, block_size, num_kv_heads, head_dim = 5, 4, 3, 8
    sentinel = -123.0
    kv_cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), sentinel, dtype=dtype)
    kv_ref = kv_cache.clone()
    fused = torch.randn(6, 3 * num_kv_heads * head_dim)  # k, v as strided views, in float32
    k = fused[:, : num_kv_heads * head_dim].view(6, num_kv_heads, head_dim)
    v = fused[:, num_kv_heads * head_dim: 2 * num_kv_heads * head_dim].view(6, num_kv_heads, head_dim)
    slots = torch.tensor([13, -1, 0, 19, -1, 6, 99], dtype=torch.int64)  # longer than T: ignored tail
    write_kv(k, v, kv_cache, slots)
    write_kv_ref(k, v, kv_ref, slots)
    assert torch.equal(kv_cache, kv_ref)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[[13, 0, 19, 6]] = True
    flat = kv_cache.view(2, num_blocks * block_size, -1)
    assert (flat[:, ~written] == sentinel).all()
    assert torch.equal(flat[0, 19].view(num_kv_heads, head_dim), k[3].to(dtype))
    write_kv(k[:0], v[:0], kv_cache, slots[:0])  # empty batch: no launch


def test_choose_num_splits():
    assert choose_num_splits(256, 8, 4096) == 1
    assert choose_num_splits(1, 8, 4096) == 16  # 8 programs: capped at 16 splits
    assert choose_num_splits(4, 8, 4096) == 9
    assert choose_num_splits(1, 8, 100) == 2  # capped by the tiles of the longest sequence
    assert choose_num_splits(1, 1, 1) == 1


# ---------------------------------------------------------------- GPU

GPU_BATCHES = {
    "single_long": [4096],
    "mixed": [1, 17, 1000, 4095, 64],
    "b64": None,   # random 1..2048
    "b256": None,  # random 1..512
}


def _gpu_lens(name, seed):
    gen = torch.Generator().manual_seed(seed)
    if name == "b64":
        return torch.randint(1, 2049, (64,), generator=gen).tolist()
    if name == "b256":
        return torch.randint(1, 513, (256,), generator=gen).tolist()
    return GPU_BATCHES[name]


@pytest.mark.gpu
@pytest.mark.parametrize("batch", list(GPU_BATCHES))
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_gpu(dtype, head_dim, group, block_size, batch):
    num_kv_heads = 2 if group == 8 else 4
    seq_lens = _gpu_lens(batch, seed=head_dim + group + block_size)
    check_decode(seq_lens, num_kv_heads, group, head_dim, block_size, dtype,
                 splits=[None, 1, 5, 16], atol=GPU_TOL[dtype], device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("batch", ["mixed", "b64"])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("normed", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_new_kv_gpu(dtype, normed, head_dim, group, block_size, batch):
    num_kv_heads = 2 if group == 8 else 4
    seq_lens = _gpu_lens(batch, seed=head_dim + group + block_size) + [0]  # a padding row
    check_decode_new_kv(seq_lens, num_kv_heads, group, head_dim, block_size, dtype,
                        splits=[None, 1, 5, 16], atol=GPU_TOL[dtype], normed=normed,
                        device="cuda", theta=500000.0)


@pytest.mark.gpu
def test_decode_new_kv_gpu_float32():
    check_decode_new_kv([1, 77, 1500], 2, 4, 128, 16, torch.float32, splits=[1, 6], atol=1e-4,
                        normed=True, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("block_n", [16, 32, 128])
def test_decode_gpu_tile_sizes(block_n):
    check_decode([1, 31, 300, 2049], 2, 4, 128, 16, torch.bfloat16, splits=[1, 4],
                 atol=2e-2, device="cuda", block_n=block_n)


@pytest.mark.gpu
def test_decode_gpu_float32():
    check_decode([1, 77, 1500], 2, 4, 64, 16, torch.float32, splits=[1, 6], atol=1e-4,
                 device="cuda")


@pytest.mark.gpu
def test_write_kv_gpu():
    num_blocks, block_size, num_kv_heads, head_dim, t = 64, 16, 8, 128, 100
    kv_cache = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim,
                           dtype=torch.bfloat16, device="cuda")
    kv_ref = kv_cache.clone()
    k = torch.randn(t, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(t, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:t]
    slots[::7] = -1
    write_kv(k, v, kv_cache, slots)
    write_kv_ref(k, v, kv_ref, slots)
    assert torch.equal(kv_cache, kv_ref)


@pytest.mark.gpu
def test_decode_gpu_cuda_graph():
    """Captured once with a fixed num_splits, replayed after the lengths change."""
    q, kv_cache, block_tables, seq_lens = make_case([300, 2000, 5], 2, 4, 128, 16,
                                                    torch.bfloat16, device="cuda")
    scale = 128 ** -0.5
    out = torch.empty_like(q)
    splits = choose_num_splits(3, 2, 4096)
    decode_attention(q, kv_cache, block_tables, seq_lens, scale, out=out, num_splits=splits)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(q, kv_cache, block_tables, seq_lens, scale, out=out, num_splits=splits)
    seq_lens.copy_(torch.tensor([299, 1, 5], dtype=torch.int32))
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    ref = decode_attention_ref(q, kv_cache, block_tables, seq_lens, scale)
    assert (out.float() - ref.float()).abs().max().item() <= 2e-2
