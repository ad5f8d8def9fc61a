"""The decode-graph input path (static buffers, padded bucket rows, pending
tokens gathered on the device) computes what the eager path computes.

CUDA graphs cannot be captured on a CPU, so here a `DecodeGraphs` whose
"replay" runs the model eagerly on the static buffers stands in for the
captured graphs; the Triton attention backend runs under the interpreter,
as on the GPU it would read the static buffers.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from paged_backend import LLM, SamplingParams  # noqa: E402
from paged_backend.runner.cuda_graphs import DecodeGraphs, batch_size_buckets  # noqa: E402
from paged_backend.runner.prefill_graphs import PrefillGraphs, token_buckets  # noqa: E402
from tiny_models import make_tiny_checkpoint  # noqa: E402

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter cases run on CPU")


class EagerGraphs(DecodeGraphs):
    """Static buffers and buckets as captured graphs have; replay runs the model eagerly."""

    replays: int = 0

    def capture(self, pool=None):
        return pool

    def replay(self, bucket: int) -> torch.Tensor:
        self.replays += 1
        ids, pos, meta = self._views(bucket)
        return self.model(ids, pos, self.kv_caches, meta)

    @classmethod
    def install(cls, runner, max_batch_size: int) -> "EagerGraphs":
        """Give `runner` (block size 4, max_model_len 64) these graphs and return them."""
        runner.graphs = cls(runner.model, runner.kv_caches, max_batch_size=max_batch_size,
                            max_blocks_per_seq=16, block_size=4, max_model_len=64,
                            num_kv_heads=runner.num_kv_heads, device=runner.device)
        return runner.graphs


class EagerPrefillGraphs(PrefillGraphs):
    """The prefill graphs' static buffers and buckets; replay runs the model eagerly."""

    replays: list[int]

    def capture(self, pool=None):
        self.replays = []
        return pool

    def replay(self, bucket: int) -> torch.Tensor:
        self.replays.append(bucket)
        ids, pos, meta = self._views(bucket)
        return self.model(ids, pos, self.kv_caches, meta)


def test_buckets():
    assert batch_size_buckets(1) == [1]
    assert batch_size_buckets(20) == [1, 2, 4, 8, 16, 20]
    b = batch_size_buckets(256)
    assert b[:5] == [1, 2, 4, 8, 16] and b[-1] == 256 and all(x % 16 == 0 for x in b[4:])
    assert token_buckets(512) == [16, 32, 64, 128, 192, 256, 320, 384, 448, 512]
    assert token_buckets(100) == [16, 32, 64, 112] and token_buckets(8) == [16]


@cpu_only
@pytest.mark.parametrize("overlap", [False, True])
def test_graph_inputs_match_eager(tmp_path, monkeypatch, overlap):
    make_tiny_checkpoint("qwen3", str(tmp_path))
    rng = random.Random(0)
    prompts = [[rng.randrange(200) for _ in range(rng.randint(3, 20))] for _ in range(5)]
    params = [SamplingParams(temperature=0, max_tokens=4 + i, ignore_eos=True) for i in range(5)]
    args = dict(skip_tokenizer_init=True, dtype="float32", device="cpu", block_size=4,
                num_kv_blocks=64, max_model_len=64)
    ref = LLM(str(tmp_path), **args).generate([{"prompt_token_ids": p} for p in prompts],
                                              params, use_tqdm=False)
    monkeypatch.setenv("PAGED_BACKEND_ATTENTION", "triton")
    llm = LLM(str(tmp_path), **args)
    runner = llm.llm_engine.runner
    EagerGraphs.install(runner, max_batch_size=8)
    llm.llm_engine.overlap = overlap
    got = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
    assert runner.graphs.replays > 0
    assert llm.llm_engine.block_manager.num_used_blocks == 0


