"""The engine loop: schedule -> run the model -> sample -> update outputs.

`LLMEngine` is the API the offline `LLM`, the adapters and the server build
on: `add_request`, `step` (returns the `RequestOutput`s that changed),
`abort_request` (blocks freed at once), `get_stats`. A request with `n > 1`
(or `best_of > n`) runs as several sequences under one parent id.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

from paged_backend.engine.block_manager import BlockManager
from paged_backend.engine.request import Request, RequestStatus
from paged_backend.engine.scheduler import Scheduler, SchedulerOutput
from paged_backend.outputs import CompletionOutput, Logprob, RequestOutput
from paged_backend.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

PromptInput = Union[str, list[int], dict]


@dataclass(eq=False)
class _Sequence:
    """Engine-side output state of one sequence (one completion)."""

    request: Request
    index: int
    detok: Any  # IncrementalDetokenizer or None without a tokenizer
    logprobs: Optional[list[dict[int, Logprob]]]
    cumulative_logprob: float = 0.0
    sent_tokens: int = 0
    sent_text: int = 0
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None
    parent_id: str = ""


@dataclass(eq=False)
class _Parent:
    """A user request: its prompt and its sequences."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[_Sequence] = field(default_factory=list)
    prompt_logprobs: Optional[list] = None
    sent_prompt_logprobs: bool = False

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)


def _overlap_safe(p: SamplingParams) -> bool:
    """True when sampling does not read the request's own latest tokens on the host."""
    return (p.repetition_penalty == 1.0 and p.frequency_penalty == 0.0
            and p.presence_penalty == 0.0 and not p.min_tokens)


