"""Block manager and scheduler under random workloads, with no model (pure Python).

A fake KV store records which token each slot holds; every step checks that
each scheduled request's whole context reads back its own tokens through its
block table. That catches a shared block written by two owners, a prefix hit
on the wrong block, or a block reused while still held.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paged_backend.engine.block_manager import BlockManager, hash_block
from paged_backend.engine.request import Request, RequestStatus
from paged_backend.engine.scheduler import Scheduler
from paged_backend.sampling_params import SamplingParams


def make_req(rid, prompt, arrival=0, max_tokens=4):
    return Request(str(rid), list(prompt), SamplingParams(max_tokens=max_tokens), arrival_index=arrival)


class Sim:
    """Drives a Scheduler like the engine does, with a fake model that writes token ids as KV."""

    def __init__(self, num_blocks, block_size, budget, max_seqs, max_len=10_000, prefix=True):
        self.bm = BlockManager(num_blocks, block_size, prefix)
        self.sched = Scheduler(self.bm, max_seqs, budget, max_len)
        self.store = {}
        self.admitted = []
        self.finished = set()
        self.max_tokens = {}

    def add(self, req):
        self.max_tokens[req.request_id] = req.sampling_params.max_tokens
        self.sched.add_request(req)

    def step(self, rng=None):
        out = self.sched.schedule()
        bs = self.bm.block_size
        assert out.num_batched_tokens <= self.sched.max_num_batched_tokens
        assert len(self.sched.running) <= self.sched.max_num_seqs
        for s in out.scheduled:
            req = s.request
            if s.num_computed_tokens == req.num_cached_tokens and req.request_id not in self.admitted:
                self.admitted.append(req.request_id)
            table = s.block_ids
            end = s.num_computed_tokens + s.num_new_tokens
            assert len(table) * bs >= end
            # Blocks this request writes to must not be shared with anyone.
            for p in range(s.num_computed_tokens, end):
                blk = table[p // bs]
                assert self.bm.blocks[blk].ref_cnt == 1, "write into a shared block"
                self.store[blk * bs + p % bs] = req.token_id(p)
            for p in range(end):  # read back the whole context
                assert self.store.get(table[p // bs] * bs + p % bs) == req.token_id(p)
        self.sched.update_after_step(out)
        for s in out.scheduled:
            req = s.request
            if s.samples and not req.is_finished:
                req.output_token_ids.append(7 + len(req.output_token_ids) % 5)
                if req.num_output_tokens >= self.max_tokens[req.request_id]:
                    self.sched.finish_request(req.request_id, RequestStatus.FINISHED_LENGTH)
                    self.finished.add(req.request_id)
        self.bm.check_invariants()
        return out


# ------------------------------------------------------------------ block manager
def test_hash_is_chained():
    a = hash_block(None, [1, 2])
    assert hash_block(a, [3, 4]) != hash_block(hash_block(None, [9, 9]), [3, 4])
    assert hash_block(None, [1, 2]) == a


def test_prefix_hit_shares_blocks_and_leaves_one_token():
    bm = BlockManager(16, 4)
    a = make_req("a", range(12))
    assert bm.allocate_slots(a, 12)
    a.num_computed_tokens = 12
    bm.cache_blocks(a, 12)
    b = make_req("b", list(range(8)) + [99, 98])
    hits, n = bm.get_computed_blocks(b)
    assert n == 8 and hits == bm.block_ids("a")[:2]
    # The whole prompt cached: the last block is left out so one token is computed.
    c = make_req("c", range(12))
    hits, n = bm.get_computed_blocks(c)
    assert n == 8
    assert bm.allocate_slots(b, 2, hits[:2])
    assert [bm.blocks[x].ref_cnt for x in bm.block_ids("b")[:2]] == [2, 2]
    bm.free(a)
    bm.free(b)
    bm.check_invariants()
    assert bm.num_free_blocks == 16
    # Freed blocks keep their hashes until reused (lazy eviction).
    hits, n = bm.get_computed_blocks(make_req("d", range(12)))
    assert n == 8


def test_eviction_reuses_lru_and_drops_hash():
    bm = BlockManager(3, 2)
    a = make_req("a", [1, 2, 3, 4, 5])
    assert bm.allocate_slots(a, 5)
    bm.cache_blocks(a, 5)
    bm.free(a)
    assert bm.num_cached_blocks == 2
    b = make_req("b", [9, 9, 9, 9, 9, 9])
    assert bm.allocate_slots(b, 6)  # needs all three blocks: both cached ones are evicted
    assert bm.num_cached_blocks == 0
    assert not bm.allocate_slots(make_req("c", [1]), 1)
    bm.check_invariants()


def test_allocate_fails_without_change():
    bm = BlockManager(2, 4)
    a = make_req("a", range(20))
    assert not bm.allocate_slots(a, 20)
    assert bm.num_free_blocks == 2 and bm.block_ids("a") == []


# --------------------------------------------------------------------- scheduler
def test_chunked_prefill_under_budget():
    sim = Sim(num_blocks=64, block_size=4, budget=8, max_seqs=4)
    sim.add(make_req("a", range(30), max_tokens=2))
    chunks = []
    while sim.sched.has_unfinished():
        out = sim.step()
        chunks.append([s.num_new_tokens for s in out.scheduled])
    assert chunks[:4] == [[8], [8], [8], [6]]
    assert sim.sched.stats.num_chunked_prefills == 3
    assert sim.bm.num_used_blocks == 0


def test_preemption_by_recompute_and_resume():
    sim = Sim(num_blocks=6, block_size=4, budget=64, max_seqs=8, prefix=False)
    for i in range(3):
        sim.add(make_req(i, [i] * 7, arrival=i, max_tokens=10))
    for _ in range(200):
        if not sim.sched.has_unfinished():
            break
        sim.step()
    assert sim.finished == {"0", "1", "2"}
    assert sim.sched.stats.num_preemptions > 0
    assert sim.bm.num_used_blocks == 0


def test_fifo_admission():
    sim = Sim(num_blocks=8, block_size=4, budget=16, max_seqs=2)
    for i in range(6):
        sim.add(make_req(i, range(100 * i, 100 * i + 5), arrival=i, max_tokens=3))
    while sim.sched.has_unfinished():
        sim.step()
    assert sim.admitted == [str(i) for i in range(6)]


def test_parallel_sampling_parents_hold_places_for_their_children():
    """A parent admitted with k fork children counts as 1 + k sequences from admission on, so
    a step never runs more than max_num_seqs sequences once the children fork."""
    sched = Scheduler(BlockManager(64, 4, True), 4, 64, 10_000)
    parent = make_req("p", range(5), arrival=0)
    children = [make_req(f"p#{i}", range(5), arrival=0) for i in (1, 2)]
    parent.fork_children = list(children)
    sched.add_request(parent)
    others = [make_req(i, range(10 * i, 10 * i + 5), arrival=i) for i in range(1, 4)]
    for r in others:
        sched.add_request(r)
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["p", "1"]  # 3 + 1 places
    sched.update_after_step(out)
    parent.output_token_ids.append(7)
    others[0].output_token_ids.append(7)
    for child in children:  # as the engine does at the parent's first sample
        sched.add_forked(parent, child)
        child.output_token_ids.append(9)
    parent.fork_children = []
    out = sched.schedule()
    assert sorted(s.request.request_id for s in out.scheduled) == ["1", "p", "p#1", "p#2"]
    assert len(sched.running) == 4

    # A request at the head of the queue that needs more places than are free waits (FCFS).
    sched = Scheduler(BlockManager(64, 4, True), 4, 64, 10_000)
    sched.add_request(make_req(0, range(5), arrival=0))
    wide = make_req("w", range(20, 25), arrival=1)
    wide.fork_children = [make_req(f"w#{i}", range(20, 25), arrival=1) for i in (1, 2, 3)]
    sched.add_request(wide)
    sched.add_request(make_req(2, range(40, 45), arrival=2))
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["0"]


def test_abort_frees_blocks_at_once():
    sim = Sim(num_blocks=32, block_size=4, budget=64, max_seqs=8)
    sim.add(make_req("a", range(20), max_tokens=50))
    sim.add(make_req("b", range(20), max_tokens=50))
    sim.step()
    used = sim.bm.num_used_blocks
    assert used > 0
    sim.sched.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert sim.bm.num_used_blocks < used
    sim.sched.finish_request("b", RequestStatus.FINISHED_ABORTED)
    assert sim.bm.num_used_blocks == 0 and not sim.sched.has_unfinished()


def test_duplicate_id_rejected():
    sim = Sim(num_blocks=8, block_size=4, budget=8, max_seqs=2)
    sim.add(make_req("a", [1]))
    with pytest.raises(ValueError, match="already in use"):
        sim.add(make_req("a", [2]))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), block_size=st.sampled_from([1, 2, 4, 16]),
       budget=st.integers(1, 64), max_seqs=st.integers(1, 6), prefix=st.booleans(),
       num_reqs=st.integers(1, 10))
def test_random_workload_invariants(seed, block_size, budget, max_seqs, prefix, num_reqs):
    rng = random.Random(seed)
    max_len = 48
    num_blocks = -(-max_len // block_size) + rng.randint(0, 12)
    sim = Sim(num_blocks, block_size, budget, max_seqs, max_len=max_len, prefix=prefix)
    shared = [rng.randint(0, 50) for _ in range(20)]
    reqs = []
    for i in range(num_reqs):
        plen = rng.randint(1, 30)
        prompt = (shared[:rng.randint(0, 20)] + [rng.randint(0, 50) for _ in range(plen)])[:40]
        reqs.append(make_req(i, prompt or [1], arrival=i,
                             max_tokens=min(rng.randint(1, 8), max_len - len(prompt or [1]))))
    pending = list(reqs)
    aborted = set()
    for _ in range(2000):
        if pending and rng.random() < 0.5:
            sim.add(pending.pop(0))
        if not sim.sched.has_unfinished() and not pending:
            break
        if sim.sched.has_unfinished():
            sim.step()
        if rng.random() < 0.05 and sim.sched.requests:
            victim = rng.choice(sorted(sim.sched.requests))
            sim.sched.finish_request(victim, RequestStatus.FINISHED_ABORTED)
            aborted.add(victim)
            sim.bm.check_invariants()
        for b in sim.bm.blocks:
            assert b.ref_cnt >= 0
    assert not sim.sched.has_unfinished() and not pending
    assert sim.finished | aborted == {r.request_id for r in reqs}
    assert sim.bm.num_used_blocks == 0, "blocks leaked"
    assert sim.bm.num_free_blocks == num_blocks
