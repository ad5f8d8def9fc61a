"""Sampling through the whole engine follows a tiny model's exact next-token distribution.

Many requests with one prompt each sample one token; the empirical
frequencies are compared with the distribution computed by hand from
transformers' logits. Tolerance: max |p_hat - p| < 0.035 with 3000 draws
(about 4 standard deviations at p = 0.5) and no draw outside the support.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from paged_backend import LLM, SamplingParams
from tiny_models import make_tiny_checkpoint

N = 3000
PROMPT = [11, 42, 7, 99, 42, 3]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM
    path = str(tmp_path_factory.mktemp("tiny"))
    make_tiny_checkpoint("llama", path, seed=3)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():  # sharpen the distribution so that every filter changes it visibly
        hf.model.norm.weight.mul_(12.0)
    hf.save_pretrained(path)

    def logits_of(prompt):
        with torch.no_grad():
            return hf(torch.tensor([prompt])).logits[0, -1].double()
    base = logits_of(PROMPT)
    # A prompt holding the likeliest next tokens, so the repetition penalty bites.
    rep_prompt = PROMPT + torch.topk(base, 3).indices.tolist()
    llm = LLM(path, skip_tokenizer_init=True, dtype="float32", device="cpu", max_model_len=64,
              max_num_seqs=512)
    return llm, {tuple(PROMPT): base, tuple(rep_prompt): logits_of(rep_prompt)}, rep_prompt


def expected(logits, prompt, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
             repetition_penalty=1.0):
    z = logits.clone()
    if repetition_penalty != 1.0:
        idx = torch.tensor(sorted(set(prompt)))
        v = z[idx]
        z[idx] = torch.where(v > 0, v / repetition_penalty, v * repetition_penalty)
    p = torch.softmax(z / temperature, -1)
    keep = torch.ones_like(p, dtype=torch.bool)
    if top_k:
        keep &= p >= torch.topk(p, top_k).values[-1]
    if top_p < 1.0:
        order = torch.argsort(p, descending=True)
        cum = torch.cumsum(p[order], 0)
        drop = (cum - p[order]) >= top_p  # keep the smallest prefix whose mass reaches top_p
        keep[order[drop]] = False
    if min_p:
        keep &= p >= min_p * p.max()
    p = torch.where(keep, p, torch.zeros_like(p))
    return p / p.sum()


CASES = [
    dict(temperature=1.0),
    dict(temperature=0.5),
    dict(temperature=0.6, top_k=6),
    dict(temperature=1.0, top_k=3),
    dict(temperature=1.5, top_p=0.5),
    dict(temperature=1.0, min_p=0.5),
    dict(temperature=0.8, repetition_penalty=1.8, top_k=10),
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_engine_samples_exact_distribution(setup, case):
    llm, logits, rep_prompt = setup
    prompt = rep_prompt if "repetition_penalty" in case else PROMPT
    p = expected(logits[tuple(prompt)], prompt, **case)
    # Sanity: the case's filters change the distribution by far more than the tolerance.
    assert float((p - expected(logits[tuple(prompt)], prompt)).abs().max()) > 0.08 or case == CASES[0]
    outs = llm.generate([{"prompt_token_ids": prompt}] * N, SamplingParams(max_tokens=1, **case),
                        use_tqdm=False)
    counts = Counter(o.outputs[0].token_ids[0] for o in outs)
    support = set(torch.nonzero(p).flatten().tolist())
    assert set(counts) <= support, "sampled a token the filters exclude"
    p_hat = torch.zeros_like(p)
    for t, c in counts.items():
        p_hat[t] = c / N
    assert float((p_hat - p).abs().max()) < 0.035, case


def test_greedy_is_argmax(setup):
    llm, logits, _ = setup
    out = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, max_tokens=1),
                       use_tqdm=False)[0]
    assert out.outputs[0].token_ids[0] == int(torch.argmax(logits[tuple(PROMPT)]))
