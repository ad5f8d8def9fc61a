"""Fused Triton kernels (RMSNorm + residual add, rotary + q/k norm, SiLU-and-mul) vs their
torch references, and the layers / Llama model that choose between kernel and torch.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1,
set before the kernel modules are imported) on tiny float32/float16 shapes;
there the layers are also forced onto the kernel path to check the model's
wiring (in-place residual, strided q/k views) against the torch path. The
`gpu` tests run the compiled kernels over realistic shapes, in CUDA graphs,
and a tiny model with the kernels on and off.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

import paged_backend.kernels.activation as activation_mod  # noqa: E402
import paged_backend.kernels.rms_norm as rms_norm_mod  # noqa: E402
import paged_backend.kernels.rotary as rotary_mod  # noqa: E402
from paged_backend.kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from paged_backend.kernels.kv_write import write_kv_ref  # noqa: E402
from paged_backend.kernels.rms_norm import rms_norm, rms_norm_ref  # noqa: E402
from paged_backend.kernels.rotary import apply_rotary, apply_rotary_ref  # noqa: E402
from paged_backend.layers import fused_kernels  # noqa: E402
from paged_backend.layers.activation import SiluAndMul  # noqa: E402
from paged_backend.layers.attention import AttentionMetadata  # noqa: E402
from paged_backend.layers.norm import RMSNorm  # noqa: E402
from paged_backend.layers.rotary import RotaryEmbedding, compute_inv_freq  # noqa: E402

# The small CPU cases need the interpreter, which is only switched on without CUDA.
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter cases run on CPU")

CPU_TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
# (rtol, atol) of kernel vs reference on the GPU: both compute in float32 from the same
# inputs, so they differ by float32 noise plus one-ulp flips where a value is rounded.
# A flip costs at most 2^-7 (bf16) / 2^-10 (fp16) of the value; two stacked flips twice that.
GPU_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (3e-3, 2e-3), torch.bfloat16: (2e-2, 1e-2)}
# Rotary with a fused per-head norm rounds twice before rotating: flips of the normed inputs
# (|x| up to ~7, 1-2 ulps) can meet cancellation in x1*cos - x2*sin, so the absolute slack is
# a few input ulps; the relative Frobenius error (MEAN_TOL) keeps the bulk tight.
GPU_TOL_NORMED = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 1.6e-2),
                  torch.bfloat16: (2e-2, 1.25e-1)}
MEAN_TOL = {torch.float32: 1e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3}
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def close(actual: torch.Tensor, expected: torch.Tensor, tol) -> None:
    rtol, atol = (0.0, tol) if isinstance(tol, float) else tol
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.float(), expected.float()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def fused_qkv(num_tokens: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
              dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """(qkv, q, k, v): q/k/v strided `[T, H, D]` views of one `[T, (Hq + 2 Hkv) D]` tensor."""
    gen = torch.Generator().manual_seed(seed)
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, generator=gen).to(device=device, dtype=dtype)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    return (qkv, q.view(num_tokens, num_q_heads, head_dim),
            k.view(num_tokens, num_kv_heads, head_dim), v.view(num_tokens, num_kv_heads, head_dim))


def norm_weight(n: int, dtype: torch.dtype, device: str = "cpu", seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (1.0 + 0.1 * torch.randn(n, generator=gen)).to(device=device, dtype=dtype)


def check_rms_norm(num_rows, hidden, dtype, tol, device="cpu", row_pad=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(num_rows, hidden + row_pad, generator=gen).to(device=device, dtype=dtype)
    x = base[:, :hidden]  # row stride hidden + row_pad
    w = norm_weight(hidden, dtype, device)
    eps = 1e-6
    close(rms_norm(x, w, eps), rms_norm_ref(x, w, eps), tol)
    residual = torch.randn(num_rows, hidden, generator=gen).to(device=device, dtype=dtype)
    ref_out, ref_sum = rms_norm_ref(x, w, eps, residual)
    base_before = base.clone()
    out = rms_norm(x, w, eps, residual)
    close(out, ref_out, tol)
    assert torch.equal(residual, ref_sum)  # one rounding of x + residual, as torch adds
    assert torch.equal(base, base_before)


def check_rotary(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, tol, normed,
                 device="cpu", max_pos=5000, params=None, seed=0):
    qkv, q, k, v = fused_qkv(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    positions = torch.randint(0, max_pos, (num_tokens,), generator=gen)
    positions[0] = max_pos - 1
    positions = positions.to(device)
    inv_freq = compute_inv_freq(head_dim, params or {"rope_type": "default",
                                                     "rope_theta": 10000.0}).to(device)
    qw = norm_weight(head_dim, dtype, device, seed=2) if normed else None
    kw = norm_weight(head_dim, dtype, device, seed=3) if normed else None
    ref_q, ref_k = apply_rotary_ref(q, k, positions, inv_freq, qw, kw, eps=1e-6)
    v_before = v.clone()
    out_q, out_k = apply_rotary(q, k, positions, inv_freq, qw, kw, eps=1e-6)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
    close(q, ref_q, tol)
    close(k, ref_k, tol)
    assert rel_err(q, ref_q) < MEAN_TOL[dtype] and rel_err(k, ref_k) < MEAN_TOL[dtype]
    assert torch.equal(v, v_before)


def check_rotary_kv_write(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, tol, normed,
                          block_size, device="cpu", seed=0, slot_dtype=torch.int64):
    """Rotary with the KV write fused in: q/k as `apply_rotary_ref`, the cache as `write_kv_ref`
    of the reference k and v (padding slots -1 leave the cache untouched)."""
    qkv, q, k, v = fused_qkv(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    positions = torch.randint(0, 5000, (num_tokens,), generator=gen).to(device)
    inv_freq = compute_inv_freq(head_dim, LLAMA3).to(device)
    qw = norm_weight(head_dim, dtype, device, seed=2) if normed else None
    kw = norm_weight(head_dim, dtype, device, seed=3) if normed else None
    num_blocks = num_tokens // block_size + 3
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim,
                        generator=gen).to(device=device, dtype=dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::3] = -1  # padding rows
    slots = slots.to(device=device, dtype=slot_dtype)
    ref_q, ref_k = apply_rotary_ref(q, k, positions, inv_freq, qw, kw, eps=1e-6)
    ref_cache = cache.clone()
    write_kv_ref(ref_k, v, ref_cache, slots)
    v_before = v.clone()
    apply_rotary(q, k, positions, inv_freq, qw, kw, eps=1e-6, v=v, kv_cache=cache,
                 slot_mapping=slots)
    close(q, ref_q, tol)
    close(k, ref_k, tol)
    assert torch.equal(v, v_before)
    written = slots[slots >= 0]
    flat, ref_flat = cache.flatten(1, 2), ref_cache.flatten(1, 2)
    assert torch.equal(flat[1], ref_flat[1])  # v: a copy
    close(flat[0, written], ref_flat[0, written], tol)  # k: rotated
    untouched = torch.ones(flat.shape[1], dtype=torch.bool, device=device)
    untouched[written] = False
    assert torch.equal(flat[0, untouched], ref_flat[0, untouched])
    assert torch.equal(flat[0, written], k[slots >= 0])  # the cache holds exactly the rotated k


def check_silu_and_mul(num_tokens, inter, dtype, tol, device="cpu", row_pad=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = (2 * torch.randn(num_tokens, 2 * inter + row_pad, generator=gen)).to(device=device,
                                                                              dtype=dtype)
    x = base[:, : 2 * inter]
    close(silu_and_mul(x), silu_and_mul_ref(x), tol)


# ---------------------------------------------------------------- CPU (interpreter)


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_rows,hidden,row_pad", [(5, 100, 0), (3, 64, 16), (1, 257, 3)])
def test_rms_norm_interpreter(num_rows, hidden, row_pad, dtype):
    check_rms_norm(num_rows, hidden, dtype, CPU_TOL[dtype], row_pad=row_pad, seed=hidden)


@cpu_only
def test_rms_norm_interpreter_empty():
    x = torch.randn(0, 32)
    assert rms_norm(x, torch.ones(32), 1e-6).shape == (0, 32)
    assert rms_norm(x, torch.ones(32), 1e-6, torch.randn(0, 32)).shape == (0, 32)


@cpu_only
@pytest.mark.parametrize("normed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(7, 4, 2, 16), (3, 6, 1, 12), (2, 40, 8, 128)])
def test_rotary_interpreter(shape, dtype, normed):
    # (T, Hq, Hkv, D): D/2 = 6 is not a power of two; 40 x 128 loops over head blocks.
    check_rotary(*shape, dtype, CPU_TOL[dtype], normed, seed=shape[1])


@cpu_only
@pytest.mark.parametrize("normed", [False, True])
@pytest.mark.parametrize("shape,block_size,slot_dtype", [
    ((7, 4, 2, 16), 4, torch.int64), ((5, 6, 3, 12), 1, torch.int32),
    ((4, 6, 3, 20), 3, torch.int64),  # D/2 = 10: masked half-tiles
    ((3, 40, 40, 128), 16, torch.int32),  # 40 heads of 128: two head tiles
])
def test_rotary_kv_write_interpreter(shape, block_size, slot_dtype, normed):
    check_rotary_kv_write(*shape, torch.float32, CPU_TOL[torch.float32], normed, block_size,
                          seed=shape[0], slot_dtype=slot_dtype)


@cpu_only
def test_rotary_interpreter_llama3_int32_positions_and_empty():
    qkv, q, k, v = fused_qkv(4, 2, 2, 32, torch.float32)
    inv_freq = compute_inv_freq(32, LLAMA3)
    positions = torch.tensor([0, 1, 4095, 8191], dtype=torch.int32)
    ref_q, ref_k = apply_rotary_ref(q, k, positions, inv_freq)
    apply_rotary(q, k, positions, inv_freq)
    close(q, ref_q, 1e-5)
    close(k, ref_k, 1e-5)
    apply_rotary(q[:0], k[:0], positions[:0], inv_freq)  # no launch


@cpu_only
@pytest.mark.parametrize("normed", [False, True])
def test_rotary_ref_matches_torch_layer_path(normed):
    """The reference's float32 math is the model's (HF's) rotary path in float32."""
    _, q, k, _ = fused_qkv(9, 4, 2, 16, torch.float32)
    rope = RotaryEmbedding(16, {"rope_type": "default", "rope_theta": 10000.0})
    positions = torch.arange(100, 109)
    q_norm = k_norm = None
    if normed:
        q_norm, k_norm = RMSNorm(16), RMSNorm(16)
        with torch.no_grad():
            q_norm.weight.copy_(norm_weight(16, torch.float32, seed=2))
            k_norm.weight.copy_(norm_weight(16, torch.float32, seed=3))
    with torch.no_grad():
        ours_q, ours_k = rope.rotate(positions, q, k, q_norm, k_norm)
    ref_q, ref_k = apply_rotary_ref(q, k, positions, rope.inv_freq,
                                    q_norm.weight if normed else None,
                                    k_norm.weight if normed else None, eps=1e-6)
    close(ours_q, ref_q, 1e-5)
    close(ours_k, ref_k, 1e-5)


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_tokens,inter,row_pad", [(3, 300, 0), (2, 1500, 8), (1, 16, 0)])
def test_silu_and_mul_interpreter(num_tokens, inter, row_pad, dtype):
    check_silu_and_mul(num_tokens, inter, dtype, CPU_TOL[dtype], row_pad=row_pad, seed=inter)


@cpu_only
def test_silu_and_mul_interpreter_empty():
    assert silu_and_mul(torch.randn(0, 8)).shape == (0, 4)


@pytest.fixture
def force_kernels(monkeypatch):
    """Route the layers to the Triton kernels for CPU tensors (run by the interpreter)."""
    monkeypatch.setattr(fused_kernels, "use_fused_kernels", lambda x: True)


@cpu_only
def test_layers_kernel_path_interpreter(force_kernels):
    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(norm_weight(48, torch.float32))
    x, residual = torch.randn(5, 48), torch.randn(5, 48)
    residual_before = residual.clone()
    with torch.no_grad():
        out, new_residual = norm(x, residual)
        ref_out, ref_sum = rms_norm_ref(x, norm.weight, 1e-5, residual_before)
        assert new_residual is residual  # updated in place on the kernel path
        close(out, ref_out, 1e-5)
        assert torch.equal(residual, ref_sum)
        close(norm(x), rms_norm_ref(x, norm.weight, 1e-5), 1e-5)
        x3 = torch.randn(2, 3, 48)  # leading dims are flattened
        close(norm(x3), rms_norm_ref(x3, norm.weight, 1e-5), 1e-5)
        gate_up = torch.randn(4, 2 * 40)
        close(SiluAndMul()(gate_up), silu_and_mul_ref(gate_up), 1e-5)


@cpu_only
def test_layers_torch_path_unchanged():
    """Off CUDA (no forcing) the layers run plain torch and never mutate their inputs."""
    norm = RMSNorm(32)
    x, residual = torch.randn(3, 32), torch.randn(3, 32)
    residual_before = residual.clone()
    with torch.no_grad():
        out, s = norm(x, residual)
    assert torch.equal(residual, residual_before)
    assert torch.equal(s, x + residual_before)
    assert torch.equal(out, norm(s))
    gate_up = torch.randn(4, 16)
    assert torch.equal(SiluAndMul()(gate_up),
                       torch.nn.functional.silu(gate_up[:, :8]) * gate_up[:, 8:])


def one_seq_meta(num_cached: int, num_new: int, block_size: int, device: str) -> AttentionMetadata:
    """Metadata of one sequence whose blocks are 0, 1, 2, ... in order."""
    total = num_cached + num_new
    num_blocks = -(-total // block_size)
    return AttentionMetadata(
        num_tokens=num_new,
        query_start_loc=torch.tensor([0, num_new], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([total], dtype=torch.int32, device=device),
        slot_mapping=torch.arange(num_cached, total, dtype=torch.int64, device=device),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None],
        max_query_len=num_new, max_seq_len=total, block_size=block_size,
        query_start_loc_cpu=[0, num_new], seq_lens_cpu=[total])


def run_model(model, cfg, tokens: list[int], num_decode: int, device: str, dtype: torch.dtype,
              block_size: int = 4) -> list[torch.Tensor]:
    """Logits of a prefill of `tokens`, then of `num_decode` decode steps of fixed tokens."""
    from paged_backend.models.registry import kv_cache_shape_info

    layers, kv_heads, head_dim = kv_cache_shape_info(cfg)
    num_blocks = -(-(len(tokens) + num_decode) // block_size)
    kv_caches = [torch.zeros(2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype,
                             device=device) for _ in range(layers)]
    steps = [tokens] + [[(7 * i + 3) % 500] for i in range(num_decode)]
    logits, cached = [], 0
    with torch.no_grad():
        for step in steps:
            meta = one_seq_meta(cached, len(step), block_size, device)
            ids = torch.tensor(step, device=device)
            positions = torch.arange(cached, cached + len(step), device=device)
            hidden = model(ids, positions, kv_caches, meta)
            logits.append(model.compute_logits(hidden).cpu())
            cached += len(step)
    return logits


def counting(fn, name: str, calls: dict):
    def wrapper(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)
    return wrapper


@cpu_only
@pytest.mark.parametrize("arch", ["llama3_rope", "qwen3", "smollm2"])
def test_model_kernel_path_interpreter(arch, tmp_path, monkeypatch):
    """The Llama model on the kernel path (interpreted) gives the torch path's logits."""
    from paged_backend.models.loader import load_hf_config, load_model, resolve_model
    from tiny_models import make_tiny_checkpoint

    make_tiny_checkpoint(arch, str(tmp_path))
    src = resolve_model(str(tmp_path))
    cfg = load_hf_config(src)
    model = load_model(src, cfg, torch.float32, "cpu")
    tokens = [5, 17, 99, 3, 250, 41, 7]
    expected = run_model(model, cfg, tokens, 2, "cpu", torch.float32)
    monkeypatch.setattr(fused_kernels, "use_fused_kernels", lambda x: True)
    monkeypatch.setenv(fused_kernels.SKINNY_GEMM_ENV, "0")  # the one-token path is tested apart
    calls = {"rms_norm": 0, "apply_rotary": 0, "silu_and_mul": 0}
    for module in (rms_norm_mod, rotary_mod, activation_mod):
        for name in calls:
            if hasattr(module, name):
                monkeypatch.setattr(module, name, counting(getattr(module, name), name, calls))
    real_rotary = rotary_mod.apply_rotary
    fused_writes = []

    def rotary_spy(*args, **kwargs):
        fused_writes.append(kwargs.get("kv_cache") is not None)
        return real_rotary(*args, **kwargs)
    monkeypatch.setattr(rotary_mod, "apply_rotary", rotary_spy)
    got = run_model(model, cfg, tokens, 2, "cpu", torch.float32)
    assert fused_writes and all(fused_writes)  # every layer wrote K/V from the rotary kernel
    n_layers, steps = cfg.num_hidden_layers, 3
    # Per layer and step: two norms, one rotary, one SiLU-and-mul; plus the final norm.
    assert calls == {"rms_norm": steps * (2 * n_layers + 1), "apply_rotary": steps * n_layers,
                     "silu_and_mul": steps * n_layers}
    for g, e in zip(got, expected, strict=True):
        close(g, e, 1e-4)


@cpu_only
@pytest.mark.parametrize("arch", ["qwen3", "smollm2", "llama3_rope"])
def test_model_triton_decode_fuses_rotary_interpreter(arch, tmp_path, monkeypatch):
    """With the Triton backend, decode steps rotate and cache the new token inside the decode
    kernel (no rotary launch); prefill keeps the rotary kernel; logits equal the torch path's.
    The decode calls run 3 splits of 16-token tiles over a 30-token prompt, so the new token
    is cached by a split other than the first."""
    import paged_backend.kernels.decode_attention as decode_mod
    from paged_backend.layers.triton_attention import TritonAttentionBackend
    from paged_backend.models.loader import load_hf_config, load_model, resolve_model
    from tiny_models import make_tiny_checkpoint

    make_tiny_checkpoint(arch, str(tmp_path))
    src = resolve_model(str(tmp_path))
    cfg = load_hf_config(src)
    model = load_model(src, cfg, torch.float32, "cpu")
    tokens = [(13 * i + 5) % 400 for i in range(30)]
    expected = run_model(model, cfg, tokens, 3, "cpu", torch.float32)
    fused = load_model(src, cfg, torch.float32, "cpu", attn_backend=TritonAttentionBackend())
    fused.load_state_dict(model.state_dict())
    monkeypatch.setattr(fused_kernels, "use_fused_kernels", lambda x: True)
    monkeypatch.setenv(fused_kernels.SKINNY_GEMM_ENV, "0")
    calls = {"apply_rotary": 0}
    monkeypatch.setattr(rotary_mod, "apply_rotary",
                        counting(rotary_mod.apply_rotary, "apply_rotary", calls))
    new_kv_calls = []
    real_decode = decode_mod.decode_attention

    def decode_spy(*args, **kwargs):
        new_kv_calls.append(kwargs.get("new_kv") is not None)
        kwargs.update(num_splits=3, block_n=16)
        return real_decode(*args, **kwargs)
    monkeypatch.setattr(decode_mod, "decode_attention", decode_spy)
    backend = fused.model.layers[0].self_attn.attn_backend
    backend._decode = decode_spy
    got = run_model(fused, cfg, tokens, 3, "cpu", torch.float32)
    n_layers = cfg.num_hidden_layers
    assert calls["apply_rotary"] == n_layers  # the prefill step only
    assert new_kv_calls == [True] * (3 * n_layers)
    for g, e in zip(got, expected, strict=True):
        close(g, e, 1e-4)


# ---------------------------------------------------------------- GPU

GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
GPU_TOKENS = [1, 7, 256, 4096]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("num_rows", GPU_TOKENS)
@pytest.mark.parametrize("hidden", [1024, 4096, 5120])
def test_rms_norm_gpu(hidden, num_rows, dtype):
    check_rms_norm(num_rows, hidden, dtype, GPU_TOL[dtype], device="cuda",
                   row_pad=64 if num_rows % 2 else 0, seed=num_rows)


@pytest.mark.gpu
@pytest.mark.parametrize("normed", [False, True])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("num_tokens", GPU_TOKENS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", [(16, 8), (32, 8), (16, 16), (9, 3)])
def test_rotary_gpu(heads, head_dim, num_tokens, dtype, normed):
    tol = (GPU_TOL_NORMED if normed else GPU_TOL)[dtype]
    check_rotary(num_tokens, *heads, head_dim, dtype, tol, normed, device="cuda",
                 max_pos=100000, params=LLAMA3, seed=num_tokens + head_dim)


@pytest.mark.gpu
@pytest.mark.parametrize("normed", [False, True])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 7, 256])
@pytest.mark.parametrize("heads,head_dim", [((16, 8), 128), ((32, 8), 128), ((9, 3), 64)])
def test_rotary_kv_write_gpu(heads, head_dim, num_tokens, dtype, normed):
    tol = (GPU_TOL_NORMED if normed else GPU_TOL)[dtype]
    check_rotary_kv_write(num_tokens, *heads, head_dim, dtype, tol, normed, 16, device="cuda",
                          seed=num_tokens)


@pytest.mark.gpu
@pytest.mark.parametrize("theta", [10000.0, 1000000.0])
def test_rotary_gpu_default_rope_many_heads(theta):
    check_rotary(300, 64, 8, 128, torch.bfloat16, GPU_TOL[torch.bfloat16], False, device="cuda",
                 max_pos=100000, params={"rope_type": "default", "rope_theta": theta})


@pytest.mark.gpu
@pytest.mark.parametrize("normed", [False, True])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_rotate_kernel_vs_torch_layer_path_gpu(dtype, normed, monkeypatch):
    """The kernel path of `RotaryEmbedding.rotate` vs its torch path (HF's math, in dtype)."""
    _, q, k, _ = fused_qkv(512, 32, 8, 128, dtype, "cuda")
    positions = torch.randint(0, 100000, (512,), device="cuda")
    rope = RotaryEmbedding(128, LLAMA3).cuda()
    q_norm = k_norm = None
    if normed:
        q_norm, k_norm = RMSNorm(128).cuda().to(dtype), RMSNorm(128).cuda().to(dtype)
        with torch.no_grad():
            q_norm.weight.copy_(norm_weight(128, dtype, "cuda", seed=2))
            k_norm.weight.copy_(norm_weight(128, dtype, "cuda", seed=3))
    with torch.no_grad():
        monkeypatch.setenv(fused_kernels.FUSED_KERNELS_ENV, "0")
        want_q, want_k = rope.rotate(positions, q, k, q_norm, k_norm)  # new tensors
        monkeypatch.delenv(fused_kernels.FUSED_KERNELS_ENV)
        got_q, got_k = rope.rotate(positions, q, k, q_norm, k_norm)  # q, k in place
    assert got_q.data_ptr() == q.data_ptr()
    bound = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[dtype]
    assert rel_err(got_q, want_q) < bound
    assert rel_err(got_k, want_k) < bound


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("num_tokens", GPU_TOKENS)
@pytest.mark.parametrize("inter", [2816, 3072, 14336])
def test_silu_and_mul_gpu(inter, num_tokens, dtype):
    tol = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 1e-3),
           torch.bfloat16: (1.6e-2, 1e-3)}[dtype]
    check_silu_and_mul(num_tokens, inter, dtype, tol, device="cuda",
                       row_pad=32 if num_tokens == 7 else 0, seed=num_tokens)


