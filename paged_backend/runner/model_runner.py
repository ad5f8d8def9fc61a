"""Turns a `SchedulerOutput` into tensors, runs the model, samples.

The runner owns the KV cache (one allocation, a view per layer) and the
per-request random generators of seeded requests. Each step it builds one
explicit `AttentionMetadata`, runs the forward pass over all new tokens of
the batch, computes logits only where they are needed (the last token of a
sequence that samples, and prompt positions whose logprobs were asked for),
samples, and returns plain Python results with one device->host copy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from paged_backend.engine.scheduler import SchedulerOutput
from paged_backend.layers.attention import AttentionMetadata
from paged_backend.layers.sampler import (Sampler, SamplingMetadata, SamplingRow,
                                          compute_logprobs_tensors)

logger = logging.getLogger(__name__)

# (token ids, logprobs, rank of the first id): column 0 is the chosen token, then the top-k.
TokenLogprobs = tuple[list[int], list[float], int]


@dataclass(slots=True)
class ModelRunnerOutput:
    """Per request id: the sampled token, its logprobs (rows that asked), prompt logprobs of this chunk."""

    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)


class ModelRunner:
    """Runs one model on one device over a paged KV cache."""

    def __init__(self, model: torch.nn.Module, *, num_layers: int, num_kv_heads: int,
                 head_dim: int, num_blocks: int, block_size: int, vocab_size: int,
                 device: torch.device, dtype: torch.dtype, seed: int = 0):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.vocab_size = vocab_size
        self.kv_cache = torch.zeros((num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim),
                                    dtype=dtype, device=device)
        self.kv_caches = [self.kv_cache[i] for i in range(num_layers)]
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        self.sampler = Sampler(gen)
        self._generators: dict[str, torch.Generator] = {}

    @staticmethod
    def kv_bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                           dtype: torch.dtype) -> int:
        """Bytes of K and V for one block across all layers."""
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

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

    # ----------------------------------------------------------------- inputs
    def _prepare(self, sched: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs = self.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        max_blocks = 0
        for s in sched.scheduled:
            c, n = s.num_computed_tokens, s.num_new_tokens
            tokens.extend(s.request.token_slice(c, c + n))
            table = s.block_ids
            for p in range(c, c + n):
                slots.append(table[p // bs] * bs + p % bs)
            positions.extend(range(c, c + n))
            qsl.append(qsl[-1] + n)
            seq_lens.append(c + n)
            max_blocks = max(max_blocks, len(table))
        tables = [s.block_ids + [0] * (max_blocks - len(s.block_ids)) for s in sched.scheduled]
        dev = self.device
        meta = AttentionMetadata(
            num_tokens=len(tokens),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            max_query_len=max(s.num_new_tokens for s in sched.scheduled),
            max_seq_len=max(seq_lens),
            block_size=bs,
            query_start_loc_cpu=qsl,
            seq_lens_cpu=seq_lens,
        )
        return (torch.tensor(tokens, dtype=torch.long, device=dev),
                torch.tensor(positions, dtype=torch.long, device=dev), meta)

    # ---------------------------------------------------------------- execute
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step: forward, logits where needed, sampling."""
        out = ModelRunnerOutput()
        if sched.is_empty:
            return out
        if sched.block_copies:
            src = torch.tensor([a for a, _ in sched.block_copies], device=self.device)
            dst = torch.tensor([b for _, b in sched.block_copies], device=self.device)
            self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]
        input_ids, positions, meta = self._prepare(sched)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)

        sample_idx: list[int] = []
        rows: list[SamplingRow] = []
        row_reqs: list[str] = []
        prompt_lp: list[tuple[Any, int, int, int, int]] = []  # (request, computed, flat start, count, k)
        for i, s in enumerate(sched.scheduled):
            req = s.request
            start, end = meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1]
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
                for r in (req, *req.fork_children):
                    rsp = r.sampling_params
                    sample_idx.append(end - 1)
                    rows.append(SamplingRow(rsp, r.prompt_token_ids, r.output_token_ids,
                                            self._generator(r.request_id, rsp.seed)))
                    row_reqs.append(r.request_id)

        if rows:
            logits = self.model.compute_logits(hidden[sample_idx]).float()
            smeta = SamplingMetadata.build(rows, self.vocab_size, self.device)
            res = self.sampler(logits, smeta)
            sampled = res.sampled_token_ids.tolist()
            for r, rid in enumerate(row_reqs):
                out.sampled[rid] = sampled[r]
            lp = res.logprobs
            if lp is not None:
                ids_l, lps_l, ranks_l = lp.token_ids.tolist(), lp.logprobs.tolist(), lp.ranks.tolist()
                for r, rid in enumerate(row_reqs):
                    k = rows[r].params.logprobs
                    if k is not None:
                        out.logprobs[rid] = (ids_l[r][:k + 1], lps_l[r][:k + 1], ranks_l[r])

        for req, c, start, cnt, k in prompt_lp:
            logits = self.model.compute_logits(hidden[start:start + cnt]).float()
            targets = torch.tensor(req.prompt_token_ids[c + 1:c + 1 + cnt], device=self.device)
            t = compute_logprobs_tensors(logits, targets, k)
            ids_l, lps_l, ranks_l = t.token_ids.tolist(), t.logprobs.tolist(), t.ranks.tolist()
            out.prompt_logprobs[req.request_id] = [(ids_l[j][:k + 1], lps_l[j][:k + 1], ranks_l[j])
                                        for j in range(cnt)]
        return out
