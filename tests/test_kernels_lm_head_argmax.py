"""The greedy LM-head kernel (`lm_head_argmax`) against `(x @ W.T).to(dtype).argmax(-1)`.

CUDA C++ compiled at run time: the `gpu` tests need a Hopper-or-newer GPU. They check
the token on the Qwen3-0.6B LM-head shape and ragged ones, ties (the lower index wins, as
in torch), repeated calls and CUDA-graph replays on one workspace (the ticket counter is
reset by each call), and the model's `greedy_tokens`. On CPU the support check is.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # see test_kernels_stream_gemv.py

from paged_backend.kernels.lm_head_argmax import (  # noqa: E402
    lm_head_argmax,
    lm_head_argmax_supported,
    new_workspace,
)
from test_kernels_stream_gemv import hopper, needs_hopper  # noqa: E402


def reference(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = (x.float() @ w.float().T).to(x.dtype)
    return logits.argmax(dim=-1), logits


def check_token(token: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """The kernel's token is the reference's, or (its logit rounded the other way at a
    near-tie) one whose logit is within one rounding step of the maximum."""
    ref, logits = reference(x, w)
    assert token.dtype == torch.int64 and token.shape == (1,)
    if token.item() != ref.item():
        top = logits[0].float()
        step = top.max().abs().item() * (2 ** -7 if x.dtype == torch.bfloat16 else 2 ** -10)
        assert top[token.item()] >= top.max() - step, (token.item(), ref.item())


def make(n: int, k: int, dtype=torch.bfloat16, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(1, k, generator=gen, device="cuda").to(dtype)
    w = (torch.randn(n, k, generator=gen, device="cuda") / k ** 0.5).to(dtype)
    return x, w


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n,k", [(151936, 1024), (32000, 4096), (4000, 8192), (3000, 5128),
                                 (1000, 264), (133, 8)])
def test_lm_head_argmax_matches_torch(n, k, dtype):
    ws = new_workspace(torch.device("cuda"))
    for seed in range(3):
        x, w = make(n, k, dtype, seed)
        assert lm_head_argmax_supported(x, w)
        check_token(lm_head_argmax(x, w, ws), x, w)
    exact = sum(lm_head_argmax(*make(n, k, dtype, s), ws).item()
                == reference(*make(n, k, dtype, s))[0].item() for s in range(3, 13))
    assert exact >= 9  # near-ties that round the other way are rare


@pytest.mark.gpu
@needs_hopper
def test_lm_head_argmax_ties_take_the_lower_index():
    x, w = make(5000, 256)
    # Two equal maxima far apart (different programs) and two in one program.
    for lo, hi in ((17, 4900), (2500, 2501)):
        w2 = w.clone()
        w2[lo] = w2[hi] = 4 * x[0] / x[0].float().norm().to(x.dtype)
        token = lm_head_argmax(x, w2)
        assert token.item() == lo == reference(x, w2)[0].item()


@pytest.mark.gpu
@needs_hopper
def test_lm_head_argmax_ties_across_programs_and_nan():
    """Equal maxima on both sides of a program boundary take the lower index; NaN logits rank
    first and the first NaN wins, all -inf gives 0: torch.argmax's order."""
    x, w = make(1000, 64)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    edge = 1000 // sms  # the first row of the second program (rows split as g * n / G)
    w2 = w.clone()
    w2[edge - 1] = w2[edge] = 4 * x[0] / x[0].float().norm().to(x.dtype)
    assert lm_head_argmax(x, w2).item() == edge - 1 == reference(x, w2)[0].item()
    w3 = w.clone()
    w3[700, 0] = float("nan")
    w3[300, 0] = float("nan")
    assert lm_head_argmax(x, w3).item() == 300 == reference(x, w3)[0].item()
    w4 = torch.full_like(w, float("nan"))
    assert lm_head_argmax(x, w4).item() == 0 == reference(x, w4)[0].item()
    x5 = torch.full_like(x, -1.0)
    w5 = torch.full_like(w, float("inf"))
    assert lm_head_argmax(x5, w5).item() == 0 == reference(x5, w5)[0].item()


@pytest.mark.gpu
@needs_hopper
def test_lm_head_argmax_in_cuda_graph():
    x, w = make(151936, 1024, seed=5)
    ws = new_workspace(torch.device("cuda"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        lm_head_argmax(x, w, ws)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        token = lm_head_argmax(x, w, ws)
    gen = torch.Generator(device="cuda").manual_seed(6)
    for _ in range(4):
        x.copy_(torch.randn(1, 1024, generator=gen, device="cuda").to(x.dtype))
        graph.replay()
        check_token(token, x, w)
    assert ws[0].item() == 0  # the ticket is back to zero after every call


def tiny_lm_head_model():
    """A one-layer bf16 Llama on the GPU with a random 4096 x 256 LM head, and two hidden rows."""
    from paged_backend.models.llama import LlamaForCausalLM
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg, attn_backend=None).to("cuda", torch.bfloat16)
    torch.nn.init.normal_(model.lm_head.weight, std=0.05)
    return model, torch.randn(2, 256, device="cuda").to(torch.bfloat16)


@pytest.mark.gpu
@needs_hopper
def test_greedy_tokens_of_the_model():
    """The Llama model's greedy_tokens: the kernel for one row, torch for two, same picks."""
    model, h = tiny_lm_head_model()
    one = model.greedy_tokens(h[:1])
    assert model._argmax_workspace is not None  # the kernel ran
    both = model.greedy_tokens(h)
    ref = model.compute_logits(h, upcast=False).argmax(dim=-1)
    assert torch.equal(both, ref)
    assert one.shape == (1,) and one.dtype == ref.dtype and one.device == ref.device
    check_token(one, h[:1], model.lm_head.weight)


def test_lm_head_argmax_support_check(monkeypatch):
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    w = torch.randn(1000, 64, dtype=torch.bfloat16)
    assert not lm_head_argmax_supported(x, w)  # CPU
    if not hopper():
        return
    x, w = x.cuda(), w.cuda()
    assert lm_head_argmax_supported(x, w)
    assert not lm_head_argmax_supported(x.repeat(2, 1), w)
    assert not lm_head_argmax_supported(x.float(), w.float())
    assert not lm_head_argmax_supported(x, w[:10])  # fewer rows than SMs
    assert not lm_head_argmax_supported(x[:, :60], w[:, :60].contiguous())
    base = torch.randn(1, 72, device="cuda", dtype=torch.bfloat16)
    assert not lm_head_argmax_supported(base[:, 1:65], w)  # x not 16-byte aligned
    assert not lm_head_argmax_supported(x, torch.randn(64, 1000, device="cuda",
                                                       dtype=torch.bfloat16).T)  # not row-major
    with pytest.raises(ValueError):
        lm_head_argmax(x.repeat(2, 1), w)
    monkeypatch.setenv("PAGED_BACKEND_STREAM_GEMV", "0")
    assert not lm_head_argmax_supported(x, w)