class LLMEngine:
    """Continuous-batching engine over a paged KV cache.

    Built by `LLM` (or `LLMEngine.from_args`); drives a `Scheduler` (which
    owns the `BlockManager`) and a `ModelRunner`.
    """

    def __init__(self, *, scheduler: Scheduler, runner, tokenizer, eos_token_ids: set[int],
                 vocab_size: int, max_model_len: int, detokenizer_cls=None,
                 max_logprobs: int = 20):
        self.scheduler = scheduler
        self.block_manager: BlockManager = scheduler.bm
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_logprobs = max_logprobs
        self._detokenizer_cls = detokenizer_cls
        self._parents: dict[str, _Parent] = {}
        self._seqs: dict[str, _Sequence] = {}  # internal (child) request id -> sequence
        self._counter = itertools.count()
        self._arrivals = itertools.count()
        self.num_generated_tokens = 0
        # Beam search (see paged_backend.beam_search): request id -> this step's top logprobs.
        self.beam_logprobs: dict[str, tuple] = {}
        # Overlap steps (schedule k+1 before reading k's results) where the runner is async.
        self.overlap: bool = bool(getattr(runner, "supports_overlap", False))
        self._inflight: Optional[tuple[SchedulerOutput, Any]] = None
        self.num_overlapped_steps = 0

    @classmethod
    def from_args(cls, model: Optional[str] = None, **kwargs) -> "LLMEngine":
        """Build an engine the way `LLM(...)` does, with the same arguments."""
        from paged_backend.llm import LLM
        return LLM(model, **kwargs).llm_engine

    # ------------------------------------------------------------------ intake
    def _tokenize_prompt(self, prompt: PromptInput) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                return prompt.get("prompt"), self._check_ids(ids)
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs a 'prompt' or 'prompt_token_ids' key, "
                                 f"got keys {sorted(prompt)}.")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; this engine was built with "
                                 "skip_tokenizer_init=True: pass {'prompt_token_ids': [...]}.")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            return None, self._check_ids(prompt)
        raise ValueError(f"a prompt must be a string, a list of token ids or a dict, "
                         f"got {type(prompt).__name__}.")

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        if not isinstance(ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("prompt_token_ids must be a list of integers.")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt_token_ids has token id {bad[0]} outside the vocabulary "
                             f"(size {self.vocab_size}).")
        return list(ids)

    def add_request(self, request_id: Optional[str], prompt: PromptInput,
                    params: Optional[SamplingParams] = None) -> str:
        """Queue a request; returns its id. Bad input raises ValueError and changes nothing."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}.")
        request_id = str(next(self._counter)) if request_id is None else str(request_id)
        if request_id in self._parents:
            raise ValueError(f"request id {request_id!r} is already in use.")
        text, ids = self._tokenize_prompt(prompt)
        if not ids:
            raise ValueError("the prompt is empty: give at least one token.")
        if len(ids) > self.max_model_len:
            raise ValueError(f"the prompt is {len(ids)} tokens long, longer than max_model_len "
                             f"({self.max_model_len}).")
        params = params.clone()
        params.verify()
        params.verify_vocab(self.vocab_size)
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > self.max_logprobs:
                raise ValueError(f"SamplingParams.{name} is {k}, more than max_logprobs "
                                 f"({self.max_logprobs}) allows.")
        if params.best_of > self.scheduler.max_num_seqs:
            raise ValueError(f"SamplingParams.best_of (or n) is {params.best_of}: more sequences "
                             f"than max_num_seqs ({self.scheduler.max_num_seqs}) lets a step run.")
        if params.stop and self.tokenizer is None:
            raise ValueError("SamplingParams.stop (stop strings) needs a tokenizer; this engine "
                             "was built with skip_tokenizer_init=True: use stop_token_ids.")
        if not params.ignore_eos:
            params.all_stop_token_ids |= self.eos_token_ids
        parent = _Parent(request_id, text, ids, params)
        if params.prompt_logprobs is not None:
            parent.prompt_logprobs = [None]
        arrival = next(self._arrivals)
        for i in range(params.best_of):
            child = params
            if params.best_of > 1:
                child = params.clone()
                child.n = child.best_of = 1
                if params.seed is not None:
                    child.seed = params.seed + i
                if i > 0:
                    child.prompt_logprobs = None
                if params.best_of > params.n and child.logprobs is None:
                    child.logprobs = 0  # ranking needs cumulative logprobs
            rid = request_id if params.best_of == 1 else f"{request_id}#{i}"
            req = Request(rid, ids, child, arrival_index=arrival,
                          overlap_ok=params.best_of == 1 and _overlap_safe(child))
            detok = None
            if self.tokenizer is not None and self._detokenizer_cls is not None:
                detok = self._detokenizer_cls(self.tokenizer, ids, child)
            seq = _Sequence(req, i, detok, [] if params.logprobs is not None else None,
                            parent_id=request_id)
            parent.seqs.append(seq)
        taken = [s.request.request_id for s in parent.seqs
                 if s.request.request_id in self.scheduler.requests]
        if taken:
            raise ValueError(f"request id {taken[0]!r} is already in use.")
        self._parents[request_id] = parent
        for seq in parent.seqs:
            self._seqs[seq.request.request_id] = seq
        # The first sequence prefills the prompt; the others fork from it then, sharing its blocks.
        first = parent.seqs[0].request
        first.fork_children = [seq.request for seq in parent.seqs[1:]]
        self.scheduler.add_request(first)
        return request_id

    def abort_request(self, request_ids: Union[str, Sequence[str]]) -> None:
        """Stop requests now; their KV blocks go back to the pool at once."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for rid in request_ids:
            parent = self._parents.pop(rid, None)
            if parent is None:
                continue
            for seq in parent.seqs:
                if seq.finish_reason is None:
                    seq.finish_reason = "abort"
                self._release(seq, RequestStatus.FINISHED_ABORTED)

    def _release(self, seq: _Sequence, status: RequestStatus) -> None:
        rid = seq.request.request_id
        if self._seqs.pop(rid, None) is not None:
            self.scheduler.finish_request(rid, status)
            self.runner.free_request(rid)

    def finish_external(self, request_id: str) -> None:
        """End a request driven from outside (a beam); its blocks are freed at once."""
        self.scheduler.finish_request(request_id, RequestStatus.FINISHED_STOPPED)
        self.runner.free_request(request_id)
        self.beam_logprobs.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    def get_num_unfinished_requests(self) -> int:
        return len(self._parents)

    # -------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Run one engine step; return the outputs of requests that changed (per their output_kind).

        On CUDA the engine overlaps: it schedules and launches step k, then
        reads step k-1's results while step k runs, so the outputs a call
        returns are those of the previous launch. Requests whose sampling
        reads their own latest tokens (penalties, min_tokens), parallel
        sampling and beam search run without overlap.
        """
        outputs: list[RequestOutput] = []
        prev, self._inflight = self._inflight, None
        overlap = self.overlap and self.scheduler.all_overlap_ok
        if prev is not None and not overlap:
            outputs += self._process(*prev)
            prev = None
        sched = self.scheduler.schedule()
        cur = None
        if not sched.is_empty:
            try:
                cur = (sched, self.runner.launch(sched))
            except BaseException:
                self._inflight = prev  # its results are still read by the next call
                raise
            for s in sched.scheduled:
                if s.samples:
                    s.request.num_pending += 1
            self.scheduler.update_after_step(sched)
        if prev is not None:
            outputs += self._process(*prev)
        if cur is not None:
            if overlap:
                self._inflight = cur
                self.num_overlapped_steps += 1
            else:
                outputs += self._process(*cur)
        return outputs

    def _process(self, sched: SchedulerOutput, handle) -> list[RequestOutput]:
        """Read a launched step's results: append tokens, check stops, build outputs."""
        res = handle.result()
        touched: dict[str, _Parent] = {}
        for s in sched.scheduled:
            req = s.request
            if s.samples:
                req.num_pending -= 1
            if req.external:  # a beam: its driver reads the logprobs and decides the token
                if req.request_id in res.sampled and not req.is_finished:
                    self.beam_logprobs[req.request_id] = res.logprobs[req.request_id]
                continue
            seq = self._seqs.get(req.request_id)
            if seq is None or seq.request is not req:
                continue  # finished or aborted while the step ran (its id may be reused)
            parent = self._parents[seq.parent_id]
            plp = res.prompt_logprobs.get(req.request_id)
            if plp is not None and parent.prompt_logprobs is not None:
                parent.prompt_logprobs.extend(self._to_logprob_dicts(plp))
            tok = res.sampled.get(req.request_id)
            if tok is None:
                continue
            family = [req]
            if req.fork_children:
                family += req.fork_children
                for child in req.fork_children:
                    self.scheduler.add_forked(req, child)
                req.fork_children = []
            for r in family:
                self._append_token(self._seqs[r.request_id], res.sampled[r.request_id],
                                   res.logprobs.get(r.request_id))
            if parent.params.output_kind is RequestOutputKind.FINAL_ONLY and not parent.finished:
                continue  # nothing to report until it ends
            touched[parent.request_id] = parent
        outputs = []
        for parent in touched.values():
            out = self._make_output(parent)
            if out is not None:
                outputs.append(out)
            if parent.finished:
                self._parents.pop(parent.request_id, None)
        return outputs

    def _to_logprob_dicts(self, items) -> list[dict[int, Logprob]]:
        out = []
        for ids, lps, rank in items:
            d: dict[int, Logprob] = {}
            for j, (t, lp) in enumerate(zip(ids, lps)):
                if t in d:
                    continue
                d[t] = Logprob(lp, rank if j == 0 else j, self._decode_token(t))
            out.append(d)
        return out

    def _decode_token(self, token_id: int) -> Optional[str]:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([token_id])

    def _append_token(self, seq: _Sequence, tok: int, lp) -> None:
        req = seq.request
        sp = req.sampling_params
        req.output_token_ids.append(tok)
        self.num_generated_tokens += 1
        if lp is not None:
            seq.cumulative_logprob += lp[1][0]
            if seq.logprobs is not None:
                seq.logprobs.extend(self._to_logprob_dicts([lp]))

        status: Optional[RequestStatus] = None
        n_out = req.num_output_tokens
        min_ok = n_out >= sp.min_tokens
        token_stop = min_ok and tok in sp.all_stop_token_ids
        if token_stop:
            status = RequestStatus.FINISHED_STOPPED
            seq.stop_reason = tok if tok in sp.stop_token_ids else None
        if seq.detok is not None:
            stop_str = seq.detok.update([tok], stop_terminated=token_stop)
            if stop_str is not None and status is None:
                status = RequestStatus.FINISHED_STOPPED
                seq.stop_reason = stop_str
        if status is None:
            max_tokens = sp.max_tokens if sp.max_tokens is not None else self.max_model_len
            if n_out >= max_tokens or req.num_tokens >= self.max_model_len:
                status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            seq.finish_reason = status.finish_reason
            self._release(seq, status)

    # ----------------------------------------------------------------- outputs
    def _completion(self, seq: _Sequence, delta: bool, finished: bool) -> CompletionOutput:
        req = seq.request
        text = ""
        if seq.detok is not None:
            text = seq.detok.get_next_output_text(finished, delta)
        ids = req.output_token_ids
        lps = seq.logprobs
        if delta:
            ids = ids[seq.sent_tokens:]
            lps = lps[seq.sent_tokens:] if lps is not None else None
            seq.sent_tokens = req.num_output_tokens
        else:
            ids = list(ids)
            lps = list(lps) if lps is not None else None
        cum = seq.cumulative_logprob if seq.logprobs is not None else None  # as vLLM V1
        return CompletionOutput(seq.index, text, ids, cum, lps, seq.finish_reason, seq.stop_reason)

    def _make_output(self, parent: _Parent) -> Optional[RequestOutput]:
        kind = parent.params.output_kind
        finished = parent.finished
        if (kind == RequestOutputKind.FINAL_ONLY or parent.params.best_of > parent.params.n) \
                and not finished:
            return None
        delta = kind == RequestOutputKind.DELTA
        seqs = parent.seqs
        if parent.params.best_of > parent.params.n:
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)[:parent.params.n]
        outs = [self._completion(s, delta, s.finish_reason is not None) for s in seqs]
        if parent.params.best_of > parent.params.n:
            for i, o in enumerate(outs):
                o.index = i
        plp = parent.prompt_logprobs
        if delta and plp is not None:
            plp = None if parent.sent_prompt_logprobs else plp
            parent.sent_prompt_logprobs = True
        first = parent.seqs[0].request
        num_cached = max(first.num_cached_tokens, 0)
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, plp, outs,
                             finished, num_cached_tokens=num_cached)

    def iter_outputs(self) -> Iterator[RequestOutput]:
        """Step until every request is done, yielding outputs as they come (streaming)."""
        while self.has_unfinished_requests():
            yield from self.step()

    # ------------------------------------------------------------------- stats
    def get_stats(self) -> dict[str, Any]:
        """Counters of the KV pool, the prefix cache and the queues."""
        bm, st = self.block_manager, self.scheduler.stats
        return {
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_used": bm.num_used_blocks,
            "kv_blocks_free": bm.num_free_blocks,
            "kv_blocks_peak": bm.stats.peak_used,
            "kv_blocks_cached": bm.num_cached_blocks,
            "block_size": bm.block_size,
            "prefix_cache_queries": bm.stats.prefix_cache_queries,
            "prefix_cache_hit_tokens": bm.stats.prefix_cache_hit_tokens,
            "kv_cow_copies": bm.stats.cow_copies,
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "num_preemptions": st.num_preemptions,
            "num_steps": st.num_steps,
            "num_chunked_prefill_steps": st.num_chunked_prefills,
            "num_mixed_steps": st.num_mixed_steps,
            "num_overlapped_steps": self.num_overlapped_steps,
            "num_cuda_graphs": self.runner.num_cuda_graphs,
            "num_prefill_graphs": getattr(self.runner, "num_prefill_graphs", 0),
            "num_generated_tokens": self.num_generated_tokens,
        }

    def reset_stats(self) -> None:
        """Zero the counters; the peak restarts from the blocks in use now."""
        bm = self.block_manager
        bm.stats.peak_used = bm.num_used_blocks
        bm.stats.prefix_cache_queries = bm.stats.prefix_cache_hit_tokens = bm.stats.cow_copies = 0
        st = self.scheduler.stats
        st.num_preemptions = st.num_steps = st.num_chunked_prefills = st.num_mixed_steps = 0
        self.num_overlapped_steps = 0
        self.num_generated_tokens = 0
