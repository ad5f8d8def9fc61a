"""Sampling parameters, with vLLM's names, fields and defaults.

Pure Python (no torch): the scheduler and the engine's core read it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional, Union

_GREEDY_EPS = 1e-5


class RequestOutputKind(enum.Enum):
    """What a streamed `RequestOutput` carries (vLLM's `output_kind`)."""

    CUMULATIVE = 0  # everything generated so far, each step
    DELTA = 1  # only what is new since the last output
    FINAL_ONLY = 2  # one output, when the request finishes


@dataclass
class SamplingParams:
    """How to sample one request's completions; vLLM's fields and defaults.

    Every field is checked at construction; a bad value raises `ValueError`
    naming the field. `temperature=0` means greedy; `top_k` 0 or -1 disables
    top-k. `stop` strings end a completion (they may span tokens), as do
    `stop_token_ids` and the model's EOS (unless `ignore_eos`).
    """

    n: int = 1
    best_of: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: Optional[dict[int, float]] = None
    spaces_between_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Filled by the engine: the model's EOS ids (not set by users).
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        self.verify()

    def verify(self) -> None:
        """Normalize and check every field (ValueError naming the field).

        Runs at construction and again when a request is added, so fields
        changed after construction are checked too.
        """
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        else:
            raise ValueError(f"SamplingParams.stop must be a string or a list of strings, "
                             f"got {self.stop!r}.")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, (list, tuple)):
            self.stop_token_ids = list(self.stop_token_ids)
        else:
            raise ValueError(f"SamplingParams.stop_token_ids must be a list of token ids, "
                             f"got {self.stop_token_ids!r}.")
        if self.best_of is None:
            self.best_of = self.n
        self._verify()
        self.all_stop_token_ids = set(self.stop_token_ids)

    # ------------------------------------------------------------------ checks
    def _verify(self) -> None:
        def bad(name: str, msg: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} {msg}, got {getattr(self, name)!r}.")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if not is_int(self.n) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if not is_int(self.best_of) or self.best_of < self.n:
            raise bad("best_of", f"must be an integer >= n ({self.n})")
        for name in ("temperature", "top_p", "min_p", "presence_penalty",
                     "frequency_penalty", "repetition_penalty"):
            v = getattr(self, name)
            if not is_num(v) or v != v or v in (float("inf"), float("-inf")):
                raise bad(name, "must be a finite number")
        if self.temperature < 0.0:
            raise bad("temperature", "must be non-negative")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "must be an integer: -1 or 0 (disable) or at least 1")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if self.repetition_penalty <= 0.0:
            raise bad("repetition_penalty", "must be greater than zero")
        if self.seed is not None and not is_int(self.seed):
            raise bad("seed", "must be an integer or None")
        if not all(isinstance(s, str) for s in self.stop):
            raise bad("stop", "must be a string or a list of strings")
        if any(s == "" for s in self.stop):
            raise bad("stop", "must not contain an empty string")
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of non-negative integers")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "must be a bool")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "must be an integer >= 1 or None")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and (not is_int(self.logprobs) or self.logprobs < 0):
            raise bad("logprobs", "must be an integer >= 0 or None")
        if self.prompt_logprobs is not None and (
                not is_int(self.prompt_logprobs) or self.prompt_logprobs < 0):
            raise bad("prompt_logprobs", "must be an integer >= 0 or None")
        for name in ("skip_special_tokens", "include_stop_str_in_output",
                     "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be a bool")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise bad("logit_bias", "must be a dict of token id -> bias")
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError):
                raise bad("logit_bias", "must map integer token ids to numbers") from None
            if any(k < 0 for k in self.logit_bias):
                raise bad("logit_bias", "must have non-negative token ids")
            if not all(-100.0 <= v <= 100.0 for v in self.logit_bias.values()):
                raise bad("logit_bias", "values must be finite numbers in [-100, 100]")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise bad("output_kind", "must be a RequestOutputKind")
        if self.n > 1 and self.sampling_type_greedy:
            raise ValueError(
                f"SamplingParams.n must be 1 when sampling greedily (temperature=0), got n={self.n}.")
        if self.best_of > 1 and self.sampling_type_greedy:
            raise ValueError(
                f"SamplingParams.best_of must be 1 when sampling greedily (temperature=0), "
                f"got best_of={self.best_of}.")

    # --------------------------------------------------------------- helpers
    @property
    def sampling_type_greedy(self) -> bool:
        """True when the request decodes greedily (temperature ~ 0)."""
        return self.temperature < _GREEDY_EPS

    @property
    def effective_top_k(self) -> int:
        """top_k with 0 and -1 both meaning 'off' (returned as 0)."""
        return 0 if self.top_k in (0, -1) else self.top_k

    def verify_vocab(self, vocab_size: int) -> None:
        """Check token ids in the params against the model's vocabulary."""
        for t in self.stop_token_ids:
            if t >= vocab_size:
                raise ValueError(
                    f"SamplingParams.stop_token_ids has token id {t} outside the vocabulary "
                    f"(size {vocab_size}).")
        for t in (self.logit_bias or {}):
            if t >= vocab_size:
                raise ValueError(
                    f"SamplingParams.logit_bias has token id {t} outside the vocabulary "
                    f"(size {vocab_size}).")

    def clone(self) -> "SamplingParams":
        """A deep-enough copy for the engine to fill per-request fields."""
        import copy
        return copy.deepcopy(self)
