"""Parallel sampling (n, best_of) through forked requests that share the prompt's KV blocks.

The prompt is prefilled once; its n sequences then point at the same blocks
(ref count n). The shared, partly filled last block is copied on a
sequence's first write (copy-on-write); full blocks are never copied.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paged_backend import LLM, SamplingParams
from paged_backend.engine.block_manager import BlockManager
from paged_backend.engine.request import Request
from test_sampling_e2e import PROMPT, expected, setup  # noqa: F401  (setup is a fixture)
from tiny_models import make_tiny_checkpoint

BS = 16


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny1k"))
    make_tiny_checkpoint("llama", path, max_position_embeddings=1024)
    return LLM(path, skip_tokenizer_init=True, dtype="float32", device="cpu", block_size=BS,
               max_model_len=1024, num_kv_blocks=400)


def prompt_of(n, seed=0):
    rng = random.Random(seed)
    return [rng.randrange(512) for _ in range(n)]


def check_sharing_bound(llm, params):
    llm.reset_prefix_cache()
    llm.reset_stats()
    prompt = prompt_of(500)
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    st = llm.get_stats()
    prompt_blocks = -(-500 // BS)  # 32
    seqs = params.best_of
    # The prompt's blocks once, then per sequence: the tail blocks of 32 new tokens
    # (at most 3) plus one copied partial block; far below seqs x (prompt + 32).
    assert st["kv_blocks_peak"] <= prompt_blocks + seqs * 3 + seqs, st
    assert st["kv_blocks_peak"] < seqs * (prompt_blocks + 2) // 3
    assert st["kv_blocks_used"] == 0 and st["num_running"] == st["num_waiting"] == 0
    return out, st


def test_n8_shares_prompt_blocks(llm):
    out, st = check_sharing_bound(llm, SamplingParams(n=8, temperature=1.0, seed=3, max_tokens=32,
                                                      ignore_eos=True))
    assert [c.index for c in out.outputs] == list(range(8))
    assert all(len(c.token_ids) == 32 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) == 8, "samples must differ"
    assert st["kv_cow_copies"] == 7  # the shared partial prompt block; the last writer keeps it
    assert out.num_cached_tokens == 0


def test_best_of_returns_top_n_by_cumulative_logprob(llm):
    out, _ = check_sharing_bound(llm, SamplingParams(n=2, best_of=8, temperature=1.0, seed=1,
                                                     max_tokens=32, ignore_eos=True, logprobs=0))
    assert len(out.outputs) == 2 and [c.index for c in out.outputs] == [0, 1]
    cums = [c.cumulative_logprob for c in out.outputs]
    assert cums[0] >= cums[1]
    # The two kept are the best two of the eight: rerun all eight with the same seeds.
    all8 = llm.generate({"prompt_token_ids": prompt_of(500)},
                        SamplingParams(n=8, temperature=1.0, seed=1, max_tokens=32, ignore_eos=True,
                                       logprobs=0), use_tqdm=False)[0]
    best = sorted((c.cumulative_logprob for c in all8.outputs), reverse=True)[:2]
    assert cums == pytest.approx(best, abs=1e-4)
    # Without logprobs asked for, cumulative_logprob stays None (vLLM V1), best_of still ranks.
    plain = llm.generate({"prompt_token_ids": prompt_of(500)},
                         SamplingParams(n=2, best_of=8, temperature=1.0, seed=1, max_tokens=32,
                                        ignore_eos=True), use_tqdm=False)[0]
    assert [c.cumulative_logprob for c in plain.outputs] == [None, None]
    assert [c.token_ids for c in plain.outputs] == [c.token_ids for c in out.outputs]


def test_abort_midway_frees_everything(llm):
    eng = llm.llm_engine
    llm.reset_prefix_cache()
    eng.add_request("par", {"prompt_token_ids": prompt_of(300, 5)},
                    SamplingParams(n=6, temperature=1.0, max_tokens=64, ignore_eos=True))
    for _ in range(4):
        eng.step()
    st = eng.get_stats()
    assert st["num_running"] == 6 and st["kv_blocks_used"] < 6 * (300 // BS)
    eng.abort_request("par")
    st = eng.get_stats()
    assert st["kv_blocks_used"] == 0 and st["num_running"] == 0
    assert not eng.has_unfinished_requests()


def test_seeded_n_reproducible_and_distinct(llm):
    sp = SamplingParams(n=4, temperature=1.0, seed=42, max_tokens=10, ignore_eos=True)
    a = llm.generate({"prompt_token_ids": prompt_of(40)}, sp, use_tqdm=False)[0]
    b = llm.generate([{"prompt_token_ids": prompt_of(7, 9)}, {"prompt_token_ids": prompt_of(40)}],
                     [SamplingParams(temperature=1.0, max_tokens=5), sp], use_tqdm=False)[1]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) == 4


def test_n_samples_follow_exact_distribution(setup):  # noqa: F811
    llm, logits, _ = setup
    case = dict(temperature=0.8, top_k=6)
    p = expected(logits[tuple(PROMPT)], PROMPT, **case)
    outs = llm.generate([{"prompt_token_ids": PROMPT}] * 6, SamplingParams(n=500, max_tokens=1, **case),
                        use_tqdm=False)
    toks = [c.token_ids[0] for o in outs for c in o.outputs]
    assert len(toks) == 3000
    counts = Counter(toks)
    assert set(counts) <= set(torch.nonzero(p).flatten().tolist())
    p_hat = torch.zeros_like(p)
    for t, c in counts.items():
        p_hat[t] = c / len(toks)
    assert float((p_hat - p).abs().max()) < 0.035


# ------------------------------------------------------------- block manager alone
@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 10_000), block_size=st.sampled_from([1, 2, 4, 8]),
       num_blocks=st.integers(4, 40), prefix=st.booleans())
def test_fork_cow_free_property(seed, block_size, num_blocks, prefix):
    """Random allocate / fork / append / free: ref counts exact, no leaks, no shared writes."""
    rng = random.Random(seed)
    bm = BlockManager(num_blocks, block_size, prefix)
    store: dict[int, int] = {}
    live: dict[str, Request] = {}
    counter = 0

    def slot(req, p):
        return bm.block_ids(req.request_id)[p // block_size] * block_size + p % block_size

    def write(req, n):
        """Allocate n new tokens, apply copies, write them, and read the whole context back."""
        if not bm.allocate_slots(req, n):
            return False
        for src, dst in bm.take_copies():
            for o in range(block_size):
                if src * block_size + o in store:
                    store[dst * block_size + o] = store[src * block_size + o]
        for p in range(req.num_computed_tokens, req.num_computed_tokens + n):
            assert bm.blocks[bm.block_ids(req.request_id)[p // block_size]].ref_cnt == 1
            store[slot(req, p)] = req.token_id(p)
        req.num_computed_tokens += n
        bm.cache_blocks(req, req.num_computed_tokens)
        for p in range(req.num_computed_tokens):
            assert store.get(slot(req, p)) == req.token_id(p)
        return True

    for _ in range(120):
        op = rng.random()
        if op < 0.25 or not live:
            counter += 1
            req = Request(f"r{counter}", [rng.randrange(4) for _ in range(rng.randint(1, 12))],
                          SamplingParams())
            hits, num_hit = bm.get_computed_blocks(req)
            if bm.allocate_slots(req, req.num_tokens - num_hit, hits):
                req.num_computed_tokens = num_hit
                bm.take_copies()
                live[req.request_id] = req
                req.num_computed_tokens += 0
                # write the rest of the prompt
                n = req.num_tokens - num_hit
                for p in range(num_hit, num_hit + n):
                    store[slot(req, p)] = req.token_id(p)
                req.num_computed_tokens = req.num_tokens
                bm.cache_blocks(req, req.num_computed_tokens)
        elif op < 0.5:
            parent = live[rng.choice(sorted(live))]
            counter += 1
            child = Request(f"r{counter}", list(parent.prompt_token_ids), SamplingParams())
            child.output_token_ids = list(parent.output_token_ids)
            bm.fork(parent, child)
            child.num_computed_tokens = parent.num_computed_tokens
            live[child.request_id] = child
        elif op < 0.85:
            req = live[rng.choice(sorted(live))]
            req.output_token_ids.append(rng.randrange(4))
            if not write(req, 1):
                req.output_token_ids.pop()
        else:
            rid = rng.choice(sorted(live))
            bm.free(live.pop(rid))
        bm.check_invariants()
    for req in list(live.values()):
        bm.free(req)
    bm.check_invariants()
    assert bm.num_free_blocks == num_blocks, "blocks leaked"


def test_cow_copies_only_the_shared_partial_block():
    bm = BlockManager(10, 4)
    parent = Request("p", list(range(10)), SamplingParams())  # blocks: full, full, 2/4
    assert bm.allocate_slots(parent, 10)
    parent.num_computed_tokens = 10
    children = []
    for i in range(3):
        c = Request(f"c{i}", list(range(10)), SamplingParams())
        bm.fork(parent, c)
        c.num_computed_tokens = 10
        children.append(c)
    assert [bm.blocks[b].ref_cnt for b in bm.block_ids("p")] == [4, 4, 4]
    assert bm.num_used_blocks == 3
    for i, r in enumerate(children):  # each child's first write copies the partial block
        r.output_token_ids.append(1)
        assert bm.allocate_slots(r, 1)
        copies = bm.take_copies()
        assert copies == [(bm.block_ids("p")[2], bm.block_ids(r.request_id)[2])]
        assert bm.block_ids(r.request_id)[:2] == bm.block_ids("p")[:2]  # full blocks stay shared
    parent.output_token_ids.append(1)
    assert bm.allocate_slots(parent, 1) and bm.take_copies() == []  # last holder writes in place
    assert bm.num_used_blocks == 6 and bm.stats.cow_copies == 3
    for r in children + [parent]:
        bm.free(r)
    bm.check_invariants()
    assert bm.num_free_blocks == 10


def test_children_count_against_max_num_seqs(tmp_path):
    """n > 1 fills at most max_num_seqs places per step, children included; a request whose
    n (or best_of) alone exceeds max_num_seqs is refused up front."""
    make_tiny_checkpoint("llama", str(tmp_path), max_position_embeddings=1024)
    llm = LLM(str(tmp_path), skip_tokenizer_init=True, dtype="float32", device="cpu",
              block_size=BS, max_model_len=256, num_kv_blocks=200, max_num_seqs=4)
    with pytest.raises(ValueError, match="best_of .* 5.*max_num_seqs \\(4\\)"):
        llm.generate({"prompt_token_ids": prompt_of(20)}, SamplingParams(n=5, max_tokens=4),
                      use_tqdm=False)
    sched = llm.llm_engine.scheduler
    assert sched.num_running == sched.num_waiting == 0
    widths = []
    real = sched.schedule

    def spy():
        out = real()
        widths.append(len(sched.running))
        return out
    sched.schedule = spy
    outs = llm.generate([{"prompt_token_ids": prompt_of(20, seed=i)} for i in range(3)],
                        SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=6, ignore_eos=True),
                        use_tqdm=False)
    assert [len(o.outputs) for o in outs] == [2, 2, 2]
    assert all(len(c.token_ids) == 6 for o in outs for c in o.outputs)
    assert max(widths) == 4  # two parents and their children; the third waits
