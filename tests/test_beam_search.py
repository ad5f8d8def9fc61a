"""Beam search (vLLM's API) on forked requests: equal to transformers' num_beams search, blocks shared."""

from __future__ import annotations

import random

import pytest
import torch

from paged_backend import LLM, BeamSearchParams, SamplingParams
from paged_backend.beam_search import beam_score
from tiny_models import make_tiny_checkpoint

PROMPTS = [[5, 17, 99, 3, 250, 7, 11], [400, 2, 31, 31, 8], list(range(40, 63))]


@pytest.fixture(scope="module", params=["llama", "qwen3", "opt"])
def pair(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM
    path = str(tmp_path_factory.mktemp(request.param))
    make_tiny_checkpoint(request.param, path, max_position_embeddings=1024)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(path, skip_tokenizer_init=True, dtype="float32", device="cpu", block_size=4,
              max_model_len=1024, num_kv_blocks=400)
    return llm, hf


@pytest.mark.parametrize("width", [2, 4])
def test_matches_transformers_num_beams(pair, width):
    """No EOS (ignore_eos / eos_token_id=None), early_stopping=False, length_penalty=1, to max_tokens."""
    llm, hf = pair
    n = 6
    outs = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS],
                           BeamSearchParams(beam_width=width, max_tokens=n, ignore_eos=True))
    for p, out in zip(PROMPTS, outs):
        with torch.no_grad():
            g = hf.generate(torch.tensor([p]), num_beams=width, num_return_sequences=width,
                            max_new_tokens=n, min_new_tokens=n, do_sample=False, early_stopping=False,
                            length_penalty=1.0, eos_token_id=None, pad_token_id=0,
                            output_scores=True, return_dict_in_generate=True)
        assert len(out.sequences) == width
        ref = [s[len(p):].tolist() for s in g.sequences]
        assert [s.tokens[len(p):] for s in out.sequences] == ref
        assert all(s.tokens[:len(p)] == p for s in out.sequences)
        # transformers' score is the cumulative logprob over the generated length.
        for s, score in zip(out.sequences, g.sequences_scores.tolist()):
            assert abs(s.cum_logprob - score * n) < 1e-3
    assert llm.get_stats()["kv_blocks_used"] == 0


def test_width_one_is_greedy(pair):
    llm, _ = pair
    p = PROMPTS[2]
    greedy = llm.generate({"prompt_token_ids": p}, SamplingParams(temperature=0, max_tokens=12,
                                                                 ignore_eos=True), use_tqdm=False)
    beam = llm.beam_search([{"prompt_token_ids": p}],
                           BeamSearchParams(beam_width=1, max_tokens=12, ignore_eos=True))
    assert beam[0].sequences[0].tokens[len(p):] == greedy[0].outputs[0].token_ids


def test_beams_share_blocks(pair):
    llm, _ = pair
    llm.reset_prefix_cache()
    llm.reset_stats()
    rng = random.Random(0)
    prompt = [rng.randrange(512) for _ in range(500)]
    width, n = 4, 16
    out = llm.beam_search([{"prompt_token_ids": prompt}],
                          BeamSearchParams(beam_width=width, max_tokens=n, ignore_eos=True))[0]
    st = llm.get_stats()
    prompt_blocks = 500 // 4  # block size 4: 125 full blocks
    # The prompt once; per beam the new tokens' blocks plus one copied partial block.
    assert st["kv_blocks_peak"] <= prompt_blocks + width * (n // 4 + 1) + width, st
    assert st["kv_cow_copies"] > 0
    assert st["kv_blocks_used"] == 0 and st["num_running"] == 0
    assert len(out.sequences) == width and len({tuple(s.tokens) for s in out.sequences}) == width


def test_abort_midway_frees_blocks(pair, monkeypatch):
    llm, _ = pair
    eng = llm.llm_engine
    real_step, calls = eng.step, []

    def step():
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_step()
    monkeypatch.setattr(eng, "step", step)
    with pytest.raises(KeyboardInterrupt):
        llm.beam_search([{"prompt_token_ids": PROMPTS[0]}],
                        BeamSearchParams(beam_width=3, max_tokens=20, ignore_eos=True))
    st = llm.get_stats()
    assert st["kv_blocks_used"] == 0 and st["num_running"] == 0 and st["num_waiting"] == 0


def test_score_and_params():
    assert beam_score([1, 2, 3, 9], -4.0, {9}, 1.0) == pytest.approx(-4.0 / 3)
    assert beam_score([1, 2, 3, 4], -4.0, {9}, 2.0) == pytest.approx(-4.0 / 16)
    for kw, field in [(dict(beam_width=0, max_tokens=3), "beam_width"),
                      (dict(beam_width=2, max_tokens=0), "max_tokens"),
                      (dict(beam_width=2, max_tokens=3, temperature=-1.0), "temperature"),
                      (dict(beam_width=2, max_tokens=3, ignore_eos="no"), "ignore_eos")]:
        with pytest.raises(ValueError, match=field):
            BeamSearchParams(**kw)


def test_groups_hold_width_places_against_max_num_seqs(tmp_path):
    """Each prompt's beams hold beam_width places from admission on, so a step never runs more
    than max_num_seqs sequences; results equal a run without the cap. A width above
    max_num_seqs is refused up front."""
    make_tiny_checkpoint("llama", str(tmp_path), max_position_embeddings=1024)
    kw = dict(skip_tokenizer_init=True, dtype="float32", device="cpu", block_size=4,
              max_model_len=1024, num_kv_blocks=400)
    params = BeamSearchParams(beam_width=2, max_tokens=5, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    ref = LLM(str(tmp_path), **kw).beam_search(prompts, params)
    llm = LLM(str(tmp_path), max_num_seqs=4, **kw)
    with pytest.raises(ValueError, match="beam_width is 5.*max_num_seqs \\(4\\)"):
        llm.beam_search(prompts, BeamSearchParams(beam_width=5, max_tokens=2))
    sched = llm.llm_engine.scheduler
    widths, real = [], sched.schedule

    def spy():
        out = real()
        widths.append(len(sched.running))
        return out
    sched.schedule = spy
    outs = llm.beam_search(prompts, params)
    assert [[s.tokens for s in o.sequences] for o in outs] == \
        [[s.tokens for s in o.sequences] for o in ref]
    assert max(widths) == 4  # two groups of two beams; the third prompt waits
    assert llm.get_stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("budget", [6, 8, 16])
def test_small_token_budget(tmp_path, budget):
    """With max_num_batched_tokens below a step's beams plus prompt chunks, a beam whose
    group waits for a sibling's logits (not scheduled for lack of budget) sits out the step;
    the results equal an unconstrained run and no block leaks."""
    make_tiny_checkpoint("llama", str(tmp_path), max_position_embeddings=1024)
    kw = dict(skip_tokenizer_init=True, dtype="float32", device="cpu", block_size=4,
              max_model_len=1024, num_kv_blocks=400)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    for width in (2, 3):
        params = BeamSearchParams(beam_width=width, max_tokens=5, ignore_eos=True)
        ref = LLM(str(tmp_path), **kw).beam_search(prompts, params)
        llm = LLM(str(tmp_path), max_num_batched_tokens=budget, **kw)
        outs = llm.beam_search(prompts, params)
        assert [[s.tokens for s in o.sequences] for o in outs] == \
            [[s.tokens for s in o.sequences] for o in ref]
        assert llm.get_stats()["kv_blocks_used"] == 0
