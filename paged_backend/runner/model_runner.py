"""Turns a `SchedulerOutput` into tensors, runs the model, samples.

The runner owns the KV cache (one allocation, a view per layer), the decode
CUDA graphs and the per-request random generators of seeded requests.

`launch(sched)` builds the step's inputs on the host with numpy into
(pinned, double-buffered) staging arrays, copies them to the device in two
transfers (a decode-graph step on CUDA: one kernel that reads the pinned
arrays itself, kernels/host_io.py), runs the forward pass (replaying a
captured graph for decode steps), computes logits only where they are needed
(the last token of a sequence that samples, and prompt positions whose
logprobs were asked for), samples, and queues the results' copies to host
memory (plain greedy rows: the model writes the tokens to pinned memory). It returns a
`StepHandle` without waiting for the GPU; `StepHandle.result()` waits and
returns plain Python results. So the engine can schedule and prepare step
k+1 while step k runs.

A token sampled by the previous step whose value the host has not read yet
(a request's "pending" token, see `Request.num_pending`) is fed to the next
step from the device: the host writes a placeholder and the step gathers
the value from the previous step's sampled-token tensor (the staging kernel
does it on the way).
"""

from __future__ import annotations

import collections
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from paged_backend.engine.scheduler import SchedulerOutput
from paged_backend.layers.attention import AttentionMetadata
from paged_backend.layers.sampler import (LogprobsTensors, Sampler, SamplingMetadata,
                                          SamplingRow, compute_logprobs_tensors)
from paged_backend.runner.cuda_graphs import DecodeGraphs
from paged_backend.runner.dummy_batch import prefill_batch
from paged_backend.runner.prefill_graphs import PrefillGraphs

logger = logging.getLogger(__name__)

# Prompt logprobs are computed over at most this many positions at a time: a slice's
# logits, float32 log-softmax and rank mask (~10 B a position and vocabulary entry, 0.7 GB
# at Qwen3's 151,936) are part of the memory profile that sizes the KV pool
# (runner/dummy_batch.py).
LOGPROB_ROWS = 512

# (token ids, logprobs, rank of the first id): column 0 is the chosen token, then the top-k.
TokenLogprobs = tuple[list[int], list[float], int]


@dataclass(slots=True)
class ModelRunnerOutput:
    """Per request id: the sampled token, its logprobs (rows that asked), prompt logprobs of this chunk."""

    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)


@dataclass(slots=True)
class StepHandle:
    """A launched step: its results are being copied to host memory.

    `result()` waits for the copies (not for later steps) and converts them.
    """

    row_reqs: list[str]
    sampled: Optional[torch.Tensor]  # [rows] int64, host
    logprobs: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # host
    logprob_ks: list[Optional[int]]
    prompt_logprobs: list[tuple[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor], int, int]]
    event: Optional[torch.cuda.Event] = None
    _out: Optional[ModelRunnerOutput] = None

    def result(self) -> ModelRunnerOutput:
        if self._out is not None:
            return self._out
        if self.event is not None:
            self.event.synchronize()
        out = ModelRunnerOutput()
        if self.sampled is not None:
            out.sampled = dict(zip(self.row_reqs, self.sampled.tolist()))
        if self.logprobs is not None:
            ids_l, lps_l, ranks_l = (t.tolist() for t in self.logprobs)
            for r, (rid, k) in enumerate(zip(self.row_reqs, self.logprob_ks)):
                if k is not None:
                    out.logprobs[rid] = (ids_l[r][:k + 1], lps_l[r][:k + 1], ranks_l[r])
        for rid, tensors, cnt, k in self.prompt_logprobs:
            ids_l, lps_l, ranks_l = (t.tolist() for t in tensors)
            out.prompt_logprobs[rid] = [(ids_l[j][:k + 1], lps_l[j][:k + 1], ranks_l[j])
                                        for j in range(cnt)]
        self._out = out
        return out


# The share of a decode batch's rows that decode_row_order moves to the end.
DECODE_TAIL_FRACTION = 0.25