@cpu_only
@pytest.mark.parametrize("graphs", [True, False])
def test_lm_head_rows_padded_to_sizes(tmp_path, monkeypatch, graphs):
    """With LM-head sizes set (on CUDA, by the start-up warm-up), the LM head runs only at
    those row counts, on graph steps (the bucket's rows) and eager ones (padding rows
    appended), for all-greedy batches (the plain argmax path) and mixed ones (the sampler),
    and the tokens and logprobs are those of the unpadded run."""
    make_tiny_checkpoint("qwen3", str(tmp_path))
    rng = random.Random(1)
    prompts = [{"prompt_token_ids": [rng.randrange(200) for _ in range(rng.randint(3, 20))]}
               for _ in range(5)]
    greedy = [SamplingParams(temperature=0, max_tokens=3 + i, ignore_eos=True) for i in range(5)]
    mixed = greedy[:3] + [SamplingParams(temperature=0.8, seed=7 + i, max_tokens=4 + i,
                                         logprobs=2, ignore_eos=True) for i in range(2)]
    args = dict(skip_tokenizer_init=True, dtype="float32", device="cpu", block_size=4,
                num_kv_blocks=64, max_model_len=64)
    monkeypatch.setenv("PAGED_BACKEND_ATTENTION", "triton")

    def run(sizes):
        llm = LLM(str(tmp_path), **args)
        runner = llm.llm_engine.runner
        if graphs:
            EagerGraphs.install(runner, max_batch_size=8)
        runner._head_sizes = sizes
        rows = []
        real = runner.model.compute_logits

        def spy(h, *a, **k):
            rows.append(h.shape[0])
            return real(h, *a, **k)
        monkeypatch.setattr(runner.model, "compute_logits", spy)
        outs = [llm.generate(prompts, p, use_tqdm=False) for p in (greedy, mixed)]
        assert llm.llm_engine.block_manager.num_used_blocks == 0
        return outs, rows

    ref, ref_rows = run([])
    got, rows = run([1, 2, 4, 8])
    # Unpadded, the batches sample 5, 4, 3, ... rows; padded, only the listed counts.
    assert {3, 5} <= set(ref_rows) and set(rows) <= {1, 2, 4, 8}
    for outs, ref_outs in zip(got, ref, strict=True):
        for g, r in zip(outs, ref_outs, strict=True):
            assert g.outputs[0].token_ids == r.outputs[0].token_ids
            glp, rlp = g.outputs[0].logprobs or [], r.outputs[0].logprobs or []
            assert len(glp) == len(rlp)
            for lg, lr in zip(glp, rlp, strict=True):
                assert lg.keys() == lr.keys()
                for t in lg:
                    assert abs(lg[t].logprob - lr[t].logprob) < 1e-4


@cpu_only
def test_prefill_graph_inputs_match_eager(tmp_path, monkeypatch):
    """One-sequence prefills through the prefill graphs' static buffers (padded to a bucket,
    chunked, after a prefix-cache hit) give the eager path's tokens."""
    make_tiny_checkpoint("qwen3", str(tmp_path))
    rng = random.Random(1)
    prompts = [[rng.randrange(200) for _ in range(n)] for n in (2, 9, 16, 17, 30, 45)]
    prompts.append(prompts[4][:24] + [rng.randrange(200) for _ in range(7)])  # prefix hit
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    args = dict(skip_tokenizer_init=True, dtype="float32", device="cpu", block_size=4,
                num_kv_blocks=64, max_model_len=64, max_num_batched_tokens=32)
    ref_llm = LLM(str(tmp_path), **args)
    ref = [ref_llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0]
           for p in prompts]
    monkeypatch.setenv("PAGED_BACKEND_ATTENTION", "triton")
    llm = LLM(str(tmp_path), **args)
    runner = llm.llm_engine.runner
    runner.prefill_graphs = EagerPrefillGraphs(
        runner.model, runner.kv_caches, max_tokens=32, max_blocks_per_seq=16, block_size=4,
        max_model_len=64, device=runner.device)
    runner.prefill_graphs.capture()
    got = [llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0] for p in prompts]
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
    # 2 -> 16, 9 -> 16, 16, 17 -> 32, 30 -> 32, 45: chunks 32 + 13 -> 16; the hit: 7 -> 16.
    assert runner.prefill_graphs.replays == [16, 16, 16, 32, 32, 32, 16, 16]
    st = llm.get_stats()
    assert st["prefix_cache_hit_tokens"] > 0 and st["num_prefill_graphs"] == 2  # buckets 16, 32
    assert llm.llm_engine.block_manager.num_used_blocks == 0


def test_decode_row_order():
    """The shortest quarter of the contexts goes last, longest of them first; every other
    row keeps the scheduler's order; batches of fewer than four rows are left alone."""
    from types import SimpleNamespace

    from paged_backend.runner.model_runner import decode_row_order
    lens = [50, 7, 300, 9, 120, 8, 64, 200, 30, 10, 500, 75]
    rows = [SimpleNamespace(num_computed_tokens=n, name=i) for i, n in enumerate(lens)]
    got = [r.name for r in decode_row_order(rows)]
    assert sorted(got) == list(range(len(lens)))
    assert got[-3:] == [3, 5, 1]  # the three shortest (9, 8, 7), longest first
    assert got[:-3] == [i for i in range(len(lens)) if i not in (1, 3, 5)]
    assert [r.name for r in decode_row_order(rows[:3])] == [0, 1, 2]
    assert [r.name for r in decode_row_order(rows, tail_fraction=0.5)][-6:] == [0, 8, 9, 3, 5, 1]


