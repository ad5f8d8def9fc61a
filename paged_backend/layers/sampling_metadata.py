"""Per-step sampling metadata: every row's `SamplingParams` as batched tensors.

The runner describes each row of logits with a `SamplingRow`;
`SamplingMetadata.build` turns the rows into the tensors the `Sampler` reads,
once per step, and records which kinds of work any row needs so the sampler
can skip the rest (no sort when no row uses top-k/top-p, no penalty tensors
when no row has a penalty, ...). Work only random rows need (temperature,
top-k, top-p, min-p) is switched off on greedy rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch

from paged_backend.sampling_params import SamplingParams


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device; on CUDA through pinned memory, without blocking the host."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass(slots=True)
class SamplingRow:
    """One row of logits to sample from, as the runner sees it.

    `generator` is the request's own generator (on the logits' device) when
    `params.seed` is set, else None (the sampler's engine-wide one is used).
    """

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None


@dataclass(slots=True)
class SamplingMetadata:
    """Batched sampling parameters of one step; build it with `build`.

    Tensors are on the logits' device; a field is None when no row needs it.
    Padded token tensors use `vocab_size` as the pad id (the sampler scatters
    into `vocab_size + 1` columns and drops the last one).
    """

    num_rows: int
    vocab_size: int
    all_greedy: bool
    all_random: bool
    greedy_mask: torch.Tensor | None  # [N] bool; None when all rows are of one kind
    temperature: torch.Tensor | None  # [N] float32, 1.0 on greedy rows; None: all 1
    top_k: torch.Tensor | None  # [N] int64, vocab_size where off
    max_top_k: int  # largest active top_k (0: none)
    top_p: torch.Tensor | None  # [N] float32, 1.0 where off
    min_p: torch.Tensor | None  # [N] float32, 0.0 where off
    repetition_penalty: torch.Tensor | None  # [N] float32
    frequency_penalty: torch.Tensor | None  # [N] float32
    presence_penalty: torch.Tensor | None  # [N] float32
    prompt_token_ids: torch.Tensor | None  # [N, Lp] int64, padded with vocab_size
    output_token_ids: torch.Tensor | None  # [N, Lo] int64, padded with vocab_size
    bias_rows: torch.Tensor | None  # [B] int64: logit_bias entries, flattened
    bias_token_ids: torch.Tensor | None  # [B] int64
    bias_values: torch.Tensor | None  # [B] float32
    min_tokens_rows: torch.Tensor | None  # [M] int64: (row, stop id) pairs to mask
    min_tokens_token_ids: torch.Tensor | None  # [M] int64
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # seeded random rows
    max_num_logprobs: int = 0  # K: max params.logprobs over rows (None counts as 0)
    needs_logprobs: bool = False  # some row set params.logprobs (else no logprobs are computed)

    @classmethod
    def build(cls, rows: list[SamplingRow], vocab_size: int,
              device: torch.device | str) -> SamplingMetadata:
        """Batch `rows` into tensors on `device` for logits of width `vocab_size`.

        Raises ValueError for a `logit_bias` token id outside the vocabulary.
        Stop ids at or beyond `vocab_size` are ignored by the min_tokens mask.
        """
        device = torch.device(device)
        n = len(rows)
        greedy = [r.params.sampling_type_greedy for r in rows]
        all_greedy = all(greedy)
        all_random = not any(greedy)

        def vec(values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return _to_device(torch.tensor(values, dtype=dtype), device)

        temps, top_ks, top_ps, min_ps = [], [], [], []
        for r, g in zip(rows, greedy):
            p = r.params
            if g:
                temps.append(1.0)
                top_ks.append(vocab_size)
                top_ps.append(1.0)
                min_ps.append(0.0)
            else:
                temps.append(float(p.temperature))
                k = p.effective_top_k
                top_ks.append(vocab_size if k == 0 or k >= vocab_size else k)
                top_ps.append(float(p.top_p))
                min_ps.append(float(p.min_p))
        active_k = [k for k in top_ks if k < vocab_size]
        max_top_k = max(active_k, default=0)

        rep = [float(r.params.repetition_penalty) for r in rows]
        freq = [float(r.params.frequency_penalty) for r in rows]
        pres = [float(r.params.presence_penalty) for r in rows]
        use_rep = any(x != 1.0 for x in rep)
        use_freq = any(x != 0.0 for x in freq)
        use_pres = any(x != 0.0 for x in pres)

        def padded(lists: list[list[int]]) -> torch.Tensor:
            lens = np.fromiter((len(x) for x in lists), dtype=np.int64, count=n)
            width = int(lens.max()) if n else 0
            out = np.full((n, width), vocab_size, dtype=np.int64)
            if width:
                out[np.arange(width) < lens[:, None]] = np.fromiter(
                    chain.from_iterable(lists), dtype=np.int64, count=int(lens.sum()))
            return _to_device(torch.from_numpy(out), device)

        prompt_ids = padded([r.prompt_token_ids for r in rows]) if use_rep else None
        output_ids = (padded([r.output_token_ids for r in rows])
                      if use_rep or use_freq or use_pres else None)

        b_rows: list[int] = []
        b_toks: list[int] = []
        b_vals: list[float] = []
        m_rows: list[int] = []
        m_toks: list[int] = []
        generators: dict[int, torch.Generator] = {}
        max_num_logprobs = 0
        for i, r in enumerate(rows):
            p = r.params
            if p.logit_bias:
                for tok, val in p.logit_bias.items():
                    if not 0 <= tok < vocab_size:
                        raise ValueError(
                            f"SamplingParams.logit_bias has token id {tok} outside the "
                            f"vocabulary (size {vocab_size}).")
                    b_rows.append(i)
                    b_toks.append(tok)
                    b_vals.append(float(val))
            if p.min_tokens and len(r.output_token_ids) < p.min_tokens:
                for tok in sorted(p.all_stop_token_ids):
                    if 0 <= tok < vocab_size:
                        m_rows.append(i)
                        m_toks.append(tok)
            if r.generator is not None and not greedy[i]:
                generators[i] = r.generator
            if p.logprobs:
                max_num_logprobs = max(max_num_logprobs, p.logprobs)

        return cls(
            num_rows=n,
            vocab_size=vocab_size,
            all_greedy=all_greedy,
            all_random=all_random,
            greedy_mask=None if (all_greedy or all_random) else vec(greedy, torch.bool),
            temperature=None if all(t == 1.0 for t in temps) else vec(temps),
            top_k=vec(top_ks, torch.int64) if max_top_k else None,
            max_top_k=max_top_k,
            top_p=vec(top_ps) if any(x < 1.0 for x in top_ps) else None,
            min_p=vec(min_ps) if any(x > 0.0 for x in min_ps) else None,
            repetition_penalty=vec(rep) if use_rep else None,
            frequency_penalty=vec(freq) if use_freq else None,
            presence_penalty=vec(pres) if use_pres else None,
            prompt_token_ids=prompt_ids,
            output_token_ids=output_ids,
            bias_rows=vec(b_rows, torch.int64) if b_rows else None,
            bias_token_ids=vec(b_toks, torch.int64) if b_rows else None,
            bias_values=vec(b_vals) if b_rows else None,
            min_tokens_rows=vec(m_rows, torch.int64) if m_rows else None,
            min_tokens_token_ids=vec(m_toks, torch.int64) if m_rows else None,
            generators=generators,
            max_num_logprobs=max_num_logprobs,
            needs_logprobs=any(r.params.logprobs is not None for r in rows),
        )