def decode_row_order(scheduled: list, tail_fraction: float = DECODE_TAIL_FRACTION) -> list:
    """A pure-decode batch's rows (`ScheduledRequest`s) in the order the CUDA decode
    attention runs fastest: the scheduler's order, then the `tail_fraction` shortest
    contexts, longest of them first.

    `batch_decode` (kernels/batch_decode.py) launches its programs in row order and the
    GPU starts each as an earlier one ends, so the last rows' programs run on while the
    SMs of finished ones idle: short programs there shorten the kernel's tail. On the
    H100 (BENCHMARKS.md): bucket-64 decode graphs 1.5% faster, bench-64 +1.4%. Ordering
    the whole batch by length loses: programs of equal length end together, and the SMs
    restart in waves. Results are looked up by request id, so no request's tokens change,
    except that an unseeded sampled row draws the noise of the row it lands on (same
    distribution; seeded requests have their own generators)."""
    n = len(scheduled)
    k = int(n * tail_fraction)
    if k == 0:
        return scheduled
    by_len = sorted(range(n), key=lambda i: scheduled[i].num_computed_tokens)
    tail = by_len[:k]
    moved = set(tail)
    return ([s for i, s in enumerate(scheduled) if i not in moved]
            + [scheduled[i] for i in reversed(tail)])