@pytest.mark.parametrize("overlap", [False, True])
def test_reordered_decode_rows_change_no_output(tmp_path, monkeypatch, overlap):
    """Decode rows in decode_row_order (what CUDA runners do) give every request the tokens
    and logprobs it gets in the scheduler's order: greedy, seeded sampling, penalties,
    parallel sampling and stop tokens, with and without the overlapped step loop."""
    make_tiny_checkpoint("qwen3", str(tmp_path))
    rng = random.Random(3)
    prompts = [[rng.randrange(200) for _ in range(rng.randint(2, 30))] for _ in range(9)]
    params = [SamplingParams(temperature=0, max_tokens=6 + 2 * i, ignore_eos=True, logprobs=2)
              for i in range(5)]
    params += [SamplingParams(temperature=0.8, seed=7 + i, max_tokens=12, ignore_eos=True)
               for i in range(2)]
    params.append(SamplingParams(temperature=0, max_tokens=10, repetition_penalty=1.3,
                                 ignore_eos=True))
    params.append(SamplingParams(temperature=0.9, seed=5, n=2, max_tokens=9, stop_token_ids=[17]))
    args = dict(skip_tokenizer_init=True, dtype="float32", device="cpu", block_size=4,
                num_kv_blocks=128, max_model_len=64)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    from paged_backend.runner import model_runner
    real_order, moved = model_runner.decode_row_order, []

    def order(rows, *a):
        out = real_order(rows, *a)
        moved.append(out != rows)
        return out
    monkeypatch.setattr(model_runner, "decode_row_order", order)

    def run(reorder):
        llm = LLM(str(tmp_path), **args)
        llm.llm_engine.overlap = overlap
        llm.llm_engine.runner.reorder_decode_rows = reorder
        outs = llm.generate(inputs, params, use_tqdm=False)
        assert llm.llm_engine.block_manager.num_used_blocks == 0
        return [o.outputs for o in outs]

    got, ref = run(True), run(False)
    assert sum(moved) >= 5  # steps whose rows ran in another order
    assert [[c.token_ids for c in o] for o in got] == [[c.token_ids for c in o] for o in ref]
    for o, r in zip(got, ref):  # a row's float32 sums may change with its place in the batch
        for c, rc in zip(o, r):
            assert (c.logprobs is None) == (rc.logprobs is None)
            for d, rd in zip(c.logprobs or [], rc.logprobs or []):
                assert d.keys() == rd.keys()
                assert all(abs(d[t].logprob - rd[t].logprob) < 1e-4 and d[t].rank == rd[t].rank
                           for t in d)


@cpu_only
def test_reordered_decode_rows_with_pending_tokens_through_graph_inputs(tmp_path, monkeypatch):
    """Overlapped steps whose rows are reordered take each pending token (sampled by the
    step before, still on the device) for the right request, through the decode graphs'
    static buffers: greedy and seeded requests, all overlap-safe, so every step overlaps."""
    make_tiny_checkpoint("qwen3", str(tmp_path))
    rng = random.Random(4)
    prompts = [[rng.randrange(200) for _ in range(rng.randint(2, 30))] for _ in range(10)]
    params = [SamplingParams(temperature=0, max_tokens=8 + i, ignore_eos=True) if i % 2 else
              SamplingParams(temperature=0.8, seed=11 + i, max_tokens=8 + i, ignore_eos=True)
              for i in range(10)]
    args = dict(skip_tokenizer_init=True, dtype="float32", device="cpu", block_size=4,
                num_kv_blocks=128, max_model_len=64)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    ref = [o.outputs[0].token_ids for o in
           LLM(str(tmp_path), **args).generate(inputs, params, use_tqdm=False)]
    monkeypatch.setenv("PAGED_BACKEND_ATTENTION", "triton")
    llm = LLM(str(tmp_path), **args)
    runner = llm.llm_engine.runner
    EagerGraphs.install(runner, max_batch_size=16)
    runner.reorder_decode_rows = True
    llm.llm_engine.overlap = True
    got = [o.outputs[0].token_ids for o in llm.generate(inputs, params, use_tqdm=False)]
    assert got == ref
    assert runner.graphs.replays > 5 and llm.llm_engine.num_overlapped_steps > 5
    assert llm.llm_engine.block_manager.num_used_blocks == 0
