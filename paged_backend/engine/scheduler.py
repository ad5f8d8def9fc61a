"""Which tokens of which requests run this step, under one token budget.

Pure Python. Running requests go first, in arrival order, each asking for
the tokens it has not computed yet (one for a decoding request, a chunk of
its prompt for a prefilling one). When blocks run out the newest running
request is preempted: its blocks are freed and it goes back to the front of
the waiting queue, to be recomputed later (prefix-cache hits make that
cheap). Waiting requests are then admitted in arrival order while budget,
sequence slots and blocks last. The result is chunked prefill, prefix-cache
hits and mixed prefill+decode batches from one rule.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from paged_backend.engine.block_manager import BlockManager
from paged_backend.engine.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step: tokens [num_computed_tokens, +num_new_tokens)."""

    request: Request
    num_new_tokens: int
    num_computed_tokens: int
    block_ids: list[int]
    # True when this chunk reaches the end of the request's tokens: a token is sampled.
    samples: bool = False


@dataclass(slots=True)
class SchedulerOutput:
    """The scheduler's decision for one step; the model runner's only input."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    # (src, dst) KV block copies to make before the forward pass (copy-on-write).
    block_copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(slots=True)
class SchedulerStats:
    """Counters for the engine's stats."""

    num_preemptions: int = 0
    num_steps: int = 0
    num_chunked_prefills: int = 0  # steps where a prompt ran only partly
    num_mixed_steps: int = 0  # steps with both a decode and a prefill chunk


class Scheduler:
    """Continuous batching with one token budget per step, FIFO fairness, preemption by recompute."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.stats = SchedulerStats()
        self._num_no_overlap = 0  # unfinished requests with overlap_ok False

    # ------------------------------------------------------------------ intake
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use.")
        self.requests[request.request_id] = request
        self._num_no_overlap += not request.overlap_ok
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def add_forked(self, parent: Request, child: Request) -> None:
        """Start `child` as a running copy of `parent`, sharing its blocks (parallel sampling)."""
        if child.request_id in self.requests:
            raise ValueError(f"request id {child.request_id!r} is already in use.")
        self.bm.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens
        if child.num_cached_tokens < 0:
            child.num_cached_tokens = parent.num_cached_tokens
        child.status = RequestStatus.RUNNING
        self.requests[child.request_id] = child
        self._num_no_overlap += not child.overlap_ok
        self.running.append(child)

    @property
    def all_overlap_ok(self) -> bool:
        """True when every unfinished request may run with overlapped steps."""
        return self._num_no_overlap == 0

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---------------------------------------------------------------- schedule
    def _preempt(self, victim: Request, out: SchedulerOutput) -> None:
        self.bm.free(victim)
        victim.status = RequestStatus.PREEMPTED
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.waiting.appendleft(victim)
        out.preempted.append(victim.request_id)

    def schedule(self) -> SchedulerOutput:
        """Decide this step's batch; allocates the blocks it needs."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled_ids: set[str] = set()

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            total = req.num_tokens_with_pending
            if req.num_pending and self._surely_done(req):
                i += 1  # its pending token ends it: nothing left to compute
                continue
            if req.external and total == req.num_computed_tokens:
                i += 1  # a beam whose group waits for another beam's logits: nothing yet
                continue
            num_new = min(total - req.num_computed_tokens, budget)
            assert num_new > 0, req
            while not self.bm.allocate_slots(req, num_new):
                victim = self.running.pop()  # newest arrival goes back to waiting
                assert victim.request_id not in scheduled_ids
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(
                    req, num_new, req.num_computed_tokens, self.bm.block_ids(req.request_id),
                    req.num_computed_tokens + num_new == total))
                scheduled_ids.add(req.request_id)
                budget -= num_new
                i += 1
                continue
            break  # req itself was preempted: no room for anyone after it either

        # Admit waiting requests only when nobody was preempted (else they would thrash).
        # Places count what requests may fork into, so that no step runs more than
        # max_num_seqs sequences: a parallel-sampling parent holds one for each child it forks
        # at its first sample, a beam-search group its width while any of its beams runs.
        groups: dict[str, int] = {}
        seats = 0
        if self.waiting:
            for r in self.running:
                if r.seat_group is None:
                    seats += 1 + len(r.fork_children)
                else:
                    groups[r.seat_group[0]] = r.seat_group[1]
            seats += sum(groups.values())
        while self.waiting and budget > 0 and not out.preempted \
                and seats + _places(self.waiting[0], groups) <= self.max_num_seqs:
            req = self.waiting[0]
            hits, num_hit = self.bm.get_computed_blocks(req)
            num_new = min(req.num_tokens - num_hit, budget)
            if not self.bm.allocate_slots(req, num_new, hits):
                break
            self.waiting.popleft()
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit
            req.num_computed_tokens = num_hit
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            seats += _places(req, groups)
            if req.seat_group is not None:
                groups[req.seat_group[0]] = req.seat_group[1]
            out.scheduled.append(ScheduledRequest(req, num_new, num_hit,
                                                  self.bm.block_ids(req.request_id),
                                                  num_hit + num_new == req.num_tokens))
            budget -= num_new

        out.block_copies = self.bm.take_copies()
        self.stats.num_steps += 1
        if any(not s.samples for s in out.scheduled):
            self.stats.num_chunked_prefills += 1
        if any(s.num_new_tokens == 1 and s.num_computed_tokens > 0 for s in out.scheduled) and \
                any(s.num_new_tokens > 1 for s in out.scheduled):
            self.stats.num_mixed_steps += 1
        return out

    def _surely_done(self, req: Request) -> bool:
        """True when the request's pending token will reach max_tokens or max_model_len."""
        n_out = req.num_output_tokens + req.num_pending
        max_tokens = req.sampling_params.max_tokens
        return (max_tokens is not None and n_out >= max_tokens) \
            or req.num_tokens_with_pending >= self.max_model_len

    # ------------------------------------------------------------------ update
    def update_after_step(self, out: SchedulerOutput) -> None:
        """Mark the scheduled tokens computed and publish full blocks to the prefix cache.

        Only blocks whose token ids are all known (not pending) get hashed.
        """
        for s in out.scheduled:
            req = s.request
            if req.is_finished:  # aborted while the step ran
                continue
            req.num_computed_tokens = s.num_computed_tokens + s.num_new_tokens
            self.bm.cache_blocks(req, min(req.num_computed_tokens, req.num_tokens))

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        """End a request (stopped, length or aborted): its blocks are freed at once."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        self._num_no_overlap -= not req.overlap_ok
        assert status.is_finished
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        req.status = status
        self.bm.free(req)


def _places(req: Request, groups: dict[str, int]) -> int:
    """Places in the max_num_seqs count that admitting `req` takes, given the beam groups
    already running (`groups`: group id -> width)."""
    if req.seat_group is None:
        return 1 + len(req.fork_children)
    return 0 if req.seat_group[0] in groups else req.seat_group[1]