def _round16(n: int) -> int:
    return -(-n // 16) * 16


def _plain_greedy(p) -> bool:
    """A row the sampler would reduce to argmax: greedy, no logprobs, no logits processing."""
    return (p.temperature < 1e-5 and p.logprobs is None and not p.logit_bias
            and p.repetition_penalty == 1.0 and p.frequency_penalty == 0.0
            and p.presence_penalty == 0.0 and not p.min_tokens)


class _Staging:
    """Two alternating sets of host arrays for a step's int64 and int32 inputs.

    On CUDA they are pinned and a set is reused only after the copies that
    read it last time have run (an event per set).
    """

    def __init__(self, device: torch.device) -> None:
        self.pin = device.type == "cuda"
        self._bufs: list[list[Optional[torch.Tensor]]] = [[None, None], [None, None]]
        self._events: list[Optional[torch.cuda.Event]] = [None, None]
        self._i = 0

    def take(self, n64: int, n32: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._i ^= 1
        ev = self._events[self._i]
        if ev is not None:
            ev.synchronize()
        bufs = self._bufs[self._i]
        for j, (n, dt) in enumerate(((n64, torch.int64), (n32, torch.int32))):
            if bufs[j] is None or bufs[j].numel() < n:
                bufs[j] = torch.empty(max(n, 1024) * 2, dtype=dt, pin_memory=self.pin)
        return bufs[0][:n64], bufs[1][:n32]

    def copied(self) -> None:
        """Record that the copies reading the current set are queued."""
        if self.pin:
            ev = self._events[self._i] or torch.cuda.Event()
            ev.record()
            self._events[self._i] = ev


@dataclass(slots=True)
class _Inputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: Optional[AttentionMetadata]
    graph_bucket: int  # 0: eager
    sample_idx: Optional[torch.Tensor]  # None: the first num_rows hidden rows, in order
    prefill_bucket: int = 0  # a one-sequence prefill graph's token count (0: none)


class ModelRunner:
    """Runs one model on one device over a paged KV cache."""

    def __init__(self, model: torch.nn.Module, *, num_layers: int, num_kv_heads: int,
                 head_dim: int, num_blocks: int, block_size: int, vocab_size: int,
                 device: torch.device, dtype: torch.dtype, seed: int = 0) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.num_kv_heads = num_kv_heads
        self.vocab_size = vocab_size
        self.kv_cache = torch.zeros((num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim),
                                    dtype=dtype, device=device)
        self.kv_caches = [self.kv_cache[i] for i in range(num_layers)]
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        self.sampler = Sampler(gen)
        self._generators: dict[str, torch.Generator] = {}
        self._staging = _Staging(device)
        self.graphs: Optional[DecodeGraphs] = None
        self.prefill_graphs: Optional[PrefillGraphs] = None
        self._graph_pool: Any = None  # the memory pool both kinds of graphs are captured into
        # The previous step's sampled tokens (device) and each request's row in it.
        self._last_sampled: Optional[torch.Tensor] = None
        self._last_rows: dict[str, int] = {}
        self._stage_ok: Optional[bool] = None  # decode inputs through kernels/host_io.py
        # Pinned outputs that kernels write directly, with the event after the write.
        self._host_writes: collections.deque = collections.deque()
        # Row counts the LM head runs at (set by warm_up_kernels; empty: as many rows as
        # are sampled). See _head_rows.
        self._head_sizes: list[int] = []
        # Pure-decode batches run in decode_row_order (for the CUDA decode attention).
        self.reorder_decode_rows = device.type == "cuda"

    @property
    def supports_overlap(self) -> bool:
        """True when a launched step runs asynchronously (CUDA), so overlapping pays."""
        return self.device.type == "cuda"

    @property
    def num_cuda_graphs(self) -> int:
        """Decode graphs captured (0: every step runs eagerly)."""
        return len(self.graphs.buckets) if self.graphs is not None else 0

    @property
    def num_prefill_graphs(self) -> int:
        """One-sequence prefill graphs captured (0: prefills run eagerly)."""
        return len(self.prefill_graphs.buckets) if self.prefill_graphs is not None else 0

    @staticmethod
    def kv_bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                           dtype: torch.dtype) -> int:
        """Bytes of K and V for one block across all layers."""
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def capture_decode_graphs(self, max_batch_size: int, max_model_len: int) -> None:
        """Capture CUDA graphs of decode steps for batch sizes up to `max_batch_size`."""
        self.graphs = DecodeGraphs(
            self.model, self.kv_caches, max_batch_size=max_batch_size,
            max_blocks_per_seq=-(-max_model_len // self.block_size), block_size=self.block_size,
            max_model_len=max_model_len, num_kv_heads=self.num_kv_heads, device=self.device)
        self._graph_pool = self.graphs.capture(self._graph_pool)
        self._stage_kernel()  # compile the input-staging kernel now, not in the first step

    def capture_prefill_graphs(self, max_tokens: int, max_model_len: int) -> None:
        """Capture CUDA graphs of one sequence's prefill for up to `max_tokens` new tokens."""
        self.prefill_graphs = PrefillGraphs(
            self.model, self.kv_caches, max_tokens=max_tokens,
            max_blocks_per_seq=-(-max_model_len // self.block_size), block_size=self.block_size,
            max_model_len=max_model_len, device=self.device)
        self._graph_pool = self.prefill_graphs.capture(self._graph_pool)

    @torch.inference_mode()
    def warm_up_kernels(self, max_model_len: int, prefill_lens: Sequence[int] = (),
                        head_sizes: Sequence[int] = ()) -> None:
        """Compile the eager path's kernel variants now rather than in the middle of a run.

        One forward per extend-kernel tile configuration (new tokens 2..64 after a short
        cached prefix) and the decode kernel with and without splits (with the one-row
        greedy LM head after it). Then, given `prefill_lens` (runner/dummy_batch.py), the
        largest prefill step; and, given `head_sizes`, the LM head at each of those row
        counts, which from then on are the counts it runs at (see `_head_rows`). The first
        real step of each would otherwise pay for the allocator's growth and cuBLAS's first
        use of those shapes (4-6 ms a new LM-head row count on an H100). Slots are -1, so
        nothing is written to the KV cache; the outputs are discarded.
        """
        dev = self.device
        bs = self.block_size
        greedy = getattr(self.model, "greedy_tokens", None)
        # (new tokens, context including them)
        for q, seq in [(2, 18), (4, 20), (8, 24), (16, 32), (32, 48), (64, 80), (1, 16),
                       (1, 2048)]:
            seq = min(seq, max_model_len)
            q = min(q, seq)
            nb = _round16(-(-seq // bs))
            meta = AttentionMetadata(
                num_tokens=q, query_start_loc=torch.tensor([0, q], dtype=torch.int32, device=dev),
                seq_lens=torch.tensor([seq], dtype=torch.int32, device=dev),
                slot_mapping=torch.full((q,), -1, dtype=torch.int64, device=dev),
                block_tables=torch.zeros((1, nb), dtype=torch.int32, device=dev),
                max_query_len=q, max_seq_len=seq, block_size=bs,
                query_start_loc_cpu=[0, q], seq_lens_cpu=[seq])
            positions = torch.arange(seq - q, seq, dtype=torch.int64, device=dev)
            hidden = self.model(torch.zeros(q, dtype=torch.int64, device=dev), positions,
                                self.kv_caches, meta)
            if q == 1 and greedy is not None:  # the one-row greedy LM head (compiled at first use)
                greedy(hidden[-1:])
        if prefill_lens:
            ids, positions, meta, _ = prefill_batch(list(prefill_lens), bs, dev, write_kv=False)
            hidden = self.model(ids, positions, self.kv_caches, meta)
        self._head_sizes = sorted(set(head_sizes))
        for m in self._head_sizes:
            h = hidden[:m] if m <= len(hidden) else hidden.new_zeros((m, hidden.shape[1]))
            if greedy is not None and m > 1:
                greedy(h)
            else:
                self.model.compute_logits(h)
        del hidden
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def free_request(self, request_id: str) -> None:
        """Forget a finished request's generator."""
        self._generators.pop(request_id, None)

    def _generator(self, request_id: str, seed: Optional[int]) -> Optional[torch.Generator]:
        if seed is None:
            return None
        gen = self._generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
            self._generators[request_id] = gen
        return gen

    def _stage_kernel(self) -> bool:
        """Whether decode-graph steps stage their inputs with `host_io.stage_inputs` (CUDA,
        the kernel compiles, the pinned staging arrays are device-mapped, and
        PAGED_BACKEND_STREAM_GEMV is not "0"); else they queue three copies."""
        if self._stage_ok is None:
            ok = False
            if self.device.type == "cuda" and os.environ.get("PAGED_BACKEND_STREAM_GEMV", "1") != "0":
                from paged_backend.kernels import host_io
                probe = torch.empty(1, dtype=torch.int64, pin_memory=True)
                ok = host_io.stage_supported(self.device) and host_io.host_pointer(probe) is not None
            self._stage_ok = ok
        return self._stage_ok

    def _to_device(self, values: list[int]) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        return t.to(self.device, non_blocking=True)

    def _head_rows(self, hidden: torch.Tensor, inp: _Inputs, n: int) -> torch.Tensor:
        """The hidden rows the LM head runs on: the step's `n` sampled rows, followed by
        padding rows up to the next of `_head_sizes` (on CUDA, the decode graphs' buckets).

        cuBLAS picks a kernel per row count and loads it on first use, so an LM head run at
        whatever count a step samples stalled the first step at each new count (4-6 ms
        once each); padded, it sees only counts warmed up at start-up. The
        extra rows cost nothing in a memory-bound GEMM; callers keep the first `n`."""
        m = next((b for b in self._head_sizes if b >= n), n)
        if inp.sample_idx is None:
            if hidden.shape[0] >= m:  # a graph's output holds its bucket's rows
                return hidden[:m]
            h = hidden[:n]
        else:
            h = hidden.index_select(0, inp.sample_idx)
        return h if m == n else torch.nn.functional.pad(h, (0, 0, 0, m - n))

    def _hold_until_written(self, host: torch.Tensor) -> None:
        """Keep a pinned tensor that a queued kernel writes over PCIe alive until the stream
        has passed that kernel. torch's pinned-memory cache knows of copies into a block, not
        of kernels writing it: were the step's handle dropped early (an exception), the block
        could be handed out again and written by the late kernel."""
        ev = torch.cuda.Event()
        ev.record()
        held = self._host_writes
        held.append((ev, host))
        while held and held[0][0].query():
            held.popleft()

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        """Queue a device->host copy into pinned memory (read after the step's event)."""
        if self.device.type != "cuda":
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    # ----------------------------------------------------------------- inputs
    def _token_ids(self, reqs: list, ctx: list[int], qlens: list[int],
                   decode: bool) -> tuple[list[int], list[int], list[int]]:
        """The step's token ids, and for each pending token (sampled by the last step, not
        read back yet; a 0 stands in for it) its flat index and its row in that step's output."""
        tokens: list[int] = []
        dst: list[int] = []
        src: list[int] = []
        last_rows = self._last_rows
        if decode:
            for i, (r, c) in enumerate(zip(reqs, ctx)):
                if c < r.num_tokens:
                    tokens.append(r.token_id(c))
                else:
                    tokens.append(0)
                    dst.append(i)
                    src.append(last_rows[r.request_id])
            return tokens, dst, src
        off = 0
        for r, c, q in zip(reqs, ctx, qlens):
            known = min(c + q, r.num_tokens)
            if known > c:
                tokens.extend(r.token_slice(c, known))
            for p in range(known, c + q):
                tokens.append(0)
                dst.append(off + p - c)
                src.append(last_rows[r.request_id])
            off += q
        return tokens, dst, src

    def _prepare(self, sch: list, sample_rows: list[int]) -> _Inputs:
        """Host arrays -> device tensors (two copies), or the graph's static buffers, for
        the scheduled rows `sch` in that order."""
        nseq = len(sch)
        bs = self.block_size
        reqs = [s.request for s in sch]
        qlens = [s.num_new_tokens for s in sch]
        ctx = [s.num_computed_tokens for s in sch]
        num_tokens = sum(qlens)
        decode = num_tokens == nseq
        graphs = self.graphs
        num_rows = len(sample_rows)
        bucket = 0
        if decode and graphs is not None and nseq <= graphs.max_batch_size:
            bucket = graphs.bucket(nseq)
        pgraphs = self.prefill_graphs
        pbucket = 0  # one sequence's prefill graph: the eager layout in static buffers
        if not decode and nseq == 1 and pgraphs is not None:
            pbucket = pgraphs.bucket(num_tokens) or 0
        n = bucket or pbucket or num_tokens  # rows of ids / positions / slots (graph rows padded)

        tokens, dst, src = self._token_ids(reqs, ctx, qlens, decode)
        npend = len(dst)
        # Row i samples at token i for every i (no fork rows, no chunk that samples nothing).
        identity_rows = decode and num_rows == nseq and sample_rows == list(range(nseq))
        extra = 2 * npend + (0 if identity_rows else num_rows)
        if bucket and 3 * bucket + extra > graphs.i64.numel():  # no room in the static buffer
            bucket, n = 0, num_tokens
        if pbucket and 3 * pbucket + extra > pgraphs.i64.numel():
            pbucket, n = 0, num_tokens
        # Section starts are multiples of 16 elements in the eager layout: Triton specializes
        # kernels on pointer alignment and on integer arguments divisible by 16, so a layout
        # that moved with the batch size would compile new kernel variants mid-run.
        w = bucket or _round16(n)
        n64 = 3 * w + extra

        tables = [s.block_ids for s in sch]
        max_blocks = max(len(t) for t in tables)
        if bucket:
            s_seq, s_bt = 0, bucket
        else:
            max_blocks = pgraphs.max_blocks if pbucket else _round16(max_blocks)
            s_seq = _round16(nseq + 1)
            s_bt = s_seq + _round16(nseq)
        n32 = s_bt + nseq * max_blocks
        t64, t32 = self._staging.take(n64, n32)
        h64, h32 = t64.numpy(), t32.numpy()

        ctx_np = np.array(ctx, dtype=np.int64)
        if decode:
            positions = ctx_np
            rows = np.arange(nseq)
            seq_lens = ctx_np + 1
        else:
            q_np = np.array(qlens, dtype=np.int64)
            starts = np.cumsum(q_np) - q_np
            rows = np.repeat(np.arange(nseq), q_np)
            positions = np.arange(num_tokens, dtype=np.int64) + np.repeat(ctx_np - starts, q_np)
            seq_lens = ctx_np + q_np

        if bucket:
            h32[:nseq] = seq_lens
            h32[nseq:bucket] = 0
        else:
            h32[0] = 0
            np.cumsum(q_np if not decode else np.ones(nseq, np.int64), out=h32[1:nseq + 1])
            h32[s_seq:s_seq + nseq] = seq_lens
        bt = h32[s_bt:].reshape(nseq, max_blocks)
        for i, t in enumerate(tables):
            bt[i, :len(t)] = t
            bt[i, len(t):] = 0

        h64[:num_tokens] = tokens
        h64[w:w + num_tokens] = positions
        h64[2 * w:2 * w + num_tokens] = bt[rows, positions // bs].astype(np.int64) * bs + positions % bs
        if n > num_tokens:  # graph padding rows
            h64[num_tokens:n] = 0
            h64[w + num_tokens:w + n] = 0
            h64[2 * w + num_tokens:2 * w + n] = -1
        o = 3 * w
        if npend:
            h64[o:o + npend] = dst
            h64[o + npend:o + 2 * npend] = src
        if not identity_rows:
            h64[o + 2 * npend:o + 2 * npend + num_rows] = sample_rows

        dev = self.device
        cuda = dev.type == "cuda"
        staged = False  # the pending-token gather is done (by the staging kernel)
        if bucket:
            d64 = graphs.i64
            if self._stage_kernel():
                # One kernel reads the pinned arrays over PCIe (kernels/host_io.py); a pending
                # token's placeholder -1 - src names its row in the last sampled tensor.
                if npend:
                    h64[np.array(dst)] = -1 - np.array(src, dtype=np.int64)
                from paged_backend.kernels.host_io import stage_inputs
                stage_inputs(t64, d64, n, self._last_sampled if npend else None, t32,
                             [(0, graphs.seq_lens[:bucket]),
                              (s_bt, graphs.block_tables[:nseq, :max_blocks])])
                staged = True
            else:
                d64[:n64].copy_(t64, non_blocking=True)
                graphs.seq_lens[:bucket].copy_(t32[:bucket], non_blocking=True)
                graphs.block_tables[:nseq, :max_blocks].copy_(
                    t32[s_bt:].view(nseq, max_blocks), non_blocking=True)
            meta = None
        elif pbucket:  # the eager layout, in the prefill graphs' static buffers
            d64 = pgraphs.i64
            d64[:n64].copy_(t64, non_blocking=True)
            pgraphs.i32[:n32].copy_(t32, non_blocking=True)
            meta = None
        else:
            if cuda:
                d64 = torch.empty(n64, dtype=torch.int64, device=dev)
                d64.copy_(t64, non_blocking=True)
                d32 = torch.empty(n32, dtype=torch.int32, device=dev)
                d32.copy_(t32, non_blocking=True)
            else:  # the staging arrays are the inputs (copied: the next step reuses them)
                d64, d32 = t64.clone(), t32.clone()
            qsl_cpu = h32[:nseq + 1].tolist()
            seq_cpu = seq_lens.tolist()
            meta = AttentionMetadata(
                num_tokens=num_tokens, query_start_loc=d32[:nseq + 1],
                seq_lens=d32[s_seq:s_seq + nseq], slot_mapping=d64[2 * w:2 * w + n],
                block_tables=d32[s_bt:].view(nseq, max_blocks),
                max_query_len=max(qlens), max_seq_len=max(seq_cpu), block_size=bs,
                query_start_loc_cpu=qsl_cpu, seq_lens_cpu=seq_cpu)
        self._staging.copied()

        input_ids = d64[:n]
        if npend and not staged:
            prev = self._last_sampled
            input_ids.index_copy_(0, d64[o:o + npend], prev.index_select(0, d64[o + npend:o + 2 * npend]))
        sample_idx = None if identity_rows else d64[o + 2 * npend:o + 2 * npend + num_rows]
        return _Inputs(input_ids, d64[w:w + n], meta, bucket, sample_idx, pbucket)

    # ---------------------------------------------------------------- execute
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and wait for its results."""
        return self.launch(sched).result()

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput) -> StepHandle:
        """Queue one step (forward, logits where needed, sampling, copies to host)."""
        if sched.is_empty:
            return StepHandle([], None, None, [], [], _out=ModelRunnerOutput())
        if sched.block_copies:
            src = self._to_device([a for a, _ in sched.block_copies])
            dst = self._to_device([b for _, b in sched.block_copies])
            self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

        sch = sched.scheduled
        if self.reorder_decode_rows and len(sch) > 4 and all(s.num_new_tokens == 1 for s in sch):
            sch = decode_row_order(sch)
        sample_rows: list[int] = []
        rows: list[SamplingRow] = []
        row_reqs: list[str] = []
        plain = True
        prompt_lp: list[tuple[Any, int, int, int, int]] = []  # (request, computed, flat start, count, k)
        start = 0
        for s in sch:
            req = s.request
            end = start + s.num_new_tokens
            sp = req.sampling_params
            if sp.prompt_logprobs is not None:
                # Logits at position p score prompt token p + 1.
                last = min(s.num_computed_tokens + s.num_new_tokens, req.num_prompt_tokens - 1)
                cnt = last - s.num_computed_tokens
                if cnt > 0:
                    prompt_lp.append((req, s.num_computed_tokens, start, cnt, sp.prompt_logprobs))
            if s.samples:
                # A request about to fork (parallel sampling) samples every child's
                # first token from the same logits.
                for r in (req, *req.fork_children) if req.fork_children else (req,):
                    rsp = r.sampling_params
                    sample_rows.append(end - 1)
                    plain = plain and _plain_greedy(rsp)
                    rows.append(SamplingRow(rsp, r.prompt_token_ids, r.output_token_ids,
                                            self._generator(r.request_id, rsp.seed)))
                    row_reqs.append(r.request_id)
            start = end

        inp = self._prepare(sch, sample_rows)
        if inp.graph_bucket:
            hidden = self.graphs.replay(inp.graph_bucket)
        elif inp.prefill_bucket:
            hidden = self.prefill_graphs.replay(inp.prefill_bucket)
        else:
            hidden = self.model(inp.input_ids, inp.positions, self.kv_caches, inp.meta)

        handle = StepHandle(row_reqs, None, None, [], [])
        if rows:
            n = len(rows)
            h = self._head_rows(hidden, inp, n)  # n rows, then padding rows (CUDA)
            greedy = getattr(self.model, "greedy_tokens", None) if plain else None
            if greedy is not None and self.device.type == "cuda":
                # The model puts the tokens into pinned memory itself (the LM head kernel
                # writes them over PCIe where it runs): no separate copy to queue.
                host = torch.empty(len(h), dtype=torch.int64, pin_memory=True)
                sampled = greedy(h, host_out=host)[:n]
                handle.sampled = host[:n]
                self._hold_until_written(host)
            elif plain:  # argmax of the model-dtype logits: the same token, no fp32 copy
                sampled = (greedy(h) if greedy is not None
                           else self.model.compute_logits(h, upcast=False).argmax(dim=-1))[:n]
            else:
                logits = self.model.compute_logits(h)[:n]
                res = self.sampler(logits, SamplingMetadata.build(rows, self.vocab_size, self.device))
                sampled = res.sampled_token_ids
                lp = res.logprobs
                if lp is not None:
                    handle.logprobs = (self._to_host(lp.token_ids), self._to_host(lp.logprobs),
                                       self._to_host(lp.ranks))
                    handle.logprob_ks = [r.params.logprobs for r in rows]
            self._last_sampled = sampled
            self._last_rows = {rid: i for i, rid in enumerate(row_reqs)}
            if handle.sampled is None:
                handle.sampled = self._to_host(sampled)

        for req, c, st, cnt, k in prompt_lp:
            targets = self._to_device(req.prompt_token_ids[c + 1:c + 1 + cnt])
            # In slices of LOGPROB_ROWS, the size the memory profile counts: a whole step's
            # [tokens, vocab] float32 logits would not fit it (16384 x 151936 x 4 B = 10 GB).
            parts = [compute_logprobs_tensors(
                self.model.compute_logits(hidden[st + i:st + min(cnt, i + LOGPROB_ROWS)]),
                targets[i:i + LOGPROB_ROWS], k) for i in range(0, cnt, LOGPROB_ROWS)]
            t = parts[0] if len(parts) == 1 else LogprobsTensors(
                token_ids=torch.cat([p.token_ids for p in parts]),
                logprobs=torch.cat([p.logprobs for p in parts]),
                ranks=torch.cat([p.ranks for p in parts]))
            handle.prompt_logprobs.append(
                (req.request_id, (self._to_host(t.token_ids), self._to_host(t.logprobs),
                                  self._to_host(t.ranks)), cnt, k))
        if self.device.type == "cuda":
            handle.event = torch.cuda.Event()
            handle.event.record()
        return handle
