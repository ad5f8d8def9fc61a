"""The largest prefill step the scheduler can build, as a synthetic batch.

The memory profile that sizes the KV pool and the start-up kernel warm-up both run
it: `max_num_batched_tokens` new tokens (fewer when `max_num_seqs` sequences of
`max_model_len` cannot hold them), packed into as few sequences as `max_model_len`
allows. Profiling one sequence of `min(max_num_batched_tokens, max_model_len)`
tokens would miss the activations of a step that batches many shorter prompts.

The profile also runs the largest tail of a step on that forward's hidden states
(`run_largest_step_tail`): sampling `max_num_seqs` rows (the scheduler's cap, which counts
parallel sampling's children and beam search's beams from their parent's admission) with
every filter, penalty and logprobs on, then one slice of prompt logprobs.
"""

from __future__ import annotations

import torch

from paged_backend.layers.attention import AttentionMetadata
from paged_backend.layers.sampler import (Sampler, SamplingMetadata, SamplingRow,
                                          compute_logprobs_tensors)
from paged_backend.sampling_params import SamplingParams


def full_prefill_lens(max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int
                      ) -> list[int]:
    """New-token counts, one per sequence, of the largest prefill step (see the module doc)."""
    for name, v in (("max_num_batched_tokens", max_num_batched_tokens),
                    ("max_num_seqs", max_num_seqs), ("max_model_len", max_model_len)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    n = min(max_num_batched_tokens, max_num_seqs * max_model_len)
    per = min(n, max_model_len)
    k = -(-n // per)
    return [per] * (k - 1) + [n - per * (k - 1)]


def prefill_batch(lens: list[int], block_size: int, device: torch.device, *, write_kv: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, int]:
    """Inputs of a prefill from position 0 of sequences with `lens` new tokens each.

    Returns `(input_ids, positions, meta, num_blocks)`: token 0 everywhere, sequence i
    owning blocks `[i * nb, (i + 1) * nb)` of a cache of `num_blocks` blocks. With
    `write_kv=False` every slot is -1 (nothing is written) and the block tables point
    at block 0, so any cache of at least one block serves."""
    if not lens or min(lens) < 1:
        raise ValueError(f"every sequence needs at least one token, got {lens}")
    nb = -(-max(lens) // block_size)
    num_tokens = sum(lens)
    qsl = [0]
    for n in lens:
        qsl.append(qsl[-1] + n)
    positions = torch.cat([torch.arange(n, dtype=torch.int64) for n in lens])
    seq_idx = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    if write_kv:
        tables = torch.arange(len(lens) * nb, dtype=torch.int32).view(len(lens), nb)
        slots = (seq_idx * nb * block_size + positions).to(torch.int64)
    else:
        tables = torch.zeros((len(lens), nb), dtype=torch.int32)
        slots = torch.full((num_tokens,), -1, dtype=torch.int64)
    meta = AttentionMetadata(
        num_tokens=num_tokens,
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        slot_mapping=slots.to(device), block_tables=tables.to(device),
        max_query_len=max(lens), max_seq_len=max(lens), block_size=block_size,
        query_start_loc_cpu=qsl, seq_lens_cpu=list(lens))
    ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    return ids, positions.to(device), meta, len(lens) * nb if write_kv else 1


def run_largest_step_tail(model: torch.nn.Module, hidden: torch.Tensor, max_rows: int,
                          max_logprobs: int, logprob_rows: int, max_model_len: int) -> None:
    """Run what a step can do after its forward, at its largest, on `hidden` `[T, H]`.

    Samples `max_rows` rows (hidden's rows repeated when T is smaller: forks and the LM
    head's padding to the batch-size buckets can sample more rows than a step has tokens)
    with temperature, top-k, top-p, min-p, the three penalties (one row with a prompt and
    an output of `max_model_len` tokens, to which the penalties' token tables pad every
    row) and `max_logprobs` logprobs: the sort and `[rows, vocab]` float32 temporaries of
    the full sampler path. Then, with those logits
    still alive as in the runner, it computes prompt logprobs over one slice of
    min(T, `logprob_rows`) positions (the runner's slice size). For the memory profile:
    the results are discarded."""
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05,
                            repetition_penalty=1.1, frequency_penalty=0.1,
                            presence_penalty=0.1, logprobs=max_logprobs)
    rows = hidden[torch.arange(max_rows, device=hidden.device) % len(hidden)]
    longest = [0] * max_model_len
    sampling_rows = [SamplingRow(params, longest if i == 0 else [0], longest if i == 0 else [0])
                     for i in range(len(rows))]
    logits = model.compute_logits(rows)
    res = Sampler()(logits, SamplingMetadata.build(sampling_rows, logits.shape[-1],
                                                   hidden.device))
    n = min(len(hidden), logprob_rows)
    targets = torch.zeros(n, dtype=torch.int64, device=hidden.device)
    compute_logprobs_tensors(model.compute_logits(hidden[:n]), targets, max_logprobs)
    del logits, res