@pytest.mark.gpu
def test_fused_layers_cuda_graph():
    """Norm + residual, rotary with q/k norm and SiLU-and-mul captured once, replayed on new inputs."""
    dtype, t, hidden, hq, hkv, d, inter = torch.bfloat16, 8, 1024, 16, 8, 64, 2816
    norm = RMSNorm(hidden).cuda().to(dtype)
    q_norm, k_norm = RMSNorm(d).cuda().to(dtype), RMSNorm(d).cuda().to(dtype)
    with torch.no_grad():
        for mod, seed in ((norm, 1), (q_norm, 2), (k_norm, 3)):
            mod.weight.copy_(norm_weight(mod.weight.shape[0], dtype, "cuda", seed=seed))
    rope = RotaryEmbedding(d, LLAMA3).cuda()
    act = SiluAndMul()
    x = torch.randn(t, hidden, device="cuda", dtype=dtype)
    residual = torch.randn(t, hidden, device="cuda", dtype=dtype)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device="cuda", dtype=dtype)
    positions = torch.arange(t, device="cuda")
    gate_up = torch.randn(t, 2 * inter, device="cuda", dtype=dtype)

    def step():
        out, _ = norm(x, residual)
        q = qkv[:, : hq * d].view(t, hq, d)
        k = qkv[:, hq * d: (hq + hkv) * d].view(t, hkv, d)
        rope.rotate(positions, q, k, q_norm, k_norm)
        return out, act(gate_up)

    with torch.no_grad():
        step()  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, act_out = step()
        x.copy_(torch.randn_like(x))
        residual.copy_(torch.randn_like(residual))
        qkv.copy_(torch.randn_like(qkv))
        positions.copy_(torch.randint(0, 100000, (t,), device="cuda"))
        gate_up.copy_(torch.randn_like(gate_up))
        residual_in, qkv_in = residual.clone(), qkv.clone()
        graph.replay()
        torch.cuda.synchronize()
    ref_out, ref_sum = rms_norm_ref(x, norm.weight, norm.eps, residual_in)
    close(out, ref_out, GPU_TOL[dtype])
    assert torch.equal(residual, ref_sum)
    q_in = qkv_in[:, : hq * d].view(t, hq, d)
    k_in = qkv_in[:, hq * d: (hq + hkv) * d].view(t, hkv, d)
    ref_q, ref_k = apply_rotary_ref(q_in, k_in, positions, rope.inv_freq, q_norm.weight,
                                    k_norm.weight, eps=q_norm.eps)
    close(qkv[:, : hq * d].view(t, hq, d), ref_q, GPU_TOL_NORMED[dtype])
    close(qkv[:, hq * d: (hq + hkv) * d].view(t, hkv, d), ref_k, GPU_TOL_NORMED[dtype])
    assert torch.equal(qkv[:, (hq + hkv) * d:], qkv_in[:, (hq + hkv) * d:])
    close(act_out, silu_and_mul_ref(gate_up), GPU_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama3_rope", "qwen3", "qwen2"])
def test_model_fused_kernels_on_off_gpu(arch, dtype, tmp_path, monkeypatch):
    """A tiny model on CUDA (Triton attention) gives the same logits with the fused kernels
    on and off (PAGED_BACKEND_FUSED_KERNELS=0), and in float32 the CPU torch path's."""
    from paged_backend.layers.triton_attention import TritonAttentionBackend
    from paged_backend.models.loader import load_hf_config, load_model, resolve_model
    from tiny_models import make_tiny_checkpoint

    make_tiny_checkpoint(arch, str(tmp_path))
    src = resolve_model(str(tmp_path))
    cfg = load_hf_config(src)
    model = load_model(src, cfg, dtype, "cuda", attn_backend=TritonAttentionBackend())
    tokens = [5, 17, 99, 3, 250, 41, 7, 300, 12]
    fused = run_model(model, cfg, tokens, 3, "cuda", dtype, block_size=16)
    monkeypatch.setenv(fused_kernels.FUSED_KERNELS_ENV, "0")
    unfused = run_model(model, cfg, tokens, 3, "cuda", dtype, block_size=16)
    for f, u in zip(fused, unfused, strict=True):
        if dtype == torch.float32:
            close(f, u, 1e-4)
        else:
            # Measured on the CPU with the references standing in for the kernels: ~1.2%.
            assert rel_err(f, u) < 5e-2
    if dtype == torch.float32:
        cpu_model = load_model(src, cfg, torch.float32, "cpu")
        monkeypatch.delenv(fused_kernels.FUSED_KERNELS_ENV)
        cpu = run_model(cpu_model, cfg, tokens, 3, "cpu", torch.float32, block_size=16)
        for f, c in zip(fused, cpu, strict=True):
            close(f, c, 1e-3)
