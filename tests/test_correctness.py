"""Greedy output token-for-token equal to transformers (float32), through the whole engine.

Tiny random-weight models of every supported architecture run a batch of
prompts of different lengths (some sharing a prefix) together under a small
token budget and few KV blocks, so chunked prefill, prefix-cache hits and
preemption all happen; the default model runs real prompts.
"""

from __future__ import annotations

import random

import pytest
import torch

from paged_backend import LLM, SamplingParams
from tiny_models import ARCHS, make_tiny_checkpoint


def hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding with transformers' forward (no cache: the plainest oracle)."""
    ids = list(prompt)
    out, lps = [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            tok = int(torch.argmax(logits))
            lps.append(torch.log_softmax(logits, -1))
            out.append(tok)
            ids.append(tok)
    return out, lps


def make_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(vocab) for _ in range(24)]
    prompts = [shared + [rng.randrange(vocab) for _ in range(rng.randint(1, 9))]]
    for i in range(11):
        if i % 3 == 0:
            prompts.append(shared + [rng.randrange(vocab) for _ in range(rng.randint(1, 12))])
        else:
            prompts.append([rng.randrange(vocab) for _ in range(rng.randint(2, 40))])
    return prompts


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    from transformers import AutoModelForCausalLM
    cache = {}

    def get(arch):
        if arch not in cache:
            path = tmp_path_factory.mktemp(arch)
            make_tiny_checkpoint(arch, str(path))
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
            cache[arch] = (str(path), model)
        return cache[arch]
    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers_under_pressure(arch, hf_models):
    path, hf = hf_models(arch)
    vocab = hf.config.get_text_config().vocab_size
    prompts = make_prompts(vocab)
    max_tokens = 8
    llm = LLM(path, skip_tokenizer_init=True, dtype="float32", device="cpu", block_size=4,
              num_kv_blocks=26, max_num_batched_tokens=32, max_num_seqs=8, max_model_len=96)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=2)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    stats = llm.get_stats()
    assert stats["num_chunked_prefill_steps"] > 0, stats
    assert stats["prefix_cache_hit_tokens"] > 0, stats
    assert stats["num_preemptions"] > 0, stats
    assert stats["kv_blocks_used"] == 0 and stats["num_running"] == stats["num_waiting"] == 0
    for prompt, out in zip(prompts, outs):
        ref, ref_lps = hf_greedy(hf, prompt, max_tokens)
        comp = out.outputs[0]
        assert out.prompt_token_ids == prompt
        assert comp.token_ids == ref, f"{arch}: prompt of {len(prompt)} tokens"
        assert comp.finish_reason == "length"
        for step, (tok, lp) in enumerate(zip(comp.token_ids, comp.logprobs)):
            assert abs(lp[tok].logprob - float(ref_lps[step][tok])) < 1e-4
            assert lp[tok].rank == 1
        assert abs(comp.cumulative_logprob - sum(float(r[t]) for r, t in zip(ref_lps, ref))) < 1e-3


@pytest.mark.parametrize("logprob_rows", [None, 3])
def test_logprobs_and_prompt_logprobs_match_log_softmax(hf_models, logprob_rows, monkeypatch):
    if logprob_rows is not None:  # prompt logprobs of an 8-token step in slices of 3, 3, 2
        from paged_backend.runner import model_runner
        monkeypatch.setattr(model_runner, "LOGPROB_ROWS", logprob_rows)
    path, hf = hf_models("llama")
    llm = LLM(path, skip_tokenizer_init=True, dtype="float32", device="cpu", block_size=4,
              max_num_batched_tokens=8, max_model_len=64)
    prompt = list(range(3, 23))
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=5,
                                      prompt_logprobs=3), use_tqdm=False)[0]
    with torch.no_grad():
        full = torch.log_softmax(hf(torch.tensor([prompt + out.outputs[0].token_ids[:-1]]))
                                 .logits[0].float(), -1)
    # Prompt logprobs: None for the first token, then the prompt token plus the top 3.
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        d = out.prompt_logprobs[i]
        ref = full[i - 1]
        assert abs(d[prompt[i]].logprob - float(ref[prompt[i]])) < 1e-4
        assert d[prompt[i]].rank == int((ref > ref[prompt[i]]).sum()) + 1
        top = torch.topk(ref, 3).indices.tolist()
        assert set(top) <= set(d)
    for step, d in enumerate(out.outputs[0].logprobs):
        ref = full[len(prompt) - 1 + step]
        top = torch.topk(ref, 5)
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            assert abs(d[t].logprob - v) < 1e-4
        ranks = sorted(lp.rank for t, lp in d.items())
        assert ranks[:5] == [1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def default_llm():
    return LLM(dtype="float32", device="cpu", max_model_len=512)


@pytest.fixture(scope="module")
def default_hf(default_llm):
    from transformers import AutoModelForCausalLM
    src = default_llm.llm_engine.model_source
    return AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file,
                                                dtype=torch.float32).eval()


def test_default_model_paris(default_llm):
    out = default_llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8),
                               use_tqdm=False)[0]
    assert out.outputs[0].text.startswith(" Paris")


def test_default_model_matches_transformers(default_llm, default_hf):
    tok = default_llm.get_tokenizer()
    prompts = ["The capital of France is", "def fibonacci(n):",
               "Once upon a time, in a small village,", "The three primary colors are"]
    n = 12
    outs = default_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                                use_tqdm=False)
    for p, out in zip(prompts, outs):
        ids = tok.encode(p)
        ref, _ = hf_greedy(default_hf, ids, n)
        assert out.outputs[0].token_ids == ref, p
        assert out.outputs[0].text == tok.decode(ref, skip_special_tokens=True)
