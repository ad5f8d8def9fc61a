"""Incremental detokenization of one completion, with stop strings (vLLM semantics).

Pure Python apart from the tokenizer object, a Hugging Face tokenizer (fast or
slow); no torch.

How the text is built
---------------------
Decoding the whole completion again at every step costs O(n^2), and decoding
each token on its own is wrong (byte-level BPE tokens may hold only part of a
UTF-8 character; SentencePiece tokenizers drop a token's leading space at the
start of a decode). Instead we keep a small window of token ids, split by a
*read offset*:

    window = [ ...tokens whose text was already emitted... | ...pending... ]
             ^ prefix (index 0)                            ^ read offset

For each new token we decode ``window[:read]`` (the prefix text) and
``window`` (the new text). When the new text is longer than the prefix text
and does not end in U+FFFD (an incomplete UTF-8 character), its tail past the
prefix text is new output; the window then drops its prefix part, so it
starts at the old read offset and the read offset moves to its end. Otherwise
the token stays pending and nothing is emitted yet. The window starts with the
last few prompt tokens, so the first output token is decoded in context (its
leading space comes out as it does after the prompt).

Known differences from ``tokenizer.decode(output_token_ids, skip_special_tokens=...)``
------------------------------------------------------------------------------------
* Pending tokens whose text ends in an incomplete UTF-8 character are not in
  ``output_text`` yet; if the completion ends there (max_tokens), their bytes
  never appear, where a full decode shows U+FFFD for them. vLLM does the same.
* A character split between the last prompt token and the first output token
  is lost (a full decode of the output alone shows U+FFFD for its tail bytes).
* SentencePiece/Metaspace tokenizers: the first output token keeps its leading
  space (it is decoded after the prompt), where a standalone decode of the
  output drops it. Byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM2, Qwen)
  give the same text both ways.
* ``clean_up_tokenization_spaces`` is never applied (it is not local to a
  window; transformers 5 skips it for BPE tokenizers anyway).
* ``SamplingParams.spaces_between_special_tokens`` has no effect: transformers 5
  no longer has that decode option; special tokens are joined as the
  tokenizer's own decode joins them.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from paged_backend.sampling_params import SamplingParams

__all__ = ["IncrementalDetokenizer", "INITIAL_PROMPT_WINDOW"]

# How many prompt tokens start the decode window (context for the first output token).
INITIAL_PROMPT_WINDOW = 5

_REPLACEMENT_CHAR = "\ufffd"


def _make_decode(tokenizer: Any, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """Return ``ids -> text`` for this tokenizer, without tokenization-space clean-up.

    Fast tokenizers go straight to the Rust ``tokenizers.Tokenizer`` (what
    transformers' own decode calls, minus its Python overhead); anything else
    goes through ``tokenizer.decode``.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(
        tokenizer, "is_fast", False) else None
    if backend is not None and hasattr(backend, "decode"):
        def decode_fast(ids: list[int]) -> str:
            return backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return decode_fast

    def decode_slow(ids: list[int]) -> str:
        text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens,
                                clean_up_tokenization_spaces=False)
        return text if text is not None else ""
    return decode_slow


