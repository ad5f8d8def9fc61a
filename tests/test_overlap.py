"""The overlapped engine loop (step k+1 scheduled and launched before step k's
results are read; pending tokens fed from the device) gives exactly what the
synchronous loop gives, frees every block, and handles stops, aborts,
prefix-cache hits, preemption and the requests that must not overlap.

On CUDA the engine overlaps by itself; here it is switched on by hand, which
runs the same host logic (the CPU runner executes eagerly).
"""

from __future__ import annotations

import random

import pytest

from paged_backend import LLM, SamplingParams
from tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("overlap")
    make_tiny_checkpoint("qwen3", str(path))
    return str(path)


def make_llm(path, overlap: bool, **kw) -> LLM:
    args = dict(skip_tokenizer_init=True, dtype="float32", device="cpu", block_size=4,
                num_kv_blocks=40, max_num_batched_tokens=32, max_model_len=96)
    args.update(kw)
    llm = LLM(path, **args)
    llm.llm_engine.overlap = overlap
    return llm


def prompts(n=10, seed=0):
    rng = random.Random(seed)
    shared = [rng.randrange(200) for _ in range(12)]
    out = []
    for i in range(n):
        head = shared if i % 3 == 0 else []
        out.append(head + [rng.randrange(200) for _ in range(rng.randint(1, 30))])
    return out


def run(llm, ps, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason)
            for o in outs]


def check_clean(llm):
    eng = llm.llm_engine
    assert eng._inflight is None or all(s.request.is_finished for s in eng._inflight[0].scheduled)
    assert not eng.scheduler.requests and eng.scheduler.all_overlap_ok
    bm = eng.block_manager
    bm.check_invariants()
    assert bm.num_used_blocks == 0, "KV blocks leaked"


def test_overlap_matches_sync_greedy(ckpt):
    ps = prompts()
    params = [SamplingParams(temperature=0, max_tokens=5 + i % 7, ignore_eos=True)
              for i in range(len(ps))]
    ref_llm = make_llm(ckpt, False)
    ref = run(ref_llm, ps, params)
    llm = make_llm(ckpt, True)
    got = run(llm, ps, params)
    assert got == ref
    st = llm.get_stats()
    assert st["num_preemptions"] > 0 and st["prefix_cache_hit_tokens"] > 0
    check_clean(llm)
    # The overlapped loop really ran steps with pending tokens.
    assert llm.llm_engine.num_overlapped_steps > 0


def test_overlap_stop_tokens_and_seeded_sampling(ckpt):
    ps = prompts(8, seed=1)
    ref_llm = make_llm(ckpt, False)
    greedy = run(ref_llm, ps, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    # Stop on a token each greedy run produces mid-way: the overlapped loop learns of the
    # stop one step late and must drop the extra token it computed.
    stop_ids = sorted({g[0][4] for g in greedy})
    params = [SamplingParams(temperature=0, max_tokens=12, stop_token_ids=stop_ids),
              SamplingParams(temperature=0.8, seed=7, max_tokens=10, logprobs=2)]
    for p in params:
        ref = run(make_llm(ckpt, False), ps, p)
        llm = make_llm(ckpt, True)
        assert run(llm, ps, p) == ref
        check_clean(llm)
    assert any(r[1] == "stop" for r in run(make_llm(ckpt, True), ps, params[0]))


def test_overlap_falls_back_for_penalties_and_n(ckpt):
    ps = prompts(6, seed=2)
    for p in (SamplingParams(temperature=0, max_tokens=8, repetition_penalty=1.3),
              SamplingParams(temperature=0, max_tokens=8, min_tokens=4),
              SamplingParams(temperature=1.0, n=3, seed=3, max_tokens=6)):
        ref = make_llm(ckpt, False).generate([{"prompt_token_ids": x} for x in ps], p,
                                             use_tqdm=False)
        llm = make_llm(ckpt, True)
        got = llm.generate([{"prompt_token_ids": x} for x in ps], p, use_tqdm=False)
        assert [[c.token_ids for c in o.outputs] for o in got] == \
               [[c.token_ids for c in o.outputs] for o in ref]
        assert llm.llm_engine.num_overlapped_steps == 0
        check_clean(llm)


def test_overlap_abort_midway_frees_blocks(ckpt):
    llm = make_llm(ckpt, True)
    eng = llm.llm_engine
    ps = prompts(6, seed=3)
    for i, p in enumerate(ps):
        eng.add_request(str(i), {"prompt_token_ids": p},
                        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    finished = {}
    for k in range(300):
        for o in eng.step():
            if o.finished:
                finished[o.request_id] = o
        if k == 6:
            eng.abort_request(["1", "4"])
        if not eng.has_unfinished_requests():
            break
    assert set(finished) == {"0", "2", "3", "5"}
    assert all(len(o.outputs[0].token_ids) == 30 for o in finished.values())
    eng.step()  # reads back the last launched step, if any
    check_clean(llm)


def test_reused_request_id_gets_none_of_the_old_tokens(ckpt):
    p = prompts(1, seed=4)[0]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    ref = make_llm(ckpt, False).generate([{"prompt_token_ids": p}], sp, use_tqdm=False)
    llm = make_llm(ckpt, True)
    eng = llm.llm_engine
    eng.add_request("a", {"prompt_token_ids": p}, sp)
    for _ in range(3):
        eng.step()
    eng.abort_request("a")  # a step with "a" in it is still in flight
    eng.add_request("a", {"prompt_token_ids": p}, sp)
    final = None
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                final = o
    assert final.outputs[0].token_ids == ref[0].outputs[0].token_ids
    eng.step()
    check_clean(llm)


@pytest.mark.parametrize("overlap", [False, True])
def test_fork_rows_with_one_token_chunks(ckpt, overlap):
    # A one-token prompt that forks (two sample rows) next to a one-token chunk that samples
    # nothing: as many rows as sequences, but not row i = sequence i.
    reqs = [{"prompt_token_ids": [7]}, {"prompt_token_ids": [3, 9, 11, 5, 8]}]
    sp = [SamplingParams(temperature=0.7, n=2, seed=5, max_tokens=4),
          SamplingParams(temperature=0, max_tokens=4)]
    ref = make_llm(ckpt, False, max_num_batched_tokens=32).generate(reqs, sp, use_tqdm=False)
    got = make_llm(ckpt, overlap, max_num_batched_tokens=2).generate(reqs, sp, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in got] == \
           [[c.token_ids for c in o.outputs] for o in ref]
