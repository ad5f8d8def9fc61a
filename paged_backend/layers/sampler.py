"""The sampler: logits of one step -> next tokens (and their logprobs).

Processing order (vLLM's): logit_bias, the min_tokens mask, repetition
penalty, frequency and presence penalties; greedy rows then take the argmax.
Random rows divide by their temperature, then top-k, top-p and min-p filter,
and a token is drawn with the exponential race `argmax(probs / q)`,
`q ~ Exp(1)` (drawn as `-log(u)`, `u ~ U[0, 1)`), which lets each seeded
row draw its own `q` from its own generator: a seeded request samples the
same tokens alone or in any batch.

Logprobs are those of the raw logits (before any processing), as vLLM V1
returns by default. The sampled token's logprob and rank are always returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paged_backend.layers.sampling_metadata import SamplingMetadata, SamplingRow

__all__ = [
    "LogprobsTensors",
    "Sampler",
    "SamplerOutput",
    "SamplingMetadata",
    "SamplingRow",
    "compute_logprobs_tensors",
]


@dataclass(slots=True)
class LogprobsTensors:
    """Logprobs of one token per row plus each row's top-K tokens.

    Column 0 is the sampled (or given) token, columns 1..K the top-K ids in
    descending logprob order. `ranks` is 1 + the number of vocabulary tokens
    with a strictly greater logprob than column 0's token.
    """

    token_ids: torch.Tensor  # [N, K + 1] int64
    logprobs: torch.Tensor  # [N, K + 1] float32
    ranks: torch.Tensor  # [N] int64


@dataclass(slots=True)
class SamplerOutput:
    """What the sampler returns for one step.

    `logprobs` is set when some row asked for logprobs (K = max requested
    over rows); a row that asked for k logprobs reads columns 0..k.
    """

    sampled_token_ids: torch.Tensor  # [N] int64
    logprobs: LogprobsTensors | None


def compute_logprobs_tensors(logits: torch.Tensor, token_ids: torch.Tensor,
                             num_logprobs: int) -> LogprobsTensors:
    """Logprobs (log_softmax of the raw `logits` [N, V]) of `token_ids` [N] and the top-k.

    Used for sampled tokens and for prompt logprobs (the given next tokens).
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    token_ids = token_ids.to(device=logits.device, dtype=torch.int64).view(-1, 1)
    token_logprobs = logprobs.gather(1, token_ids)
    ranks = torch.count_nonzero(logprobs > token_logprobs, dim=-1) + 1
    if num_logprobs > 0:
        k = min(num_logprobs, logprobs.shape[-1])
        top_vals, top_ids = logprobs.topk(k, dim=-1)
        if k < num_logprobs:  # a vocabulary smaller than K: pad with the last entry
            pad = num_logprobs - k
            top_vals = torch.cat([top_vals, top_vals[:, -1:].expand(-1, pad)], dim=1)
            top_ids = torch.cat([top_ids, top_ids[:, -1:].expand(-1, pad)], dim=1)
        token_ids = torch.cat([token_ids, top_ids], dim=1)
        token_logprobs = torch.cat([token_logprobs, top_vals], dim=1)
    return LogprobsTensors(token_ids=token_ids, logprobs=token_logprobs, ranks=ranks)


def _apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> None:
    """Repetition (prompt + output), frequency and presence (output) penalties, in place."""
    n, v = logits.shape
    if meta.output_token_ids is None:
        return
    counts = torch.zeros((n, v + 1), dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, meta.output_token_ids,
                        torch.ones_like(meta.output_token_ids, dtype=logits.dtype))
    counts = counts[:, :v]
    if meta.repetition_penalty is not None:
        seen = torch.zeros((n, v + 1), dtype=torch.bool, device=logits.device)
        seen.scatter_(1, meta.prompt_token_ids, True)
        seen = seen[:, :v] | (counts > 0)
        p = meta.repetition_penalty.unsqueeze(1)
        penalized = torch.where(logits > 0, logits / p, logits * p)
        torch.where(seen, penalized, logits, out=logits)
    if meta.frequency_penalty is not None:
        logits -= meta.frequency_penalty.unsqueeze(1) * counts
    if meta.presence_penalty is not None:
        logits -= meta.presence_penalty.unsqueeze(1) * (counts > 0).to(logits.dtype)