class IncrementalDetokenizer:
    """Turns one completion's token ids into text step by step and checks stop strings.

    One instance per completion (sequence). Call `update` with each step's new
    token ids; read `output_text`, or `get_next_output_text` for streaming.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int],
                 params: SamplingParams) -> None:
        """Start the decode window with the last `INITIAL_PROMPT_WINDOW` prompt tokens."""
        self.tokenizer = tokenizer
        self.skip_special_tokens: bool = params.skip_special_tokens
        self.stop: tuple[str, ...] = tuple(params.stop or ())
        self.include_stop_str_in_output: bool = params.include_stop_str_in_output
        self.min_tokens: int = params.min_tokens
        # Chars held back while streaming: they might turn into a stop string.
        self.stop_buffer_length: int = (
            max(len(s) for s in self.stop) - 1
            if self.stop and not self.include_stop_str_in_output else 0)

        self._decode = _make_decode(tokenizer, self.skip_special_tokens)
        context = [int(t) for t in prompt_token_ids[-INITIAL_PROMPT_WINDOW:]] \
            if INITIAL_PROMPT_WINDOW > 0 else []
        self._window: list[int] = context
        self._read_offset: int = len(context)
        self._prefix_text: Optional[str] = None  # decode(window[:read]), computed lazily

        self._output_token_ids: list[int] = []
        self._text: str = ""
        self._last_output_offset: int = 0  # chars already returned by delta streaming
        self._stop_string: Optional[str] = None
        self._stop_token_count: Optional[int] = None
        self._token_text_cache: dict[int, str] = {}

    # ---------------------------------------------------------------- state
    @property
    def output_text(self) -> str:
        """The completion's text so far (truncated at a stop string if one was hit)."""
        return self._text

    @property
    def output_token_ids(self) -> list[int]:
        """The output token ids fed so far (a copy); tokens after a stop string are not kept."""
        return list(self._output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """How many output tokens were fed (up to and including a stop string's token)."""
        return len(self._output_token_ids)

    @property
    def stop_string(self) -> Optional[str]:
        """The stop string that ended the completion, or None."""
        return self._stop_string

    @property
    def stop_token_count(self) -> Optional[int]:
        """After a stop string: the number of output tokens up to and including the token
        whose text completed it (the engine may cut the completion's token ids to this
        many when one `update` carried several tokens); None before."""
        return self._stop_token_count

    # --------------------------------------------------------------- decoding
    def _decode_next(self, token_id: int) -> str:
        """Append one token to the window; return the text it makes final ('' if pending)."""
        window = self._window
        window.append(token_id)
        prefix_text = self._prefix_text
        if prefix_text is None:
            prefix_text = self._decode(window[:self._read_offset])
            self._prefix_text = prefix_text
        new_text = self._decode(window)
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT_CHAR):
            # Emit; the window now starts at the old read offset and ends at the read offset.
            del window[:self._read_offset]
            self._read_offset = len(window)
            self._prefix_text = None
            return new_text[len(prefix_text):]
        return ""

    def _find_stop(self, new_from: int) -> Optional[tuple[str, int]]:
        """Find a stop string ending after char `new_from` of the text.

        Returns (stop string, start index) of the occurrence that starts earliest
        (on a tie, the shorter string), or None.
        """
        text = self._text
        best: Optional[tuple[str, int]] = None
        for s in self.stop:
            idx = text.find(s, max(0, new_from - len(s) + 1))
            if idx < 0:
                continue
            if best is None or idx < best[1] or (idx == best[1] and len(s) < len(best[0])):
                best = (s, idx)
        return best

    def update(self, new_token_ids: Sequence[int], stop_checking: bool = True,
               stop_terminated: bool = False) -> Optional[str]:
        """Append this step's new output tokens and update the text incrementally.

        Stop strings are checked token by token: after each token's text is added,
        any stop string that this text completes (it may span tokens, and sit in
        the middle of a token's text) ends the completion: the text is cut at the
        earliest such occurrence (keeping the stop string when
        ``include_stop_str_in_output``), the remaining new tokens are ignored and
        the stop string is returned. Otherwise returns None.

        Stop strings are only looked for in the text of output tokens past
        ``params.min_tokens`` (plus the stop length - 1 chars before it, so a stop
        string spanning that boundary counts) and only when ``stop_checking`` is
        True; the min_tokens rule is applied per token here, so passing True is
        enough.

        ``stop_terminated``: the last of ``new_token_ids`` is a stop token (EOS or
        one of ``stop_token_ids``) that ended the completion; it is recorded but its
        text is left out unless ``include_stop_str_in_output`` (vLLM's rule).

        Raises RuntimeError when called after a stop string ended the completion.
        """
        if self._stop_string is not None:
            raise RuntimeError(
                f"IncrementalDetokenizer.update called after the stop string "
                f"{self._stop_string!r} ended the completion.")
        ids = [int(t) for t in new_token_ids]
        skipped: Optional[int] = None
        if stop_terminated and ids and not self.include_stop_str_in_output:
            skipped = ids.pop()

        out_ids = self._output_token_ids
        check = bool(self.stop) and stop_checking
        for token_id in ids:
            out_ids.append(token_id)
            piece = self._decode_next(token_id)
            if not piece:
                continue
            new_from = len(self._text)
            self._text += piece
            if check and len(out_ids) > self.min_tokens:
                hit = self._find_stop(new_from)
                if hit is not None:
                    stop_str, start = hit
                    end = start + len(stop_str) if self.include_stop_str_in_output else start
                    self._text = self._text[:end]
                    self._stop_string = stop_str
                    self._stop_token_count = len(out_ids)
                    return stop_str
        if skipped is not None:
            out_ids.append(skipped)
        return None

    # -------------------------------------------------------------- streaming
    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Text to stream now.

        While not finished, the last ``stop_buffer_length`` chars (longest stop
        string - 1, or 0 when there are no stop strings or
        ``include_stop_str_in_output``) are held back, as they may turn out to be
        the start of a stop string. ``delta=False`` returns all text so far (less
        the held-back chars); ``delta=True`` only the text not returned by an
        earlier delta call. ``finished=True`` holds nothing back.
        """
        hold = 0 if finished else self.stop_buffer_length
        length = max(0, len(self._text) - hold)
        if not delta:
            return self._text[:length] if hold else self._text
        last = self._last_output_offset
        if length <= last:
            return ""
        self._last_output_offset = length
        return self._text[last:length]

    # ---------------------------------------------------------------- tokens
    def decode_token(self, token_id: int) -> str:
        """The text of one token on its own (for ``Logprob.decoded_token``).

        Special tokens give their text (e.g. ``"<|im_end|>"``); a token holding
        part of a UTF-8 character gives U+FFFD for those bytes, as
        ``tokenizer.decode([token_id])`` does.
        """
        token_id = int(token_id)
        text = self._token_text_cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False,
                                         clean_up_tokenization_spaces=False)
            if text is None:
                text = ""
            self._token_text_cache[token_id] = text
        return text
