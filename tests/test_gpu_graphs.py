"""On CUDA: greedy output through captured decode graphs and overlapped steps equals
transformers token for token in float32, for every tiny architecture, under preemption."""

from __future__ import annotations

import random

import pytest
import torch

from paged_backend import LLM, SamplingParams
from tiny_models import ARCHS, make_tiny_checkpoint

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("arch", ARCHS)
def test_graph_greedy_equals_transformers_fp32(arch, tmp_path):
    from transformers import AutoModelForCausalLM
    make_tiny_checkpoint(arch, str(tmp_path))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval().cuda()
    vocab = hf.config.get_text_config().vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(2, 40))] for _ in range(12)]
    llm = LLM(str(tmp_path), skip_tokenizer_init=True, dtype="float32", device="cuda",
              block_size=4, num_kv_blocks=40, max_num_batched_tokens=32, max_model_len=96,
              max_num_seqs=16)
    eng = llm.llm_engine
    assert eng.runner.num_cuda_graphs > 0 and eng.overlap
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                        use_tqdm=False)
    for p, o in zip(prompts, outs):
        ids, ref = list(p), []
        with torch.no_grad():
            for _ in range(10):
                t = int(hf(torch.tensor([ids], device="cuda")).logits[0, -1].argmax())
                ref.append(t)
                ids.append(t)
        assert o.outputs[0].token_ids == ref
    st = llm.get_stats()
    assert st["num_preemptions"] > 0 and st["num_overlapped_steps"] > 0
    assert st["kv_blocks_used"] == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_graphs_greedy_equals_transformers_fp32(arch, tmp_path):
    """One request at a time, so every prefill step runs one sequence through a prefill
    graph: prompts of 2..300 tokens (padded up to their bucket), one longer than the token
    budget (its chunks replay two buckets), one that hits the prefix cache (the graph
    attends over the cached prefix). Greedy tokens equal transformers' in float32."""
    from transformers import AutoModelForCausalLM
    make_tiny_checkpoint(arch, str(tmp_path))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval().cuda()
    vocab = hf.config.get_text_config().vocab_size
    rng = random.Random(1)
    lens = [2, 17, 64, 65, 200, 300]
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in lens]
    prompts.append(prompts[4][:150] + [rng.randrange(vocab) for _ in range(40)])  # prefix hit
    llm = LLM(str(tmp_path), skip_tokenizer_init=True, dtype="float32", device="cuda",
              num_kv_blocks=80, max_num_batched_tokens=256, max_model_len=400, max_num_seqs=4)
    runner = llm.llm_engine.runner
    assert runner.num_prefill_graphs > 0 and runner.prefill_graphs.max_tokens == 256
    replays = []
    real = runner.prefill_graphs.replay
    runner.prefill_graphs.replay = lambda t: replays.append(t) or real(t)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for p in prompts:
        out = llm.generate([{"prompt_token_ids": p}], sp, use_tqdm=False)[0]
        ids, ref = list(p), []
        with torch.no_grad():
            for _ in range(6):
                t = int(hf(torch.tensor([ids], device="cuda")).logits[0, -1].argmax())
                ref.append(t)
                ids.append(t)
        assert out.outputs[0].token_ids == ref, len(p)
    # 2..200 tokens: one replay each; 300: chunks of 256 and 44; the prefix hit: the rest.
    assert replays[:5] == [16, 32, 64, 128, 256] and replays[5:7] == [256, 64]
    assert len(replays) == 8
    st = llm.get_stats()
    assert st["prefix_cache_hit_tokens"] > 0 and st["kv_blocks_used"] == 0