def _apply_top_k_top_p(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Mask tokens outside each row's top-k, then outside its top-p nucleus.

    top-k keeps every token tied with the k-th largest logit. top-p keeps the
    shortest prefix (by descending probability) whose mass reaches top_p.
    """
    if meta.top_p is None:
        # top-k only: a partial top-k instead of a full sort.
        top_vals = logits.topk(meta.max_top_k, dim=-1).values
        k = meta.top_k.clamp(max=meta.max_top_k) - 1
        kth = top_vals.gather(1, k.unsqueeze(1))
        kth = kth.masked_fill((meta.top_k >= meta.vocab_size).unsqueeze(1), float("-inf"))
        return logits.masked_fill_(logits < kth, float("-inf"))

    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
    if meta.top_k is not None:
        kth = sorted_logits.gather(1, (meta.top_k - 1).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    top_p = meta.top_p.masked_fill(meta.top_p >= 1.0, float("inf")).unsqueeze(1)
    drop = mass_before >= top_p
    drop[:, 0] = False
    sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)


def _apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """Mask tokens whose probability is below min_p times the row's largest, in place.

    p_i < min_p * p_max  <=>  logit_i < max_logit + log(min_p)  (min_p = 0: no-op).
    """
    threshold = logits.amax(dim=-1, keepdim=True) + min_p.log().unsqueeze(1)
    logits.masked_fill_(logits < threshold, float("-inf"))


class Sampler:
    """Samples one token per row of logits, as `SamplingParams` ask.

    `generator` (on the logits' device) drives the rows without a generator
    of their own; None uses torch's global RNG. Each seeded random row draws
    exactly one vocabulary-sized `uniform_` vector from its own generator per
    call, whatever the batch; greedy rows draw nothing from theirs.
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """Sample from `logits` [N, V] (float32; not modified) per `meta`."""
        if logits.dim() != 2 or logits.shape[0] != meta.num_rows:
            raise ValueError(
                f"logits must be [num_rows={meta.num_rows}, vocab], got {tuple(logits.shape)}.")
        if meta.num_rows == 0:
            empty = torch.empty((0,), dtype=torch.int64, device=logits.device)
            return SamplerOutput(sampled_token_ids=empty, logprobs=None)
        raw = logits
        x = logits.float()
        owned = meta.bias_rows is not None or meta.min_tokens_rows is not None \
            or meta.output_token_ids is not None
        if owned:  # copy only when some row changes the logits before sampling
            x = x.clone()
        if meta.bias_rows is not None:
            x.index_put_((meta.bias_rows, meta.bias_token_ids), meta.bias_values, accumulate=True)
        if meta.min_tokens_rows is not None:
            # index_put_ with a device tensor: a Python scalar value syncs on CUDA.
            x.index_put_((meta.min_tokens_rows, meta.min_tokens_token_ids),
                         x.new_full((1,), float("-inf")))
        _apply_penalties(x, meta)

        greedy_ids = None if meta.all_random else x.argmax(dim=-1)
        if meta.all_greedy:
            sampled = greedy_ids
        else:
            sampled = self._sample_random(x, meta, owned)
            if greedy_ids is not None:
                sampled = torch.where(meta.greedy_mask, greedy_ids, sampled)

        logprobs = None
        if meta.needs_logprobs:
            logprobs = compute_logprobs_tensors(raw, sampled, meta.max_num_logprobs)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=logprobs)

    def _sample_random(self, x: torch.Tensor, meta: SamplingMetadata,
                       owned: bool) -> torch.Tensor:
        """Temperature, top-k/top-p/min-p, then the exponential race.

        x is changed in place when `owned` (a copy of the caller's logits), else copied.
        """
        filters = meta.top_k is not None or meta.top_p is not None or meta.min_p is not None
        if meta.temperature is not None:
            t = meta.temperature.unsqueeze(1)
            x = x.div_(t) if owned else x / t
        elif filters and not owned:
            x = x.clone()
        if meta.top_k is not None or meta.top_p is not None:
            x = _apply_top_k_top_p(x, meta)
        if meta.min_p is not None:
            _apply_min_p(x, meta.min_p)
        probs = x.softmax(dim=-1)
        # Exponential race with q = -log(u), u ~ U[0, 1) (uniform_ + log is ~4x
        # faster than exponential_ on CPU): argmax(probs / q) = argmin(probs / log u).
        # u is clamped to the smallest normal float so log u is finite and < 0;
        # a token of probability 0 then gets -0.0 and never wins.
        log_u = torch.empty_like(probs)
        if len(meta.generators) < meta.num_rows:
            log_u.uniform_(generator=self.generator)
        for i, gen in meta.generators.items():
            log_u[i].uniform_(generator=gen)
        log_u.clamp_(min=torch.finfo(log_u.dtype).tiny).log_()
        return probs.div_(log_u).argmin(dim=-1)
