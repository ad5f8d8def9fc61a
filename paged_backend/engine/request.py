"""A request's state inside the engine (pure Python: no torch, no tokenizer)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional, Union

from paged_backend.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Where a request is in its life; values from FINISHED_STOPPED on are final."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> Optional[str]:
        return {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                RequestStatus.FINISHED_ABORTED: "abort"}.get(self)


@dataclass(slots=True, eq=False)
class Request:
    """One sequence being generated.

    There are no prefill/decode phases: `num_computed_tokens` (tokens whose KV
    is in the cache) catches up with `num_tokens` (prompt + output). A step
    that brings it to `num_tokens` samples the next token.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_index: int = 0
    eos_token_id: Optional[int] = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    # Prompt tokens found in the prefix cache when first scheduled (-1: not yet).
    num_cached_tokens: int = -1
    stop_reason: Union[int, str, None] = None
    num_preemptions: int = 0
    # Chained hashes of this request's full blocks, filled lazily by the block manager.
    block_hashes: list[int] = field(default_factory=list)
    # Parallel sampling: requests that fork from this one once its prompt is computed.
    fork_children: list["Request"] = field(default_factory=list)
    # Driven from outside (beam search): the engine reports logprobs, appends nothing.
    external: bool = False
    # Beam search: (group id, width). The beams of one prompt share `width` places in the
    # scheduler's max_num_seqs count, held while any of them runs (they fork up to width).
    seat_group: Optional[tuple[str, int]] = None
    # Tokens sampled by launched steps whose values the host has not read yet (at most 1
    # when a step is scheduled):
    # the next step may already compute them (the runner feeds them from the device).
    num_pending: int = 0
    # May run with the engine's next step scheduled before this step's results are read
    # (set by the engine for requests whose sampling does not read their own last tokens).
    overlap_ok: bool = False

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_id(self, i: int) -> int:
        """The i-th token of prompt + output."""
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < p else self.output_token_ids[i - p]

    def token_slice(self, start: int, stop: int) -> list[int]:
        """Tokens [start, stop) of prompt + output."""
        p = len(self.prompt_token_ids)
        if stop <= p:
            return self.prompt_token_ids[start:stop]
        if start >= p:
            return self.output_token_ids[start - p:stop - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:stop - p]

    @property
    def num_tokens_with_pending(self) -> int:
        """Known tokens plus the one sampled on the device and not read back yet."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def use_prefix_cache(self) -> bool:
        # Prompt logprobs need every prompt position computed, so no cache hits.
        return self.sampling_params.prompt_logprobs is None
