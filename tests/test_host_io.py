"""Decode-step I/O through mapped pinned memory (kernels/host_io.py, the LM head's host write).

`gpu` tests: `stage_inputs` against plain copies (placeholders of pending tokens,
1-D and row-strided 2-D int32 sections, untouched elements kept), the greedy LM
head writing its token into pinned memory, and the engine's bf16 greedy output with
both on against both off (same kernels otherwise, so the same tokens). On CPU: the
support checks say no.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # see test_kernels_stream_gemv.py

from paged_backend.kernels.host_io import host_pointer, stage_inputs, stage_supported  # noqa: E402
from test_kernels_stream_gemv import needs_hopper  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_support_checks_on_cpu():
    assert host_pointer(torch.zeros(4, dtype=torch.int64)) is None  # not pinned
    assert not stage_supported(torch.device("cpu"))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("n64,num_ids,rows,cols", [(7, 1, 1, 3), (3 * 64 + 40, 64, 61, 37),
                                                   (0, 0, 2, 5), (300, 0, 0, 0)])
def test_stage_inputs_matches_copies(n64, num_ids, rows, cols):
    dev = torch.device("cuda")
    assert stage_supported(dev)
    gen = torch.Generator().manual_seed(n64 + rows)
    src64 = torch.randint(0, 10**12, (n64,), generator=gen).pin_memory()
    last = torch.randint(0, 50000, (9,), generator=gen).to(dev)
    pend = torch.randperm(max(num_ids, 1), generator=gen)[:min(num_ids, 5)]
    src_rows = torch.randint(0, 9, (len(pend),), generator=gen)
    if num_ids:
        src64[pend] = -1 - src_rows
    src64[num_ids::7] = -1  # negative values past the token ids (padding slots) are copied
    nseq = max(rows, 1)
    src32 = torch.randint(-5, 10**6, (nseq + 16 + rows * cols,), generator=gen,
                          dtype=torch.int32).pin_memory()
    dst64 = torch.full((n64 + 11,), -7, dtype=torch.int64, device=dev)
    seq_lens = torch.full((nseq + 3,), -7, dtype=torch.int32, device=dev)
    table = torch.full((rows + 2, cols + 9), -7, dtype=torch.int32, device=dev)
    stage_inputs(src64, dst64, num_ids, last, src32,
                 [(0, seq_lens[:nseq]), (16, table[:rows, :cols])])
    torch.cuda.synchronize()
    want64 = src64.clone()
    if num_ids:
        want64[pend] = last.cpu()[src_rows]
    assert torch.equal(dst64[:n64].cpu(), want64)
    assert (dst64[n64:] == -7).all()
    assert torch.equal(seq_lens[:nseq].cpu(), src32[:nseq])
    assert (seq_lens[nseq:] == -7).all()
    assert torch.equal(table[:rows, :cols].cpu(), src32[16:16 + rows * cols].view(rows, cols))
    assert (table[rows:] == -7).all() and (table[:, cols:] == -7).all()


@pytest.mark.gpu
@needs_cuda
def test_stage_inputs_reads_what_the_host_rewrote():
    """The same pinned array rewritten between launches: each launch sees the new values
    (no stale cached copy), and `last` written by a kernel just before is read after it."""
    dev = torch.device("cuda")
    src64 = torch.zeros(4, dtype=torch.int64).pin_memory()
    src32 = torch.zeros(2, dtype=torch.int32).pin_memory()
    dst64 = torch.zeros(4, dtype=torch.int64, device=dev)
    dst32 = torch.zeros(2, dtype=torch.int32, device=dev)
    for step in range(5):
        last = torch.arange(3, device=dev) * 100 + step  # written by a kernel
        src64.copy_(torch.tensor([-1 - (step % 3), step, 2 * step, 3 * step]))
        src32.copy_(torch.tensor([step, -step], dtype=torch.int32))
        stage_inputs(src64, dst64, 1, last, src32, [(0, dst32)])
        torch.cuda.synchronize()
        assert dst64.tolist() == [(step % 3) * 100 + step, step, 2 * step, 3 * step]
        assert dst32.tolist() == [step, -step]


@pytest.mark.gpu
@needs_cuda
def test_stage_inputs_rejects_bad_arrays():
    dev = torch.device("cuda")
    dst = torch.zeros(4, dtype=torch.int64, device=dev)
    pinned32 = torch.zeros(4, dtype=torch.int32).pin_memory()
    with pytest.raises(ValueError, match="pinned"):
        stage_inputs(torch.zeros(4, dtype=torch.int64), dst, 0, None, pinned32, [])
    with pytest.raises(ValueError, match="section"):
        stage_inputs(torch.zeros(4, dtype=torch.int64).pin_memory(), dst, 0, None, pinned32,
                     [(2, torch.zeros(3, dtype=torch.int32, device=dev))])  # past the end


@pytest.mark.gpu
@needs_hopper
def test_lm_head_argmax_writes_the_token_to_pinned_memory():
    from paged_backend.kernels.lm_head_argmax import lm_head_argmax, new_workspace
    from test_kernels_lm_head_argmax import make
    ws = new_workspace(torch.device("cuda"))
    for seed in range(3):
        x, w = make(151936, 1024, seed=seed)
        host = torch.full((1,), -1, dtype=torch.int64).pin_memory()
        token = lm_head_argmax(x, w, ws, host_out=host)
        torch.cuda.current_stream().synchronize()
        assert host.item() == token.item()
    with pytest.raises(ValueError, match="pinned"):
        lm_head_argmax(x, w, ws, host_out=torch.zeros(1, dtype=torch.int64))


@pytest.mark.gpu
@needs_hopper
def test_greedy_tokens_host_out():
    """One row: the kernel writes host_out; two rows: a copy does. Both match the tensor."""
    from test_kernels_lm_head_argmax import tiny_lm_head_model
    model, h = tiny_lm_head_model()
    for rows in (1, 2):
        host = torch.full((rows,), -1, dtype=torch.int64).pin_memory()
        tokens = model.greedy_tokens(h[:rows], host_out=host)
        torch.cuda.current_stream().synchronize()
        assert host.tolist() == tokens.tolist()


@pytest.mark.gpu
@needs_hopper
def test_engine_same_tokens_with_and_without_host_io(tmp_path, monkeypatch):
    """bf16 greedy generation (one request, then three) through the decode graphs: staging
    kernel + the LM head's host write against three copies + a device->host copy."""
    from paged_backend import LLM, SamplingParams
    from paged_backend.models import llama
    from tiny_models import make_tiny_checkpoint
    make_tiny_checkpoint("qwen3", str(tmp_path))
    llm = LLM(str(tmp_path), skip_tokenizer_init=True, dtype="bfloat16", device="cuda",
              block_size=16, max_model_len=256, max_num_seqs=4)
    runner = llm.llm_engine.runner
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = [{"prompt_token_ids": [(7 * i + 3 * j) % 500 + 1 for j in range(5 + 9 * i)]}
               for i in range(3)]

    def run() -> list[list[int]]:
        return [o.outputs[0].token_ids for batch in (prompts[:1], prompts)
                for o in llm.generate(batch, sp, use_tqdm=False)]

    fast = run()
    assert runner._stage_ok is True
    runner._stage_ok = False
    monkeypatch.setattr(llama, "_mapped", lambda t: False)
    slow = run()
    assert fast == slow
    assert llm.get_stats()["kv_blocks_used"] == 0


@pytest.mark.gpu
@needs_cuda
def test_runner_holds_kernel_written_outputs_until_the_stream_passes():
    """A pinned output a queued kernel still writes stays referenced by the runner (so
    torch's pinned cache cannot hand it out again); once the stream has passed, it is let go."""
    import collections
    import types

    from paged_backend.runner.model_runner import ModelRunner
    runner = types.SimpleNamespace(_host_writes=collections.deque())
    busy = torch.empty(1, dtype=torch.int64).pin_memory()
    torch.cuda._sleep(200_000_000)  # keeps the stream busy well past the checks below
    ModelRunner._hold_until_written(runner, busy)
    assert [t for _, t in runner._host_writes] == [busy]
    torch.cuda.synchronize()
    later = torch.empty(1, dtype=torch.int64).pin_memory()
    ModelRunner._hold_until_written(runner, later)
    assert all(t is later for _, t in runner._host_writes)  # `busy` is released
